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
import time
from pathlib import Path

from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.splits import real_crossval_split
from nnunet_synth.dataset_tools.check_dataset import print_summary
from nnunet_synth.dataset_tools.convert_covid19_ct_slices import convert_covid19_ct_slices
from nnunet_synth.errors import NnsynthError, command_entry_point
from nnunet_synth.evaluation.nnunet_runs import CPU_PLANS, plan_and_preprocess, predict_and_score, train
from nnunet_synth.example import example_source_folder

DEMO_DATASET_ID = 990
DEMO_DATASET_NAME = "Covid19Example"
DEMO_FOLD = 0
DEMO_TRAINER = "nnUNetTrainerSynthMix_demo"
STEPS = ("convert", "generate", "preprocess", "train", "predict")


def prepare_demo_environment(work_folder: Path) -> dict:
    """Point nnU-Net's three folders into ``work_folder`` (this process and its children)."""
    folders = {name: work_folder / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder)
    return folders


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


def predict_step(dataset: RawDataset, work_folder: Path, results_root: Path, device: str) -> dict:
    validation_cases = sorted(real_crossval_split(dataset)[0][DEMO_FOLD]["val"])
    image_files = [image for case_id in validation_cases for image in dataset.cases[case_id]["images"]]
    dice = predict_and_score(dataset, image_files, dataset.folder / "labelsTr", work_folder / "predictions",
                             DEMO_TRAINER, CPU_PLANS, DEMO_FOLD, device)
    model_folder = results_root / dataset.name / f"{DEMO_TRAINER}__{CPU_PLANS}__2d"
    print(f"model: {model_folder} (SynthMix settings and counts: {model_folder / f'fold_{DEMO_FOLD}' / 'synthmix.json'})")
    print(f"predictions of validation cases {validation_cases}: {work_folder / 'predictions'}; "
          f"Dice per class: { {name: round(value, 3) for name, value in dice.items()} }")
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
    plan_and_preprocess(dataset, folders["nnUNet_preprocessed"], cpu_plans=True)
    if step_done("preprocess"):
        return
    train(dataset, DEMO_TRAINER, CPU_PLANS, DEMO_FOLD, args.device, nnUNet_n_proc_DA="0")
    if step_done("train"):
        return
    predict_step(dataset, work_folder, folders["nnUNet_results"], args.device)
    step_done("predict")


if __name__ == "__main__":
    main()
