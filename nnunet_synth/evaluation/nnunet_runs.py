"""The stock nnU-Net commands as a user runs them (subprocesses), for the demo and the downstream evaluation."""
import functools
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from nnunet_synth.dataset import RawDataset
from nnunet_synth.errors import NnsynthError
from nnunet_synth.trainer_lookup import ext_trainer_value

STOCK_PLANNER = "ExperimentPlanner"            # nnUNetv2_plan_and_preprocess's default -pl
CPU_SUFFIX = "_cpu"
CPU_PLANS = "nnUNetPlans" + CPU_SUFFIX
RESENC_PLANNERS = ("nnUNetPlannerResEncM", "nnUNetPlannerResEncL", "nnUNetPlannerResEncXL")


@functools.lru_cache(maxsize=None)
def planner_plans_name(planner: str) -> str:
    """The plans name nnU-Net's experiment planner class ``planner`` writes (its ``plans_name`` default):
    ``nnUNetPlans`` for ExperimentPlanner, ``nnUNetResEncUNetMPlans`` for nnUNetPlannerResEncM, ... The class is
    found as ``nnUNetv2_plan_and_preprocess -pl`` finds it."""
    import nnunetv2
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    planner_class = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "experiment_planning"), planner,
                                                current_module="nnunetv2.experiment_planning")
    if not isinstance(planner_class, type) or not issubclass(planner_class, ExperimentPlanner):
        raise NnsynthError(f"--planner {planner}: nnU-Net has no experiment planner of that name: use "
                           f"{STOCK_PLANNER} (nnU-Net's default), {', '.join(RESENC_PLANNERS)} (the residual-encoder "
                           f"presets) or another planner class under nnunetv2/experiment_planning")
    plans_name = inspect.signature(planner_class).parameters.get("plans_name")
    if plans_name is None or not isinstance(plans_name.default, str):
        raise NnsynthError(f"--planner {planner}: {planner_class.__module__}.{planner} has no default plans name "
                           f"(its plans_name argument), so the plans it writes are not known here: use a planner "
                           f"that has one, e.g. {STOCK_PLANNER} or {RESENC_PLANNERS[0]}")
    return plans_name.default


def run_stock_command(args, unset=(), **environment):
    """Run an nnU-Net command with our trainers visible; on failure, show its output's tail and stop with one line."""
    env = {**os.environ, "nnUNet_extTrainer": ext_trainer_value(os.environ.get("nnUNet_extTrainer")),
           "nnUNet_compile": os.environ.get("nnUNet_compile", "f"), **environment}
    for name in unset:
        env.pop(name, None)
    # the nnU-Net commands were installed beside this interpreter, which need not be on PATH (.venv/bin/nnsynth_demo)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    print(f"$ {' '.join(args)}", flush=True)
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print((result.stdout + result.stderr)[-4000:])
        raise NnsynthError(f"'{' '.join(args)}' failed with exit status {result.returncode} (its output is above)")
    return result


def plan_and_preprocess(dataset: RawDataset, preprocessed_root, cpu_plans: bool, configuration: str = "2d",
                        planner: str = STOCK_PLANNER) -> str:
    """Stock planning (``-pl planner``) and preprocessing of ``configuration``; with ``cpu_plans`` also the small
    CPU plans (``<plans>_cpu``). Returns the plans name to train with."""
    from nnunet_synth.evaluation.cpu_plans import write_cpu_plans
    # nnUNet_n_proc_DA=0 makes nnU-Net 2.8's planner call torch.set_num_threads(0): leave it out here
    dataset_id = dataset.name.split("_")[0][len("Dataset"):]        # this command takes ids only
    run_stock_command(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", configuration, "-pl", planner, "-np",
                       "1", "-npfp", "1", "--verify_dataset_integrity"], unset=["nnUNet_n_proc_DA"])
    plans = planner_plans_name(planner)
    if not cpu_plans:
        return plans
    write_cpu_plans(Path(preprocessed_root) / dataset.name, configuration, plans, plans + CPU_SUFFIX)
    return plans + CPU_SUFFIX


