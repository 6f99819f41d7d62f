"""Train the mask-conditioned diffusion generator on the real training cases of one nnU-Net fold.

Output: $nnUNet_results/<Dataset>/nnsynth_generator_<preset>_fold<F>/
(--mode inpaint: nnsynth_inpaint_<preset>_fold<F>/) (checkpoints/checkpoint_<i>/, previews/, final/;
final/ loads with diffusers.DiffusionPipeline.from_pretrained(final, trust_remote_code=True)).
Rerunning the same command resumes exactly from the newest checkpoint (other settings are refused).
Multi-GPU: accelerate launch -m nnunet_synth.dataset_tools.train_generator ...
(or `accelerate launch $(which nnsynth_train_generator) ...`).
"""
import argparse

from nnunet_synth.dataset import RawDataset
from nnunet_synth.errors import CommandParser, command_entry_point
from nnunet_synth.generator.ablation import FREQUENCY_DEFINITIONS, PROBABILITY_READINGS
from nnunet_synth.generator.checkpoints import generator_run_folder
from nnunet_synth.generator.config import (
    ABLATION_MODES,
    DDIM_INFERENCE_STEPS,
    GENERATOR_MODES,
    PRESETS,
    TrainingSettings,
)
from nnunet_synth.generator.training import train_generator
from nnunet_synth.preflight import check_training_request


def _fold(value: str) -> str:
    if value != "all" and not value.isdigit():
        raise argparse.ArgumentTypeError(f"fold must be an integer or 'all', got '{value}'")
    return value


def build_parser() -> CommandParser:
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="dataset folder, name (Dataset501_Covid19Lung), short name or id")
    parser.add_argument("--fold", type=_fold, default="0", help="nnU-Net fold whose training cases are used, or 'all'")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--mode", choices=GENERATOR_MODES, default="slice", help="slice: whole slices from a label "
                        "map (Diff-Lung's generator); inpaint: lesions drawn inside real slices, trained on "
                        "native-resolution crops (--image-size is then the crop size; docs/inpainting.md)")
    parser.add_argument("--edit-margin", type=int, default=3, help="--mode inpaint: pixels added around every edit "
                        "region")
    parser.add_argument("--output",
                        help="run folder (default: $nnUNet_results/<Dataset>/nnsynth_generator_<preset>_fold<F>)")
    overrides = parser.add_argument_group("overrides of the preset")
    overrides.add_argument("--image-size", type=int)
    overrides.add_argument("--block-out-channels", type=int, nargs="+")
    overrides.add_argument("--layers-per-block", type=int)
    overrides.add_argument("--batch-size", type=int, help="per GPU")
    overrides.add_argument("--lr", type=float, dest="learning_rate")
    overrides.add_argument("--steps", type=int, dest="max_steps", help="total optimiser steps")
    overrides.add_argument("--warmup-steps", type=int)
    overrides.add_argument("--checkpoint-every", type=int)
    overrides.add_argument("--preview-every", type=int)
    training = parser.add_argument_group("training")
    training.add_argument("--ablation", choices=ABLATION_MODES, default="cbmat", dest="ablation_mode")
    training.add_argument("--delta-0", type=float, default=0.5, help="CBMAT initial ablation probability")
    training.add_argument("--frequency-definition", choices=FREQUENCY_DEFINITIONS, default="foreground",
                          help="pixels over which CBMAT's class frequency f_c is counted (default: foreground)")
    training.add_argument("--probability-reading", choices=PROBABILITY_READINGS, default="equation",
                          help="delta_c = delta_0 (1 - f_c) as Diff-Lung's eq. 8 (default) or delta_0 f_c as its text")
    training.add_argument("--protected-classes", nargs="*", help="label names never ablated (default: the most "
                          "frequent non-background class if it is >= 80 %% of the foreground, as the label maps' host)")
    training.add_argument("--region-classes", nargs="+", help="label names forming the region of Diff-Lung §3.2; "
                          "pixels outside are set to the window minimum (default: no region masking)")
    training.add_argument("--window", type=float, nargs=2, metavar=("LOWER", "UPPER"),
                          help="intensity window for every image channel (default: chosen per channel)")
    training.add_argument("--offset-noise", type=float, default=0.1, help="offset-noise scale (0 = off)")
    training.add_argument("--ema-max-decay", type=float, default=0.9999)
    training.add_argument("--max-grad-norm", type=float, default=1.0)
    training.add_argument("--mixed-precision", choices=("auto", "no", "fp16", "bf16"), default="auto")
    training.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    training.add_argument("--no-channels-last", action="store_true")
    training.add_argument("--data-workers", type=int, help="DataLoader processes reading the slice cache "
                          "(default: 4 on CUDA, else 0)")
    training.add_argument("--preview-inference-steps", type=int, default=DDIM_INFERENCE_STEPS)
    training.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (at least 2)")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--no-progress", action="store_true")
    return parser


def settings_from_args(args) -> TrainingSettings:
    return TrainingSettings(
        preset=args.preset, mode=args.mode, edit_margin=args.edit_margin, image_size=args.image_size,
        block_out_channels=tuple(args.block_out_channels) if args.block_out_channels else None,
        layers_per_block=args.layers_per_block, batch_size=args.batch_size, learning_rate=args.learning_rate,
        max_steps=args.max_steps, warmup_steps=args.warmup_steps, checkpoint_every=args.checkpoint_every,
        preview_every=args.preview_every, ablation_mode=args.ablation_mode, delta_0=args.delta_0,
        frequency_definition=args.frequency_definition, probability_reading=args.probability_reading,
        protected_classes=args.protected_classes, region_classes=args.region_classes,
        window=tuple(args.window) if args.window else None, offset_noise=args.offset_noise,
        ema_max_decay=args.ema_max_decay, max_grad_norm=args.max_grad_norm, mixed_precision=args.mixed_precision,
        compile=args.compile, channels_last=not args.no_channels_last, data_workers=args.data_workers,
        preview_inference_steps=args.preview_inference_steps, keep_checkpoints=args.keep_checkpoints, seed=args.seed)


@command_entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    dataset = RawDataset.from_name(args.dataset)
    settings = settings_from_args(args)
    run_folder = args.output or generator_run_folder(dataset.name, args.preset, args.fold, args.mode)
    check_training_request(dataset, settings, args.fold, run_folder)     # before anything is written
    train_generator(dataset, run_folder, settings, fold=args.fold, progress=not args.no_progress)


if __name__ == "__main__":
    main()
