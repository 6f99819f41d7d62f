"""Evaluate generators and synthetic data; results go to $nnUNet_results/<Dataset>/nnsynth_evaluation/.

  nnsynth_evaluate fidelity D --generator cbmat=RUN_FOLDER --generator mat=RUN_FOLDER [--feature-model MODEL]
  nnsynth_evaluate fidelity D --inpaint-generator RUN_FOLDER [--generator slice=RUN_FOLDER] \
      [--samplers ddim:50 dpmsolver++:10 unipc:20]      (lesion-region fidelity, docs/inpainting.md)
  nnsynth_evaluate downstream D --generator mat=RUN_FOLDER --generator cbmat=RUN_FOLDER [--amounts 0.5 1 2 3]
  nnsynth_evaluate downstream D --arms real_only oversample copy_paste mat cbmat --repeats 3 --test-patients 4 \
      --real-cases 4 8 --generator-preset tiny --generator-steps 400
  nnsynth_evaluate downstream D --arms real_only copy_paste cbmat inpaint --test-patients 4 --real-cases 4 8 \
      --compare inpaint:copy_paste cbmat:copy_paste
  nnsynth_evaluate downstream D --arms real_only copy_paste --planner nnUNetPlannerResEncM --plans default
  nnsynth_evaluate report D
  nnsynth_evaluate lesions PREDICTION_FOLDER LABEL_FOLDER -d D [--bins 20 200] [-o lesions.json]
"""
import argparse
from pathlib import Path

import torch

from nnunet_synth.dataset import RawDataset
from nnunet_synth.errors import CommandParser, NnsynthError, command_entry_point
from nnunet_synth.evaluation.downstream import BUDGET_TRAINERS, CONFIGURATIONS
from nnunet_synth.evaluation.nnunet_runs import STOCK_PLANNER
from nnunet_synth.evaluation.report import DOWNSTREAM_CSV, FIDELITY_JSON, FIDELITY_PREVIEW, record_command, write_report
from nnunet_synth.generator.inpaint_training import (
    DEFAULT_INFERENCE_STEPS,
    DEFAULT_SAMPLER,
    VOLUME_INFERENCE_STEPS,
    VOLUME_SAMPLER,
)
from nnunet_synth.nnunet_paths import nnunet_folder, require_nnunet_folder
from nnunet_synth.preflight import check_evaluation_request

EVALUATION_FOLDER = "nnsynth_evaluation"
LESION_FIDELITY_JSON = "lesion_fidelity.json"
LESION_FIDELITY_MD = "lesion_fidelity.md"
LESION_FIDELITY_PREVIEW = "lesion_fidelity_preview.png"


def named_generator(value: str):
    name, separator, folder = value.partition("=")
    if not separator or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER (e.g. cbmat=/path/to/run), got '{value}'")
    return name, folder


def arm_pair(value: str):
    arm, separator, other = value.partition(":")
    if not separator or not arm or not other or arm == other:
        raise argparse.ArgumentTypeError(f"expected ARM:OTHER_ARM (e.g. inpaint:copy_paste), got '{value}'")
    return arm, other


def sampler_steps(value: str):
    from nnunet_synth.generator.inpaint_pipeline import SAMPLERS
    sampler, separator, steps = value.partition(":")
    if not separator or sampler not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected SAMPLER:STEPS with SAMPLER one of {', '.join(SAMPLERS)} (e.g. "
                                         f"dpmsolver++:20), got '{value}'")
    return sampler, int(steps)


