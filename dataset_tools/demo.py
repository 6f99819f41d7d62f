"""The main job on the embedded example, on CPU, inside one demo folder (its own nnUNet_raw,
nnUNet_preprocessed and nnUNet_results):

1. convert the shipped COVID-19 subset into Dataset990_Covid19Example (5 patients, 37 slices);
2. nnsynth_generate: train a tiny generator on fold 0's training cases, make class-balanced label maps,
   sample synthetic cases, score them and save the preview grid;
3. the stock nnUNetv2_plan_and_preprocess (2d) plus small CPU plans that share its preprocessed data;
4. the stock nnUNetv2_train with nnUNetTrainerSynthMix_demo (500 iterations, real + synthetic);
5. the stock nnUNetv2_predict on fold 0's validation cases, scored with nnU-Net's own evaluation.

A 500-iteration CPU model and a few-hundred-step generator show that the loop runs; they say nothing about
what synthetic data does for a real model (that needs the GPU budgets of the README).
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.splits import real_crossval_split
from nnunet_synth.dataset_tools.check_dataset import print_summary
from nnunet_synth.dataset_tools.convert_covid19_ct_slices import convert_covid19_ct_slices
from nnunet_synth.dataset_tools.trainer_dir import ext_trainer_value
from nnunet_synth.errors import NnsynthError, command_entry_point
from nnunet_synth.example import example_source_folder

DEMO_DATASET_ID = 990
DEMO_DATASET_NAME = "Covid19Example"
DEMO_FOLD = 0
DEMO_TRAINER = "nnUNetTrainerSynthMix_demo"
CPU_PLANS = "nnUNetPlans_cpu"
STEPS = ("convert", "generate", "preprocess", "train", "predict")


def prepare_demo_environment(work_folder: Path) -> dict:
    """Point nnU-Net's three folders into ``work_folder`` (this process and its children)."""
    folders = {name: work_folder / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder)
    return folders


def run_stock_command(args, unset=(), **environment):
    """Run an nnU-Net command as a user would; on failure, show its output's tail and stop with one line."""
    env = {**os.environ, "nnUNet_extTrainer": ext_trainer_value(os.environ.get("nnUNet_extTrainer")),
           "nnUNet_compile": "f", **environment}
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


