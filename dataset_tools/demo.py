"""The main job on a small example, on CPU, inside one demo folder (its own nnUNet_raw, nnUNet_preprocessed and
nnUNet_results):

1. draw the generated chest-CT example (5 patients of 8 slices, see nnunet_synth.example.phantom) into the demo
   folder and convert it into Dataset990_ChestPhantom; with --source, convert --patients patients of real slices
   in the COVID-19 layout (cases.csv, ct/, lungs/, covid/) into Dataset991_DemoSlices instead;
2. nnsynth_generate --image-source inpaint: train a tiny inpainting generator on fold 0's training cases, make
   class-balanced label maps, draw the new lesions inside real slices (every other pixel stays real), score the
   cases with the model-free gate and save the preview grid (--image-source generator or copy-paste instead);
3. the stock nnUNetv2_plan_and_preprocess (2d) plus small CPU plans that share its preprocessed data;
4. the stock nnUNetv2_train with nnUNetTrainerSynthMix_demo (250 iterations, real + the synthetic cases that pass
   the model-free gate, no final validation: step 5 predicts the same patient), and how many were used;
5. the stock nnUNetv2_predict on fold 0's validation cases, scored with nnU-Net's own evaluation.

A 250-iteration CPU model and a few-hundred-step generator show that the loop runs; they say nothing about
what synthetic data does for a real model (that needs the GPU budgets of the README).
"""
import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from nnunet_synth.atomic import write_json_atomic
from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.splits import real_crossval_split
from nnunet_synth.dataset.validation import check_number_range
from nnunet_synth.dataset_tools.check_dataset import print_summary
from nnunet_synth.dataset_tools.convert_covid19_ct_slices import (
    convert_covid19_ct_slices,
    read_case_table,
    select_slices,
)
from nnunet_synth.dataset_tools.dataset_target import dataset_folder_name
from nnunet_synth.errors import CommandParser, NnsynthError, command_entry_point
from nnunet_synth.evaluation.nnunet_runs import CPU_PLANS, plan_and_preprocess, predict_and_score, train
from nnunet_synth.example.phantom import PHANTOM_ABOUT, PhantomSettings, write_chest_phantom
from nnunet_synth.generator.config import DDIM_INFERENCE_STEPS
from nnunet_synth.generator.inpaint_training import DEFAULT_INFERENCE_STEPS, DEFAULT_SAMPLER
from nnunet_synth.image_sources import IMAGE_SOURCES

PHANTOM_DATASET = (990, "ChestPhantom")
SOURCE_DATASET = (991, "DemoSlices")
DEMO_INPUT_FILE = "demo_input.json"
DEMO_FOLD = 0
DEMO_TRAINER = "nnUNetTrainerSynthMix_demo"
DEMO_INPAINT_BATCH = 4
STEPS = ("convert", "generate", "preprocess", "train", "predict")


def prepare_demo_environment(work_folder: Path) -> dict:
    """Point nnU-Net's three folders into ``work_folder`` (this process and its children)."""
    folders = {name: work_folder / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder)
    return folders