def build_parser() -> CommandParser:
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("fidelity", "downstream", "report"):
        sub = commands.add_parser(name)
        sub.add_argument("dataset", help="dataset folder, name or id")
        sub.add_argument("-o", "--output", help=f"evaluation folder (default $nnUNet_results/<D>/{EVALUATION_FOLDER})")
        if name == "report":
            continue
        sub.add_argument("--generator", type=named_generator, action="append", default=[], metavar="NAME=FOLDER",
                         help="a trained generator (run folder or final/); repeat to compare")
        sub.add_argument("--inference-steps", type=int, default=50, help="DDIM steps")
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    lesions = commands.add_parser("lesions", help="per-lesion metrics of a prediction folder (docs/evaluation.md)")
    lesions.add_argument("predictions", help="folder of predicted label maps")
    lesions.add_argument("labels", help="folder of the reference label maps (same file names)")
    lesions.add_argument("-d", "--dataset", required=True, help="dataset folder, name or id (labels, file ending)")
    lesions.add_argument("--bins", nargs="+", metavar="EDGE", help="size-bin edges in mm^2 (2D) or "
                         "mm^3 (3D) for every class (default: terciles of the reference lesions of LABEL_FOLDER)")
    lesions.add_argument("-o", "--output", help="write the metrics to this json file (default: print only)")
    fidelity = commands.choices["fidelity"]
    fidelity.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    fidelity.add_argument("--max-slices", type=int, help="at most this many held-out slices (evenly spread)")
    fidelity.add_argument("--feature-model", help="a 2d nnU-Net model folder trained on the real data: adds a "
                          "Frechet distance on its encoder features")
    fidelity.add_argument("--feature-fold", type=int, default=0)
    fidelity.add_argument("--inpaint-generator", metavar="FOLDER", help="an inpainting generator (--mode inpaint): "
                          "erase the lesions of its held-out slices, fill them again and compare the region with the "
                          "real pixels, beside copy-paste and the first --generator (a whole-slice generator)")
    fidelity.add_argument("--samplers", type=sampler_steps, nargs="+", metavar="SAMPLER:STEPS",
                          help="with --inpaint-generator: the samplers to compare (default ddim:50 dpmsolver++:10 "
                          "dpmsolver++:20 unipc:10 unipc:20)")
    downstream = commands.choices["downstream"]
    downstream.add_argument("--amounts", type=float, nargs="+", default=[1.0],
                            help="synthetic slices per real training slice, or volumes per real training volume "
                            "with a 3D configuration (one arm per generator and amount)")
    downstream.add_argument("--map-loads", nargs="+", default=["dense"], metavar="LOAD",
                            help="the load of the synthetic arms' new label maps, one arm per value: dense (each new "
                            "map pasted up to nnsynth_generate's --map-cap) or real (one class per new map, at a real "
                            "map's load; arm label suffix _real), as nnsynth_generate --map-load")
    downstream.add_argument("--configuration", choices=CONFIGURATIONS, default="2d",
                            help="the nnU-Net configuration every arm trains and predicts (3D ones: the copy_paste "
                            "and inpaint arms make whole volumes)")
    downstream.add_argument("--budget", choices=tuple(BUDGET_TRAINERS), default="demo",
                            help="SynthMix trainer: smoke 10 iterations, debug 20, short 100, medium 500, demo 250, "
                            "full nnU-Net's 1000 epochs (smoke, short and medium skip the fold's final validation)")
    downstream.add_argument("--planner", default=STOCK_PLANNER, help=f"nnU-Net's experiment planner of every arm "
                            f"(nnUNetv2_plan_and_preprocess -pl), e.g. nnUNetPlannerResEncM: plans "
                            f"nnUNetResEncUNetMPlans (default {STOCK_PLANNER}: plans nnUNetPlans)")
    downstream.add_argument("--plans", choices=("cpu", "default"), default="cpu",
                            help="cpu = a copy of the planner's plans with a small network for CPU runs "
                            "(<plans>_cpu); default = the planner's own plans")
    downstream.add_argument("--fold", type=int, default=0)
    downstream.add_argument("--seed", type=int, default=0)
    downstream.add_argument("--first-id", type=int, default=700, help="dataset ids of the arms' copies start here")
    downstream.add_argument("--test-images", help="evaluate on this folder (e.g. imagesTs) instead of the fold's "
                            "validation cases")
    downstream.add_argument("--test-labels", help="labels of --test-images (e.g. labelsTs)")
    downstream.add_argument("--arms", nargs="+", metavar="ARM", help="real_only, oversample (rare-class "
                            "oversampling in the trainer), copy_paste (real pixels, no generator), copy_paste_online "
                            "(lesions pasted in the data loader, nnUNetTrainerLesionPaste), mat, cbmat (a "
                            "whole-slice generator of that ablation), inpaint (the inpainting generator, CBMAT): "
                            "--generator NAME=FOLDER, else trained here; or another --generator name (default: "
                            "real_only and every --generator)")
    downstream.add_argument("--repeats", type=int, default=1, help="train every arm this many times, with "
                            "nnU-Net training seeds seed, seed+1, ...; the summary gives mean, sd and 95 %% intervals")
    downstream.add_argument("--test-patients", type=int, help="keep this many patients (seeded choice) out of "
                            "everything (generators, label maps, nnU-Net) and test on them")
    downstream.add_argument("--real-cases", type=int, nargs="+", metavar="K", help="train with K real training "
                            "patients (generators trained on the same K only); several values: a data-efficiency sweep")
    downstream.add_argument("--no-tta", action="store_true", help="predict the test set without nnU-Net's "
                            "mirroring test-time augmentation (4x faster on a CPU; the same for every arm)")
    downstream.add_argument("--test-slice-step", type=int, default=1, help="with --test-patients: test on every "
                            "n-th slice of each test patient (a smaller test of the same patients, for CPU runs)")
    downstream.add_argument("--split-seed", type=int, default=0, help="seed of the choice of test/validation/"
                            "training patients")
    downstream.add_argument("--generator-preset", default="tiny", help="preset of the generators trained here")
    downstream.add_argument("--generator-steps", type=int, default=400, help="steps of the generators trained here")
    downstream.add_argument("--generator-lr", type=float, default=1e-3, help="learning rate of the generators "
                            "trained here")
    downstream.add_argument("--inpaint-steps", type=int, default=300, help="steps of the inpainting generator "
                            "trained here for the inpaint arm (batch --inpaint-batch-size)")
    downstream.add_argument("--inpaint-batch-size", type=int, default=4, help="batch of the inpainting generator "
                            "trained here")
    downstream.add_argument("--inpaint-inference-steps", type=int,
                            help=f"sampling steps of the inpaint arm (default {DEFAULT_INFERENCE_STEPS} "
                            f"{DEFAULT_SAMPLER} steps for slices, {VOLUME_INFERENCE_STEPS} {VOLUME_SAMPLER} steps "
                            "for volumes; --inference-steps: the DDIM steps of the whole-slice generators)")
    downstream.add_argument("--compare", type=arm_pair, nargs="+", metavar="ARM:OTHER", help="the pairs of the "
                            "paired-differences table (arm names or labels, e.g. inpaint:copy_paste "
                            "cbmat:copy_paste); default: every synthetic arm against copy_paste when it runs, and "
                            "every arm against real_only")
    return parser


