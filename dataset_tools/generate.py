"""Write class-balanced synthetic cases into an nnU-Net raw dataset (imagesSynth/, labelsSynth/, synthetic.json).

For each requested nnU-Net fold (default 0; ``--folds 0 1 2 3 4`` for five-fold cross-validation, ``--fold all``
for a final model trained on every case): trains the generator on that fold's real training cases first if
there is none (or takes --generator), makes new label maps from those cases that raise every rare pathology
class (docs/label-maps.md), samples images with DDIM, scores them with the model-free quality gate, writes them
atomically and saves a preview grid. No case made for fold k depends on a validation case of fold k. Rerunning resumes.

Sharding: `--num-shards N --shard-index i` (one command per machine or GPU, at the same time, on one dataset
folder) splits the cases; under `accelerate launch` the shards are the processes. The union is byte-identical to
a one-process run with the same seed and --batch-size; each shard resumes on its own.
"""

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from nnunet_synth.dataset import RawDataset
from nnunet_synth.errors import CommandParser, NnsynthError, command_entry_point
from nnunet_synth.generate_step import generate
from nnunet_synth.generator.config import DDIM_INFERENCE_STEPS, PRESETS
from nnunet_synth.generator.inpaint_pipeline import SAMPLERS
from nnunet_synth.generator.inpaint_training import (
    DEFAULT_INFERENCE_STEPS,
    DEFAULT_SAMPLER,
    VOLUME_INFERENCE_STEPS,
    VOLUME_SAMPLER,
)
from nnunet_synth.image_sources import IMAGE_SOURCES
from nnunet_synth.masks.balance import MAP_LOADS
from nnunet_synth.masks.settings import BalancingSettings
from nnunet_synth.preflight import GenerateRequest
from nnunet_synth.sampling.inpaint import VOLUME_NOISES


def build_parser() -> CommandParser:
    parser = CommandParser(description=__doc__)
    parser.add_argument("dataset", help="dataset folder, name (Dataset501_Covid19Lung), short name or id")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("-n", "--num-cases", type=int, help="number of synthetic cases (slices, or volumes with "
                        "--unit volume)")
    amount.add_argument("-r", "--ratio", type=float, default=0.5,
                        help="synthetic cases per real training slice, or per real "
                        "training volume with --unit volume (default 0.5)")
    folds = parser.add_mutually_exclusive_group()
    folds.add_argument("-f", "--fold", help="nnU-Net fold (0-4 or all) to make cases for: the generator and the label "
                       "maps see only its training cases (default 0, or the fold of --generator)")
    folds.add_argument("--folds", nargs="+", help="several folds, one after the other (e.g. --folds 0 1 2 3 4)")
    parser.add_argument("--image-source", choices=tuple(IMAGE_SOURCES), default="generator",
                        help="generator: sample whole images with the diffusion generator; copy-paste: no generator, "
                        "each image is the target's real slice with the donors' real pixels pasted where the label "
                        "map was pasted (blended at the edge); inpaint: the target's real slice with the new lesions "
                        "(plus a margin) drawn by the inpainting generator, every other pixel real")
    parser.add_argument("--unit", choices=("slice", "volume"), help="with --image-source copy-paste or inpaint: what "
                        "one synthetic case is: one slice, or a whole real volume with lesions added (default: volume "
                        "for 3D data, slice for 2D data); the generator makes slices")
    parser.add_argument("--volume-noise", choices=VOLUME_NOISES, default="per-slice", help="inpaint volumes: "
                        "per-slice (default): each slice's crops start from their own seeds; aligned: every slice's "
                        "crops from one noise field of the volume")
    parser.add_argument("--generator", help="a trained generator folder (default: train or reuse "
                        "$nnUNet_results/<Dataset>/nnsynth_generator_<preset>_fold<F>)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--train-steps", type=int, help="optimiser steps when the generator must be trained "
                        "(default: the preset's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inference-steps", type=int, help=f"sampling steps (default: {DDIM_INFERENCE_STEPS} DDIM "
                        f"steps for the generator; inpaint: {DEFAULT_INFERENCE_STEPS} for slices, "
                        f"{VOLUME_INFERENCE_STEPS} for volumes, or a fold's recorded steps when it resumes)")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), help="--image-source inpaint: the scheduler "
                        f"(default {DEFAULT_SAMPLER} for slices, {VOLUME_SAMPLER} for volumes, or a fold's recorded "
                        "one when it resumes; the whole-slice generator samples with DDIM)")
    parser.add_argument("--batch-size", type=int, default=16, help="slices sampled at once")
    balance = parser.add_argument_group("label maps (class balance, Diff-Lung §2.3; shares are of the region: host + "
                                        "pathology classes, or without a host class the body plus the pathology)")
    balance.add_argument("--host-classes", nargs="*", metavar="NAME", help="label names pathology may be pasted onto "
                         "(normal tissue); give the option with no name for none (default: the most frequent class "
                         "if it is >= 80 %% of the labelled foreground, else none)")
    balance.add_argument("--pathology-classes", nargs="+", metavar="NAME", help="label names to balance (default: "
                         "every other non-background class)")
    balance.add_argument("--target-factor", type=float, help="goal of every rare pathology class: this multiple of "
                         "its real share of the region (default 3)")
    balance.add_argument("--max-target-share", type=float, help="... at most this share of the region (default 0.5)")
    balance.add_argument("--common-share", type=float, help="a pathology class above this share of the region is "
                         "common: kept at its real share, not raised (default 0.15)")
    balance.add_argument("--map-cap", type=float, dest="map_class_share_cap", help="in one new map a class covers at "
                         "most max(this, its goal) of the map's region (default 0.3)")
    balance.add_argument("--map-load", choices=MAP_LOADS, help="dense (default): each new map pasted up to --map-cap; "
                         "real: one class per new map, at the load of a real map holding it, drawn from those at or "
                         "above --load-from-percentile, at most --load-cap-percentile of theirs")
    balance.add_argument("--load-from-percentile", type=float, help="--map-load real: draw among the real maps' loads "
                         "at or above this percentile (default 50: the upper half, toward the rare class)")
    balance.add_argument("--load-cap-percentile", type=float, help="--map-load real: a new map's load never above "
                         "this percentile of the real maps' loads (default 90)")
    balance.add_argument("--min-donor-area", type=int, help="connected regions smaller than this many pixels (voxels) "
                         "are never copied (default 20)")
    for name, default in (("rotate", 0.5), ("shift", 0.8), ("dilate", 0.3)):
        balance.add_argument(f"--p-{name}", type=float, help=f"probability of the {name} transform (default {default})")
    balance.add_argument("--target-share", type=float, help="instead of the default goals: stop once every pathology "
                         "class has this share of the region over real + new maps")
    parser.add_argument("--noise-seeding", type=float, metavar="STRENGTH", help="start sampling from the target's "
                        "real slice noised to this strength (0-1], Paired Diffusion §2.5; default: pure noise")
    parser.add_argument("--num-shards", type=int, help="split the cases into this many shards (default: the number "
                        "of processes under accelerate launch, else 1)")
    parser.add_argument("--shard-index", type=int, help="the shard this command makes, 0 .. N-1 (default: the "
                        "process index under accelerate launch, else 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace the existing synthetic cases (only those)")
    parser.add_argument("--export-standalone", type=int, metavar="DATASET_ID", help="also write real + synthetic "
                        "as a standalone dataset with this id and a splits_final.json without synthetic validation")
    return parser