def convert_step(work_folder: Path, raw_root: Path, source, patients: int, slices_per_patient: int) -> Path:
    """Convert the demo's input (the generated example, or ``source``) into nnU-Net's raw format; return the
    dataset folder.

    A demo folder belongs to one input: its generator and synthetic cases are reused on a rerun, so a rerun with
    another input stops instead of mixing them.
    """
    if source is None:
        demo_input = {"source": "generated", **asdict(PhantomSettings())}
    else:
        first_patients = list(read_case_table(Path(source)))[:patients]   # checks the folder before any write
        cases = select_slices(Path(source), first_patients, slices_per_patient or None)
        demo_input = {"source": str(Path(source).resolve()), "patients": patients,
                      "slices_per_patient": slices_per_patient}
    input_file = work_folder / DEMO_INPUT_FILE
    if input_file.is_file():
        previous = json.loads(input_file.read_text())
        if previous != demo_input:
            raise NnsynthError(f"{input_file}: this demo folder holds the demo of {describe_input(previous)}, not "
                               f"of {describe_input(demo_input)}: pass another -o (or remove the folder)")
    elif any(raw_root.glob("Dataset*")):
        raise NnsynthError(f"{raw_root}: this demo folder holds datasets of an earlier nnsynth_demo version: pass "
                           f"another -o (or remove the folder)")
    write_json_atomic(demo_input, input_file)
    dataset_id, dataset_name = PHANTOM_DATASET if source is None else SOURCE_DATASET
    converted = raw_root / dataset_folder_name(dataset_id, dataset_name)
    if source is None:
        phantom_folder = write_chest_phantom(work_folder / "chest_phantom")
        print(f"generated example (no real data) written to {phantom_folder}")
    if (converted / "dataset.json").is_file():
        return converted        # a rerun of this demo: its dataset (and the synthetic cases beside it) are kept
    if source is None:
        return convert_covid19_ct_slices(phantom_folder, raw_root, dataset_id, dataset_name, about=PHANTOM_ABOUT)
    return convert_covid19_ct_slices(source, raw_root, dataset_id, dataset_name, cases=cases)


def describe_input(demo_input: dict) -> str:
    if demo_input["source"] == "generated":
        return f"the generated example (seed {demo_input.get('seed')})"
    slices = demo_input["slices_per_patient"] or "all"
    return f"{demo_input['source']} ({demo_input['patients']} patients, slices per patient: {slices})"