def generate_step(dataset: RawDataset, generator_steps: int, ratio: float, inference_steps: int, device: str):
    from nnunet_synth.generation import GenerationSettings, generate_synthetic_cases, num_cases_for_ratio
    from nnunet_synth.generator.checkpoints import FINAL_FOLDER, generator_run_folder
    from nnunet_synth.generator.config import TrainingSettings
    from nnunet_synth.generator.training import train_generator
    run_folder = generator_run_folder(dataset.name, "tiny", DEMO_FOLD)
    if not (run_folder / FINAL_FOLDER).is_dir():
        settings = TrainingSettings(preset="tiny", max_steps=generator_steps, warmup_steps=min(100, generator_steps // 4),
                                    learning_rate=1e-3, checkpoint_every=max(1, generator_steps // 2),
                                    preview_every=generator_steps, preview_inference_steps=inference_steps)
        train_generator(dataset, run_folder, settings, fold=DEMO_FOLD)
    generator = run_folder / FINAL_FOLDER
    settings = GenerationSettings(num_cases=num_cases_for_ratio(dataset, generator, ratio), seed=0,
                                  num_inference_steps=inference_steps)
    summary = generate_synthetic_cases(dataset, generator, settings, device=device)
    print(f"{summary['total']} synthetic cases in {dataset.folder / 'imagesSynth'} "
          f"(model-free quality gate passed by {summary['model_free_passed']})")
    print(f"preview grid (real | new label map | synthetic | synthetic + labels): {summary['preview']}")
    print(f"generator training previews: {run_folder / 'previews'}")
    return summary


def preprocess_step(dataset: RawDataset, preprocessed_root: Path):
    from nnunet_synth.trainers.cpu_plans import write_cpu_plans
    # nnUNet_n_proc_DA=0 makes nnU-Net 2.8's planner call torch.set_num_threads(0): leave it out here
    run_stock_command(["nnUNetv2_plan_and_preprocess", "-d", str(DEMO_DATASET_ID), "-c", "2d", "-np", "1",
                       "--verify_dataset_integrity"], unset=["nnUNet_n_proc_DA"])
    return write_cpu_plans(preprocessed_root / dataset.name, "2d", "nnUNetPlans", CPU_PLANS)


def train_step(device: str):
    run_stock_command(["nnUNetv2_train", str(DEMO_DATASET_ID), "2d", str(DEMO_FOLD), "-tr", DEMO_TRAINER,
                       "-p", CPU_PLANS, "-device", device], nnUNet_n_proc_DA="0")


def predict_step(dataset: RawDataset, work_folder: Path, results_root: Path, device: str) -> dict:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    validation_cases = sorted(real_crossval_split(dataset)[0][DEMO_FOLD]["val"])
    input_folder, output_folder = work_folder / "predict_input", work_folder / "predictions"
    shutil.rmtree(input_folder, ignore_errors=True)
    input_folder.mkdir()
    for case_id in validation_cases:
        for image_file in dataset.cases[case_id]["images"]:
            shutil.copy(image_file, input_folder)
    run_stock_command(["nnUNetv2_predict", "-i", str(input_folder), "-o", str(output_folder), "-d",
                       str(DEMO_DATASET_ID), "-c", "2d", "-p", CPU_PLANS, "-tr", DEMO_TRAINER, "-f", str(DEMO_FOLD),
                       "-device", device, "-npp", "1", "-nps", "1"])
    labels = [value for value in dataset.labels.values() if value != 0]
    metrics = compute_metrics_on_folder(str(dataset.folder / "labelsTr"), str(output_folder),
                                        str(output_folder / "summary.json"), dataset.reader_writer(),
                                        dataset.file_ending, labels, num_processes=1, chill=True)
    names = {value: name for name, value in dataset.labels.items()}
    dice = {names[int(value)]: round(float(scores["Dice"]), 3) for value, scores in metrics["mean"].items()}
    model_folder = results_root / dataset.name / f"{DEMO_TRAINER}__{CPU_PLANS}__2d"
    print(f"model: {model_folder} (SynthMix settings and counts: {model_folder / f'fold_{DEMO_FOLD}' / 'synthmix.json'})")
    print(f"predictions of validation cases {validation_cases}: {output_folder}; Dice per class: {dice}")
    return dice


@command_entry_point
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--work-folder", default="nnsynth_demo", help="where the demo writes everything")
    parser.add_argument("--stop-after", choices=STEPS, default="predict", help="end the demo after this step")
    parser.add_argument("--generator-steps", type=int, default=400, help="tiny-generator training steps")
    parser.add_argument("--ratio", type=float, default=0.5, help="synthetic cases per real training slice")
    parser.add_argument("--inference-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.generator_steps < 1:
        raise NnsynthError(f"--generator-steps must be at least 1, got {args.generator_steps}")
    work_folder = Path(args.work_folder).resolve()
    folders = prepare_demo_environment(work_folder)
    timings = {}

    def step_done(name):
        timings[name] = time.perf_counter() - started
        print(f"[demo] {name} done after {timings[name] / 60:.1f} min\n", flush=True)
        return name == args.stop_after

    started = time.perf_counter()
    dataset_folder = convert_covid19_ct_slices(example_source_folder(), folders["nnUNet_raw"],
                                               DEMO_DATASET_ID, DEMO_DATASET_NAME)
    print_summary(dataset_folder)
    print(f"demo dataset written to {dataset_folder}")
    if step_done("convert"):
        return
    dataset = RawDataset(dataset_folder)
    generate_step(dataset, args.generator_steps, args.ratio, args.inference_steps, args.device)
    if step_done("generate"):
        return
    preprocess_step(dataset, folders["nnUNet_preprocessed"])
    if step_done("preprocess"):
        return
    train_step(args.device)
    if step_done("train"):
        return
    predict_step(dataset, work_folder, folders["nnUNet_results"], args.device)
    step_done("predict")


if __name__ == "__main__":
    main()