def evaluation_folder(dataset: RawDataset, output) -> Path:
    if output:
        folder = Path(output)
    else:
        results = require_nnunet_folder("nnUNet_results", "the default evaluation folder; or pass --output")
        folder = results / dataset.name / EVALUATION_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_lesion_fidelity(args, dataset: RawDataset, folder: Path):
    from nnunet_synth.atomic import atomic_path, write_json_atomic
    from nnunet_synth.evaluation.lesion_fidelity import (
        LesionFidelitySettings,
        evaluate_lesion_fidelity,
        format_fidelity_table,
    )
    from nnunet_synth.preview_grid import save_preview_grid
    if len(args.generator) > 1:
        raise NnsynthError("with --inpaint-generator give at most one --generator (the whole-slice generator to "
                           "compare with)")
    settings = LesionFidelitySettings(seeds=tuple(args.seeds), max_slices=args.max_slices or 24,
                                      slice_generator_steps=args.inference_steps)
    if args.samplers:
        settings.samplers = tuple(args.samplers)
    slice_generator = args.generator[0][1] if args.generator else None
    result = evaluate_lesion_fidelity(dataset, args.inpaint_generator, settings, slice_generator, args.device)
    table = format_fidelity_table(result)
    summary = {key: result[key] for key in ("rows", "slices", "held_out_cases", "seeds", "edit_margin", "edit_pixels")}
    write_json_atomic({"dataset": dataset.name, "inpaint_generator": str(args.inpaint_generator),
                       "slice_generator": slice_generator, **summary}, folder / LESION_FIDELITY_JSON)
    with atomic_path(folder / LESION_FIDELITY_MD) as temp_name:
        Path(temp_name).write_text(table + "\n")
    lesions, window = result["lesions"], result["window"]
    rows = []
    for i in range(min(6, len(lesions.images))):
        rows.append([(window.to_model(lesions.images[i]), lesions.label_maps[i]),
                     (window.to_model(lesions.images[i]) * ~lesions.edits[i], lesions.edits[i].astype(int))]
                    + [(window.to_model(filled[i]), None) for filled in result["previews"].values()])
    save_preview_grid(rows, ["real (held out) + labels", "edit region"] + list(result["previews"]),
                      folder / LESION_FIDELITY_PREVIEW, dataset.num_classes, window=(-1.0, 1.0))
    print(f"lesion-region fidelity over {result['slices']} held-out slices ({result['edit_pixels']} edit pixels, "
          f"margin {result['edit_margin']}), seeds {list(settings.seeds)}:")
    print(table)
    print(f"lesion fidelity: {folder / LESION_FIDELITY_JSON}, preview {folder / LESION_FIDELITY_PREVIEW}")