def generate_step(dataset: RawDataset, image_source: str, generator_steps: int, ratio: float, inference_steps: int,
                  device: str) -> dict:
    """Fold 0's synthetic cases from ``image_source``: inpaint (a tiny inpainting generator draws the new lesions
    inside real slices), generator (a tiny whole-slice generator) or copy-paste (real lesion pixels, no model)."""
    from nnunet_synth.generate_step import generate
    from nnunet_synth.generator.checkpoints import generator_run_folder
    from nnunet_synth.image_sources import image_source as source_named
    from nnunet_synth.preflight import GenerateRequest
    source = source_named(image_source)
    mode = source.generator_mode
    training = dict(batch_size=DEMO_INPAINT_BATCH if mode == "inpaint" else None,
                    warmup_steps=min(100, generator_steps // 4), learning_rate=1e-3,
                    checkpoint_every=max(1, generator_steps // 2), preview_every=generator_steps,
                    preview_inference_steps=inference_steps or source.default_inference_steps())
    request = GenerateRequest(folds=[str(DEMO_FOLD)], image_source=image_source, preset="tiny",
                              train_steps=generator_steps, device=device, num_inference_steps=inference_steps,
                              ratio=ratio, training=training)
    [summary] = generate(dataset, request, progress=False)
    if mode is not None:
        run_folder = generator_run_folder(dataset.name, "tiny", DEMO_FOLD, mode)
        print(f"generator training previews: {run_folder / 'previews'}")
    print(f"{summary['total']} synthetic cases ({image_source}) in {dataset.folder / 'imagesSynth'}; the model-free "
          f"quality gate passed {summary['model_free_passed']} of {summary['total']}")
    print(f"preview grid: {summary['preview']}")
    return summary


def report_used_cases(results_root: Path, dataset: RawDataset):
    """How many synthetic cases the trainer's quality filter kept (by default: those that pass the model-free gate)."""
    summary_file = (results_root / dataset.name / f"{DEMO_TRAINER}__{CPU_PLANS}__2d" / f"fold_{DEMO_FOLD}" /
                    "synthmix.json")
    summary = json.loads(summary_file.read_text())
    counts, settings = summary["synthetic_cases"], summary["settings"]
    print(f"nnU-Net trained on {counts['used']} of {counts['available']} synthetic cases (quality filter: "
          f"{settings['quality_key']} score >= {settings['min_quality']}) beside "
          f"{summary['real_training_cases']} real training cases; {summary_file}")


def predict_step(dataset: RawDataset, work_folder: Path, results_root: Path, device: str) -> dict:
    validation_cases = sorted(real_crossval_split(dataset)[0][DEMO_FOLD]["val"])
    image_files = [image for case_id in validation_cases for image in dataset.cases[case_id]["images"]]
    dice = predict_and_score(dataset, image_files, dataset.folder / "labelsTr", work_folder / "predictions",
                             DEMO_TRAINER, CPU_PLANS, DEMO_FOLD, device)
    model_folder = results_root / dataset.name / f"{DEMO_TRAINER}__{CPU_PLANS}__2d"
    print(f"model: {model_folder} (SynthMix settings and counts: "
          f"{model_folder / f'fold_{DEMO_FOLD}' / 'synthmix.json'})")
    print(f"predictions of validation cases {validation_cases}: {work_folder / 'predictions'}; "
          f"Dice per class: { {name: round(value, 3) for name, value in dice.items()} }")
    return dice


@command_entry_point
def main(argv=None):
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--work-folder", default="nnsynth_demo", help="where the demo writes everything")
    parser.add_argument("--source", metavar="FOLDER",
                        help="real slices in the COVID-19 layout (cases.csv, ct/, lungs/, covid/) instead of the "
                             "generated example, e.g. ../shared/data/covid19_ct_slices")
    parser.add_argument("--patients", type=int, default=5, help="with --source: its first N patients (default 5)")
    parser.add_argument("--slices-per-patient", type=int, default=8,
                        help="with --source: every k-th slice of a patient, at most this many (0: all; default 8)")
    parser.add_argument("--stop-after", choices=STEPS, default="predict", help="end the demo after this step")
    parser.add_argument("--image-source", choices=tuple(IMAGE_SOURCES), default="inpaint",
                        help="inpaint (default): new lesions drawn inside real slices by a tiny inpainting generator; "
                             "generator: whole slices from a tiny generator (Diff-Lung); copy-paste: real lesion "
                             "pixels, no model")
    parser.add_argument("--generator-steps", type=int, default=300, help="tiny-generator training steps")
    parser.add_argument("--ratio", type=float, default=0.5, help="synthetic cases per real training slice")
    parser.add_argument("--inference-steps", type=int,
                        help=f"sampling steps (default: {DEFAULT_INFERENCE_STEPS} {DEFAULT_SAMPLER} steps for inpaint, "
                             f"{DDIM_INFERENCE_STEPS} DDIM steps for generator)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.generator_steps < 1:
        raise NnsynthError(f"--generator-steps must be at least 1, got {args.generator_steps}")
    if args.patients < 1 or args.slices_per_patient < 0:
        raise NnsynthError(f"--patients must be at least 1 and --slices-per-patient at least 0, got {args.patients} "
                           f"and {args.slices_per_patient}")
    check_number_range(args.ratio, "--ratio", low=0, low_open=True)
    work_folder = Path(args.work_folder).resolve()
    folders = prepare_demo_environment(work_folder)
    timings = {}

    def step_done(name):
        timings[name] = time.perf_counter() - started
        print(f"[demo] {name} done after {timings[name] / 60:.1f} min\n", flush=True)
        return name == args.stop_after

    started = time.perf_counter()
    dataset_folder = convert_step(work_folder, folders["nnUNet_raw"], args.source, args.patients,
                                  args.slices_per_patient)
    print_summary(dataset_folder)
    print(f"demo dataset written to {dataset_folder}")
    if step_done("convert"):
        return
    dataset = RawDataset(dataset_folder)
    generate_step(dataset, args.image_source, args.generator_steps, args.ratio, args.inference_steps, args.device)
    if step_done("generate"):
        return
    plan_and_preprocess(dataset, folders["nnUNet_preprocessed"], cpu_plans=True)
    if step_done("preprocess"):
        return
    train(dataset, DEMO_TRAINER, CPU_PLANS, DEMO_FOLD, args.device, nnUNet_n_proc_DA="0")
    report_used_cases(folders["nnUNet_results"], dataset)
    if step_done("train"):
        return
    predict_step(dataset, work_folder, folders["nnUNet_results"], args.device)
    step_done("predict")


if __name__ == "__main__":
    main()