def balancing_from_args(args) -> BalancingSettings:
    """Class roles and MaskGenerationConfig overrides given on the command line (None: not given)."""
    return BalancingSettings(host_classes=args.host_classes, pathology_classes=args.pathology_classes,
                             target_factor=args.target_factor, max_target_share=args.max_target_share,
                             common_share=args.common_share, min_donor_area=args.min_donor_area,
                             map_class_share_cap=args.map_class_share_cap, map_load=args.map_load,
                             load_from_percentile=args.load_from_percentile,
                             load_cap_percentile=args.load_cap_percentile, p_rotate=args.p_rotate,
                             p_shift=args.p_shift, p_dilate=args.p_dilate)


def format_share_table(report: dict, class_names) -> str:
    """Per class of the region: share before -> after (real maps -> real + new maps), its goal and the factor."""
    lines = [f"share of the region ({report['region']}), real maps -> real + {report['num_new_maps']} new maps:"]
    for entry in report["classes"]:
        name = class_names[entry["class"]]
        note = f"  ({entry['role']}"
        if entry["role"] == "pathology":
            goal = entry["target_share"]
            note += (f", goal {100 * goal:.2f} %: {entry['goal_rule']}" if goal is not None else
                     f": {entry['goal_rule']}")
        note += ")"
        if entry["factor"] is not None:
            note = f"  x{entry['factor']:.2f}" + note
        lines.append(f"  {name:<20} {100 * entry['share_before']:6.2f} % -> {100 * entry['share_after']:6.2f} %{note}")
    return "\n".join(lines)