def run_fidelity(args, dataset: RawDataset, folder: Path):
    from nnunet_synth.atomic import write_json_atomic
    from nnunet_synth.evaluation.fidelity import FidelitySettings, evaluate_generator_fidelity
    from nnunet_synth.preview_grid import save_preview_grid
    features = None
    if args.feature_model:
        from nnunet_synth.evaluation.features import FeatureDistance
        features = FeatureDistance(args.feature_model, args.feature_fold, device=args.device)
    settings = FidelitySettings(seeds=tuple(args.seeds), num_inference_steps=args.inference_steps,
                                max_slices=args.max_slices)
    results, evaluated = {}, {}
    for name, generator in args.generator:
        evaluated[name] = evaluate_generator_fidelity(dataset, generator, settings, args.device, features)
        results[name] = evaluated[name]["summary"]
        summary = results[name]
        print(f"{name}: PSNR {summary['psnr']:.2f} dB, SSIM {summary['ssim']:.3f} (region: "
              f"{summary['psnr_region']:.2f} dB, {summary['ssim_region']:.3f}) over {summary['slices']} slices x "
              f"{len(summary['seeds'])} seeds")
    class_names = [name for name, _ in sorted(dataset.labels.items(), key=lambda item: item[1])]
    write_json_atomic({"dataset": dataset.name, "class_names": class_names,
                       "num_inference_steps": args.inference_steps, "generators": results}, folder / FIDELITY_JSON)
    first = next(iter(evaluated.values()))
    rows = [[(first["real"][i], first["label_maps"][i])] + [(evaluated[name]["synthetic"][i], None)
                                                            for name in evaluated]
            for i in range(min(6, len(first["real"])))]
    save_preview_grid(rows, ["real (held out) + labels"] + [f"{name} (seed {args.seeds[0]})" for name in evaluated],
                      folder / FIDELITY_PREVIEW, dataset.num_classes, window=(-1.0, 1.0))
    print(f"fidelity: {folder / FIDELITY_JSON}, preview {folder / FIDELITY_PREVIEW}")


