"""Five-fold cross-validation with synthetic data on the small real example: ``nnsynth_generate --folds 0 1 2 3 4``
and the stock ``nnUNetv2_plan_and_preprocess``, then per fold the cases nnUNetTrainerSynthMix takes (fast, in
this process) and the stock ``nnUNetv2_train`` for every fold (debug budget, CPU plans) and
``nnUNetv2_find_best_configuration``. Per fold, no synthetic case the trainer uses depends on one of that fold's
validation cases, and every fold uses the cases made for it."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sampled_fingerprint import write_sampled_fingerprint

from nnunet_synth.dataset import RawDataset
from nnunet_synth.generator import TrainingSettings
from nnunet_synth.generator.checkpoints import generator_run_folder
from nnunet_synth.generator.training import train_generator
from nnunet_synth.provenance import case_dependencies
from nnunet_synth.writer.synthetic_store import SyntheticStore

DATASET_ID = 988
TRAINER = "nnUNetTrainerSynthMix_debug"
CPU_PLANS = "nnUNetPlans_cpu"
CASES_PER_FOLD = 4
VENV_BIN = str(Path(sys.executable).parent)


def environment(nnunet_folders, **extra) -> dict:
    from nnunet_synth.dataset_tools.trainer_dir import trainer_directory
    env = {"PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ["HOME"],
           "nnUNet_extTrainer": str(trainer_directory()), "nnUNet_def_n_proc": "1", "nnUNet_compile": "f",
           "OMP_NUM_THREADS": "1", "nnsynth_cpu_threads": "1"}
    env.update({name: str(folder) for name, folder in nnunet_folders.items()})
    env.update(extra)
    return env


def run(args, env, timeout=1800):      # a safety net for a loaded 2-core machine
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def five_fold_dataset(nnunet_folders):
    """The example with synthetic cases for all five folds, planned and preprocessed (on a sampled fingerprint,
    ``sampled_fingerprint.py``); returns the RawDataset."""
    from conftest import convert_example_subset

    from nnunet_synth.evaluation.cpu_plans import write_cpu_plans
    folder = convert_example_subset(nnunet_folders["nnUNet_raw"], DATASET_ID, "FiveFoldExample")
    dataset = RawDataset(folder)
    # one small generator per fold, where nnsynth_generate looks for it (a real run trains them itself)
    fast = TrainingSettings(preset="tiny", image_size=32, batch_size=4, max_steps=2, warmup_steps=1,
                            checkpoint_every=100, preview_every=100, preview_inference_steps=2)
    for fold in range(5):
        train_generator(dataset, generator_run_folder(dataset.name, "tiny", fold), fast, fold=fold, progress=False)
    env = environment(nnunet_folders)
    generated = run(["nnsynth_generate", str(DATASET_ID), "--folds", "0", "1", "2", "3", "4", "--preset", "tiny",
                     "-n", str(CASES_PER_FOLD), "--inference-steps", "2", "--device", "cpu"], env)
    assert all(f"fold {fold}: {CASES_PER_FOLD} synthetic cases" in generated.stdout for fold in range(5))
    write_sampled_fingerprint(DATASET_ID, env)
    run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "1", "-npfp", "1",
         "--verify_dataset_integrity"], env)
    write_cpu_plans(nnunet_folders["nnUNet_preprocessed"] / dataset.name, "2d", "nnUNetPlans", CPU_PLANS)
    return dataset


def check_fold(store, fold, used, validation_cases):
    assert len(used) == CASES_PER_FOLD
    for case_id in used:
        assert store.cases[case_id]["fold"] == str(fold)
        assert not case_dependencies(store.cases[case_id], store.manifest["folds"]) & set(validation_cases)


@pytest.mark.slow
def test_each_fold_takes_only_its_own_cases(five_fold_dataset, nnunet_folders, monkeypatch, capsys):
    import torch

    from nnunet_synth.trainers.variants.budgets import nnUNetTrainerSynthMix_debug
    monkeypatch.setenv("nnsynth_ratio", "0.5")
    monkeypatch.setenv("nnsynth_min_quality", "none")      # a 2-step generator's cases: the fold rule, not the gate
    preprocessed = nnunet_folders["nnUNet_preprocessed"] / five_fold_dataset.name
    plans = json.loads((preprocessed / f"{CPU_PLANS}.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    store = SyntheticStore(five_fold_dataset)

    def make_trainer(fold):       # nnUNetTrainer pops "continue_training" from the plans it gets
        return nnUNetTrainerSynthMix_debug(dict(plans, continue_training=False), "2d", fold, dataset_json,
                                           torch.device("cpu"))

    for fold in range(5):
        trainer = make_trainer(fold)
        dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()
        check_fold(store, fold, dataset_tr.synthetic_identifiers, dataset_val.identifiers)
        assert trainer.synth_summary["provenance"]["dropped_for_leakage"] == 4 * CASES_PER_FOLD
    with pytest.raises(SystemExit) as exit_info:      # the trainer ends nnUNetv2_train with one line, status 2
        make_trainer("all").get_tr_and_val_datasets()
    assert exit_info.value.code == 2
    assert re.search("none of the 20 was made for fold all.*--fold all", capsys.readouterr().err)


@pytest.mark.slow
def test_five_fold_stock_training_and_find_best_configuration(five_fold_dataset, nnunet_folders):
    """About 3 minutes on an idle 2-core machine."""
    env = environment(nnunet_folders)
    train_env = dict(env, nnUNet_n_proc_DA="0", nnsynth_ratio="0.5", nnsynth_min_quality="none")
    for fold in range(5):
        run(["nnUNetv2_train", str(DATASET_ID), "2d", str(fold), "-tr", TRAINER, "-p", CPU_PLANS, "-device", "cpu"],
            train_env)
    run(["nnUNetv2_find_best_configuration", str(DATASET_ID), "-c", "2d", "-tr", TRAINER, "-p", CPU_PLANS,
         "-f", "0", "1", "2", "3", "4", "--disable_ensembling"], env)
    store = SyntheticStore(five_fold_dataset)
    preprocessed = nnunet_folders["nnUNet_preprocessed"] / five_fold_dataset.name
    splits = json.loads((preprocessed / "splits_final.json").read_text())
    model_folder = nnunet_folders["nnUNet_results"] / five_fold_dataset.name / f"{TRAINER}__{CPU_PLANS}__2d"
    for fold, split in enumerate(splits):
        summary = json.loads((model_folder / f"fold_{fold}" / "synthmix.json").read_text())
        check_fold(store, fold, summary["used_synthetic_cases"], split["val"])
        assert summary["provenance"]["dropped_for_leakage"] == 4 * CASES_PER_FOLD
    assert (nnunet_folders["nnUNet_results"] / five_fold_dataset.name / "inference_information.json").is_file()