def balancing_notes(report: dict, class_names) -> list:
    """Lines on the targets (how many new maps started from a lesion-free real map) and on the classes this fold
    could not balance (absent from its training cases, no donor) or that the budget did not raise."""
    from nnunet_synth.masks.balance import unraised_classes
    lines = []
    if "num_lesion_free_real_maps" in report:
        lines.append(f"targets: {report['num_new_maps_on_lesion_free_targets']} of {report['num_new_maps']} new maps "
                     f"start from a lesion-free real map ({report['num_lesion_free_real_maps']} of "
                     f"{report['num_real_maps']} real maps are lesion-free; they are never donors)")
    for value, loads in report.get("per_map_load", {}).items():
        real, new = loads["real"], loads["new"]
        if real and new:
            lines.append(f"per-map load of {class_names[int(value)]} (share of the map's region, p10 / p50 / p90): "
                         f"real maps holding it {_quantiles(real)} ({real['maps']}), new maps {_quantiles(new)} "
                         f"({new['maps']})")
    for entry in report.get("not_balanced", []):
        lines.append(f"not balanced in this fold: {class_names[entry['class']]} ({entry['reason']})")
    for entry in unraised_classes(report):
        lines.append(f"not raised within the budget: {class_names[entry['class']]} (goal "
                     f"{100 * entry['target_share']:.2f} %; more cases, -n / -r, would raise it)")
    return lines


def _quantiles(load: dict) -> str:
    return " / ".join(f"{100 * load[key]:.1f} %" for key in ("p10", "p50", "p90"))


def launched_state() -> PartialState:
    """The processes of ``accelerate launch`` (on GPUs), or of ``torchrun`` with ``ACCELERATE_USE_CPU=true`` (CPU
    processes, gloo: accelerate makes CPU processes distributed only when asked explicitly)."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def resolve_shards(args):
    """``--num-shards``/``--shard-index``, else the processes of ``accelerate launch`` (each on its own device)."""
    if args.num_shards is None and args.shard_index is None:
        state = launched_state()
        if state.num_processes > 1:
            args.device = str(state.device)
        return state.num_processes, state.process_index
    if args.num_shards is None or args.shard_index is None:
        raise NnsynthError("give both --num-shards and --shard-index (or neither)")
    return args.num_shards, args.shard_index


def request_from_args(args) -> GenerateRequest:
    if args.folds:
        folds = args.folds
    elif args.fold is not None:
        folds = [args.fold]
    elif args.generator is not None:          # the generator's own fold
        from nnunet_synth.generator.checkpoints import read_generator_config, resolve_generator_folder
        folds = [read_generator_config(resolve_generator_folder(args.generator)).fold]
    else:
        folds = ["0"]
    return GenerateRequest(
        folds=[str(fold) for fold in folds], image_source=args.image_source, generator=args.generator,
        preset=args.preset, train_steps=args.train_steps, device=args.device, seed=args.seed,
        num_inference_steps=args.inference_steps, batch_size=args.batch_size, num_cases=args.num_cases,
        ratio=args.ratio, target_share=args.target_share, noise_seeding_strength=args.noise_seeding,
        balancing=balancing_from_args(args), num_shards=args.num_shards, shard_index=args.shard_index,
        overwrite=args.overwrite, export_id=args.export_standalone,
        sampler=args.sampler, unit=args.unit, volume_noise=args.volume_noise,
        launched=launched_state().num_processes > 1)


@command_entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    args.num_shards, args.shard_index = resolve_shards(args)
    if args.export_standalone is not None and args.num_shards > 1 and launched_state().num_processes == 1:
        raise NnsynthError("--export-standalone with --num-shards would export before the other shards are done: "
                           "export after all shards, by one more run without --num-shards")
    dataset = RawDataset.from_name(args.dataset)
    shard = f"shard {args.shard_index} of {args.num_shards}: " if args.num_shards > 1 else ""
    generate(dataset, request_from_args(args), report=lambda summary: print_summary(dataset, summary, shard))
    if args.export_standalone is not None:
        if launched_state().num_processes > 1:
            launched_state().wait_for_everyone()      # every shard's cases are written
            if not launched_state().is_main_process:
                return
        from nnunet_synth.nnunet_paths import nnunet_folder
        from nnunet_synth.writer.standalone_export import export_standalone
        folder = export_standalone(dataset, dataset.folder.parent, nnunet_folder("nnUNet_preprocessed"),
                                   args.export_standalone)
        print(f"standalone dataset: {folder}")


def print_summary(dataset: RawDataset, summary: dict, shard: str = ""):
    fold = summary["fold"]
    print(f"fold {fold}: {shard}{summary['total']} synthetic cases in {dataset.folder} ({summary['written']} written "
          f"now, {summary['skipped']} already there); model-free quality gate passed by {summary['model_free_passed']} "
          f"of {summary['total']} ({100 * summary['model_free_passed'] / max(summary['total'], 1):.0f} %)")
    print(format_share_table(summary["label_map_report"], dataset.class_names))
    for line in balancing_notes(summary["label_map_report"], dataset.class_names):
        print(line)
    print(f"manifest: {summary['store']}")
    print(f"preview grid: {summary['preview']}")
    if str(fold) != "all":
        print(f"these cases may be used by nnU-Net fold {fold} only; for another fold k run nnsynth_generate "
              f"{dataset.name} --fold k")


if __name__ == "__main__":
    main()