def downstream_settings(args):
    from nnunet_synth.evaluation.arm_generators import ArmGeneratorSettings
    from nnunet_synth.evaluation.downstream import DownstreamSettings
    if not args.generator and not args.arms:
        raise NnsynthError("downstream needs arms: pass --arms (e.g. real_only oversample copy_paste mat cbmat) or "
                           "--generator NAME=FOLDER")
    return DownstreamSettings(generators=dict(args.generator), amounts=args.amounts,
                              configuration=args.configuration, budget=args.budget, planner=args.planner,
                              cpu_plans=args.plans == "cpu", fold=args.fold, seed=args.seed,
                              inference_steps=args.inference_steps,
                              inpaint_inference_steps=args.inpaint_inference_steps, first_dataset_id=args.first_id,
                              device=args.device, arms=args.arms, repeats=args.repeats,
                              test_patients=args.test_patients, real_cases=args.real_cases,
                              split_seed=args.split_seed, tta=not args.no_tta,
                              test_slice_step=args.test_slice_step, compare=args.compare,
                              map_loads=args.map_loads,
                              generator=ArmGeneratorSettings(args.generator_preset, args.generator_steps,
                                                             args.generator_lr, args.seed, args.inpaint_steps,
                                                             args.inpaint_batch_size))


def run_downstream_command(args, dataset: RawDataset, folder: Path, settings):
    from nnunet_synth.evaluation.downstream import SUMMARY_MD, run_downstream
    run_downstream(dataset, settings, dataset.folder.parent, nnunet_folder("nnUNet_preprocessed"), folder,
                   args.test_images, args.test_labels)
    print((folder / SUMMARY_MD).read_text())
    print(f"downstream: {folder / DOWNSTREAM_CSV} (one row per run), {folder / SUMMARY_MD}, plot "
          f"{folder / 'downstream.png'}")


def run_lesions_command(args):
    """Per-lesion metrics of any prediction folder; everything is checked before the output is written."""
    from nnunet_synth.atomic import write_json_atomic
    from nnunet_synth.evaluation.lesions import check_size_bins, dataset_lesion_metrics, format_lesion_table
    bins = check_size_bins(args.bins) if args.bins is not None else None
    dataset = RawDataset.from_name(args.dataset)
    if args.output and not Path(args.output).parent.is_dir():
        raise NnsynthError(f"{args.output}: its folder does not exist: create it or pass another -o")
    result = dataset_lesion_metrics(args.predictions, args.labels, dataset, bins)
    print(format_lesion_table(result))
    if args.output:
        write_json_atomic(result, Path(args.output))
        print(f"lesions: {args.output}")


@command_entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "lesions":
        return run_lesions_command(args)
    dataset = RawDataset.from_name(args.dataset)
    check_evaluation_request(dataset, args.command, args)     # before the folder is made or anything runs
    if args.command == "downstream":
        from nnunet_synth.evaluation.downstream import check_downstream_settings
        settings = downstream_settings(args)
        check_downstream_settings(settings, dataset)
    folder = evaluation_folder(dataset, args.output)
    if args.command == "fidelity" and args.inpaint_generator:
        run_lesion_fidelity(args, dataset, folder)
    elif args.command == "fidelity":
        if not args.generator:
            raise NnsynthError("fidelity needs --generator NAME=FOLDER (whole-slice generators) or "
                               "--inpaint-generator FOLDER")
        run_fidelity(args, dataset, folder)
    elif args.command == "downstream":
        require_nnunet_folder("nnUNet_preprocessed", "the downstream arms are planned there")
        run_downstream_command(args, dataset, folder, settings)
    if args.command != "report":
        record_command(folder, args.command)
    report = write_report(folder, dataset.folder)
    print(f"report: {report}")


if __name__ == "__main__":
    main()