def reuse_preprocessed(planned: RawDataset, dataset: RawDataset, preprocessed_root, plans: str,
                       configuration: str = "2d", planner: str = STOCK_PLANNER) -> str:
    """Give ``dataset`` the plans and preprocessed cases of ``planned``, an arm of the same setting planned by
    ``plan_and_preprocess``: both hold copies of the same real files, so nnU-Net would plan and preprocess them
    the same, and every arm of a setting then trains on the same plans. Copies the fingerprint, the plans
    ``planner`` wrote and ``plans`` (with nnU-Net's ``dataset_name`` rewritten: the trainer finds the preprocessed
    folder by it), the configuration's preprocessed cases and ``gt_segmentations/``; returns the plans name."""
    from nnunet_synth.atomic import copy_file_atomic, write_json_atomic
    source, target = Path(preprocessed_root) / planned.name, Path(preprocessed_root) / dataset.name
    plan_names = dict.fromkeys([planner_plans_name(planner), plans])
    data_identifiers = set()
    for name in plan_names:
        content = json.loads((source / f"{name}.json").read_text())
        content["dataset_name"] = dataset.name
        data_identifiers.add(content["configurations"][configuration]["data_identifier"])
        write_json_atomic(content, target / f"{name}.json")
    for name in ("dataset.json", "dataset_fingerprint.json"):
        copy_file_atomic(source / name, target / name)
    for folder in sorted(data_identifiers) + ["gt_segmentations"]:
        for path in sorted((source / folder).iterdir()):
            destination = target / folder / path.name
            if not destination.is_file() or destination.stat().st_size != path.stat().st_size:
                copy_file_atomic(path, destination)
    return plans


def train(dataset: RawDataset, trainer: str, plans: str, fold, device: str, configuration: str = "2d",
          **environment):
    run_stock_command(["nnUNetv2_train", dataset.name, configuration, str(fold), "-tr", trainer, "-p", plans,
                       "-device", device], **environment)


def predict_and_score(dataset: RawDataset, image_files, label_folder, output_folder, trainer: str, plans: str,
                      fold, device: str, per_case: bool = False, tta: bool = True, configuration: str = "2d"):
    """Stock nnUNetv2_predict on ``image_files``, then nnU-Net's own evaluation against ``label_folder``.

    Returns ``{label name: mean Dice}`` over the predicted cases; with ``per_case`` also
    ``{case id: {label name: Dice or None}}`` (None: the class is in neither reference nor prediction).
    """
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    output_folder = Path(output_folder)
    input_folder = output_folder.parent / (output_folder.name + "_input")
    shutil.rmtree(input_folder, ignore_errors=True)
    input_folder.mkdir(parents=True)
    for image_file in image_files:
        shutil.copy(image_file, input_folder)
    # on a CPU the predictor has the cores to itself: -npp 0 -nps 0 is nnU-Net's sequential path, whose output is the
    # same, without the two spawned worker processes that each import torch and nnU-Net again (seconds per call)
    workers = "0" if device == "cpu" else "1"
    run_stock_command(["nnUNetv2_predict", "-i", str(input_folder), "-o", str(output_folder), "-d", dataset.name,
                       "-c", configuration, "-p", plans, "-tr", trainer, "-f", str(fold), "-device", device,
                       "-npp", workers, "-nps", workers] + ([] if tta else ["--disable_tta"]))
    labels = [value for value in dataset.labels.values() if value != 0]
    names = {value: name for name, value in dataset.labels.items()}
    # nnU-Net's per-case evaluation (compute_metrics), here in this process: compute_metrics_on_folder runs it in a
    # spawned pool whose worker imports the calling command again (torch, diffusers, nnU-Net: about 10 s per call)
    dice_per_case = {}
    for prediction_file in sorted(output_folder.glob("*" + dataset.file_ending)):
        metrics = compute_metrics(str(Path(label_folder) / prediction_file.name), str(prediction_file),
                                  dataset.reader_writer(), labels)["metrics"]
        dice_per_case[prediction_file.name[:-len(dataset.file_ending)]] = {names[value]: float(metrics[value]["Dice"])
                                                                           for value in labels}
    means = {names[value]: float(np.nanmean([dice[names[value]] for dice in dice_per_case.values()]))
             for value in labels}
    cases = {case_id: {name: None if np.isnan(value) else value for name, value in dice.items()}
             for case_id, dice in dice_per_case.items()}
    return (means, cases) if per_case else means
