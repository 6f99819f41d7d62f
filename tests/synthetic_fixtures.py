"""Synthetic cases for the trainer tests and the SynthMix benchmark, made by the real pipeline.

A tiny generator (32x32, a few steps: fast, not good) is trained on fold 0 of the dataset and
``generate_synthetic_cases`` writes the pairs. The quality scores are then set here, spread across [0, 1], so
that a threshold has cases on both sides and the tests know exactly which cases it must drop.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sampled_fingerprint import write_sampled_fingerprint

from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.generator import TrainingSettings
from nnunet_synth.generator.checkpoints import FINAL_FOLDER
from nnunet_synth.generator.training import train_generator
from nnunet_synth.image_sources import GenerationSettings, generate_synthetic_cases
from nnunet_synth.writer.synthetic_store import SyntheticStore, synthetic_case_id

SYNTHMIX_DATASET_ID = 981
SYNTHMIX_DATASET_NAME = "SynthMixExample"
NUM_SCORED_CASES = 12
PLANS = "nnUNetPlans"
CPU_PLANS = "nnUNetPlans_cpu"
VENV_BIN = str(Path(sys.executable).parent)


def stand_in_score(index: int) -> float:
    """Model-free scores 0.05, 0.13, ..., 0.93 (one per case, spread across [0, 1])."""
    return round(0.05 + 0.08 * index, 2)


def stand_in_pathology_iou(index: int) -> float:
    """Pathology IoU 0.0, 0.37, 0.74, 0.11, ... (one per case, neither score's order)."""
    return round((0.37 * index) % 1.0, 2)


def write_synthetic_cases(dataset_folder, generator_run_folder) -> SyntheticStore:
    """Train a tiny generator into ``generator_run_folder``, write NUM_SCORED_CASES + 1 synthetic pairs into
    ``dataset_folder`` and return the store.

    NUM_SCORED_CASES cases carry quality.model_free.score (``stand_in_score``) and
    quality.segmentation.mean_dice (= 1 - score, so the two quality keys select different cases) and
    quality.segmentation.min_pathology_iou (``stand_in_pathology_iou``, a third order); one more
    case has no quality entry at all (as a case written before any scoring).
    """
    dataset = RawDataset(dataset_folder)
    settings = TrainingSettings(preset="tiny", image_size=32, batch_size=4, max_steps=3, warmup_steps=1,
                                checkpoint_every=100, preview_every=100, preview_inference_steps=2)
    train_generator(dataset, generator_run_folder, settings, fold=0, progress=False)
    generate_synthetic_cases(dataset, generator_run_folder / FINAL_FOLDER,
                             GenerationSettings(num_cases=NUM_SCORED_CASES + 1, num_inference_steps=4))
    store = SyntheticStore(dataset)
    for index in range(NUM_SCORED_CASES + 1):
        entry = store.cases[synthetic_case_id(index, 0)]
        if index < NUM_SCORED_CASES:
            score = stand_in_score(index)
            entry["quality"] = {"model_free": {"score": score, "passed": score >= 0.5},
                                "segmentation": {"mean_dice": round(1.0 - score, 2), "dice": {}, "model_fold": "0",
                                                 "min_pathology_iou": stand_in_pathology_iou(index)}}
        else:
            del entry["quality"]
        store.save_record(synthetic_case_id(index, 0))
    store.save_manifest()
    return store


@pytest.fixture(scope="session")
def synthetic_example_dataset(nnunet_folders, tmp_path_factory):
    """The small real example as Dataset981_SynthMixExample (a private copy: other tests' Dataset990 stays
    real-only), with synthetic cases from ``write_synthetic_cases``. Returns the raw dataset folder."""
    from conftest import convert_example_subset
    folder = convert_example_subset(nnunet_folders["nnUNet_raw"], SYNTHMIX_DATASET_ID, SYNTHMIX_DATASET_NAME)
    write_synthetic_cases(folder, tmp_path_factory.mktemp("synthmix_generator") / "run")
    return folder


def clean_environment(nnunet_folders, **extra) -> dict:
    """Only PATH, HOME, the nnU-Net folders, nnUNet_extTrainer, single-process nnU-Net settings, the caller's
    nnsynth_cpu_threads (a shared machine) and ``extra``."""
    from nnunet_synth.dataset_tools.trainer_dir import trainer_directory
    env = {"PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ["HOME"],
           "nnUNet_extTrainer": str(trainer_directory()), "nnUNet_def_n_proc": "1", "nnUNet_compile": "f"}
    if "nnsynth_cpu_threads" in os.environ:
        env["nnsynth_cpu_threads"] = os.environ["nnsynth_cpu_threads"]
    env.update({name: str(folder) for name, folder in nnunet_folders.items()})
    env.update(extra)
    return env


def run_command(args, env, timeout=1200):   # a safety net: about 2 minutes on an idle 2-core machine
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def load_plans(preprocessed, plans=PLANS):
    with open(preprocessed / f"{plans}.json") as handle:
        return json.load(handle)


def load_json(path):
    with open(path) as handle:
        return json.load(handle)


def make_trainer(preprocessed, trainer_class, configuration="2d", plans=None, fold=0):
    """A trainer built in this process on CPU, as nnUNetv2_train builds it (a new run)."""
    import torch
    plans = dict(plans or load_plans(preprocessed, CPU_PLANS), continue_training=False)
    return trainer_class(plans, configuration, fold, load_json(preprocessed / "dataset.json"), torch.device("cpu"))


@pytest.fixture(scope="session")
def planned_dataset(synthetic_example_dataset, nnunet_folders):
    """Stock nnUNetv2_plan_and_preprocess (2d) of Dataset981 in a clean subprocess (on a sampled fingerprint,
    ``sampled_fingerprint.py``), plus small CPU plans sharing its data. Returns its nnUNet_preprocessed folder."""
    from nnunet_synth.evaluation.cpu_plans import write_cpu_plans
    # nnUNet_n_proc_DA=0 makes 2.8.1's planner call torch.set_num_threads(0): leave it unset for planning
    write_sampled_fingerprint(SYNTHMIX_DATASET_ID, clean_environment(nnunet_folders))
    run_command(["nnUNetv2_plan_and_preprocess", "-d", str(SYNTHMIX_DATASET_ID), "-c", "2d", "-np", "1", "-npfp", "1",
                 "--verify_dataset_integrity"], clean_environment(nnunet_folders))
    preprocessed = nnunet_folders["nnUNet_preprocessed"] / synthetic_example_dataset.name
    write_cpu_plans(preprocessed, "2d", PLANS, CPU_PLANS)
    return preprocessed
