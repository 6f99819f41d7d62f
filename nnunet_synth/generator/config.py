"""Generator presets, training settings and the JSON config stored beside every trained generator.

The denoiser is a diffusers ``UNet2DModel``; its input is the noisy image (one channel per input channel of the
dataset, all generated jointly) concatenated with the label map as one-hot channels (one per class, Diff-Lung §2.1 as
read in method.md §1), its output the predicted noise of every image channel.
"""
import dataclasses
from dataclasses import dataclass, field

from diffusers import DDPMScheduler, UNet2DModel

from nnunet_synth.errors import NnsynthError
from nnunet_synth.generator.ablation import FREQUENCY_DEFINITIONS, PROBABILITY_READINGS

GENERATOR_CONFIG_NAME = "generator_config.json"
ABLATION_MODES = ("cbmat", "mat", "none")
GENERATOR_MODES = ("slice", "inpaint")   # whole slices from a label map (Diff-Lung), or lesions inside real slices
NUM_TRAIN_TIMESTEPS = 1000
DDIM_INFERENCE_STEPS = 50    # sampling steps of the whole-slice generator (DDIM) unless asked otherwise

# Architecture and training defaults per preset. ``default`` follows the reference configuration of Konz et al.
# (segmentation-guided diffusion, itself the diffusers unconditional-training example): six levels
# (128, 128, 256, 256, 512, 512), two ResNet layers per level, self-attention in the second-lowest level.
# ``tiny`` (about 1.5 M parameters at 64x64) is for CPU tests and the demo.
PRESETS = {
    "tiny": {
        "image_size": 64,
        "block_out_channels": (32, 64, 64, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "batch_size": 8,
        "learning_rate": 2e-4,
        "max_steps": 2000,
        "warmup_steps": 100,
        "checkpoint_every": 500,
        "preview_every": 500,
    },
    "default": {
        "image_size": 256,
        "block_out_channels": (128, 128, 256, 256, 512, 512),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                             "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 32,
        "batch_size": 16,
        "learning_rate": 1e-4,
        "max_steps": 50_000,
        "warmup_steps": 500,
        "checkpoint_every": 5000,
        "preview_every": 5000,
    },
}

# Presets meant for a GPU. Trained on a CPU, ``default`` took about 4 minutes a step on a 2-core machine, so its
# 50 000 steps would take months: the training loop times the first steps and prints its estimate and the preset to
# use instead (training.cpu_cost_warning).
GPU_PRESETS = ("default",)
CPU_PRESET = "tiny"

# ``--mode inpaint``: ``image_size`` is the side of the native-resolution crops the inpainting generator trains on
# and fills. ``tiny`` (64 px crops, about 1.5 M parameters) trains on a CPU; ``default`` (160 px crops, five
# levels) is for a GPU.
INPAINT_PRESETS = {
    # 1000 steps of batch 8 fit 15 minutes on a 2-core CPU; 300 steps of batch 4 already passed the model-free gate
    "tiny": {**PRESETS["tiny"], "image_size": 64, "max_steps": 1000, "learning_rate": 1e-3, "checkpoint_every": 250,
             "preview_every": 1000},
    "default": {
        **PRESETS["default"],
        "image_size": 160,
        "block_out_channels": (64, 128, 256, 256, 512),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        "batch_size": 32,
        "max_steps": 30_000,
    },
}


def preset_values(mode: str, preset: str) -> dict:
    """The architecture and training defaults of ``preset`` for generator ``mode``."""
    return (INPAINT_PRESETS if mode == "inpaint" else PRESETS)[preset]


@dataclass
class TrainingSettings:
    """Everything a training run can be told; ``None`` means "take the preset's value"."""

    preset: str = "tiny"
    mode: str = "slice"                 # slice: whole slices (Diff-Lung); inpaint: lesions inside real slices (crops)
    image_size: int = None              # slice: the model size; inpaint: the side of the native-resolution crops
    block_out_channels: tuple = None
    layers_per_block: int = None
    batch_size: int = None              # per process
    learning_rate: float = None
    max_steps: int = None
    warmup_steps: int = None
    checkpoint_every: int = None
    preview_every: int = None
    weight_decay: float = 1e-2          # torch AdamW default, as in Konz et al.
    adam_betas: tuple = (0.9, 0.999)
    max_grad_norm: float = 1.0
    ema_max_decay: float = 0.9999       # with EMA warm-up (inv_gamma 1, power 3/4) as in diffusers' examples
    ema_power: float = 0.75
    offset_noise: float = 0.1           # Paired Diffusion §2.4: noise + offset_noise * N(0,1) per sample and channel;
                                        # 0 = off
    ablation_mode: str = "cbmat"
    delta_0: float = 0.5                # Diff-Lung gives no value for delta_0; 0.5 matches MAT's probability
    frequency_definition: str = "foreground"  # f_c counted over foreground, all or pathology pixels (ablation.py)
    probability_reading: str = "equation"     # delta_0 (1 - f_c) as Diff-Lung eq. 8, or "text": delta_0 f_c
    protected_classes: list = None      # label names never ablated; None = the host class of masks.default_class_roles
    region_classes: list = None         # label names forming the region of Diff-Lung §3.2; None = no region masking
    window: tuple = None                # intensity window override (lower, upper) in dataset units
    mixed_precision: str = "auto"       # auto (bf16 on GPUs that have it, else fp16; none on CPU), no, fp16, bf16
    channels_last: bool = True          # only applied on CUDA
    compile: bool = False
    data_workers: int = None            # DataLoader processes reading the slice cache; None = 4 on CUDA, else 0
    seed: int = 0
    keep_checkpoints: int = 2
    preview_inference_steps: int = DDIM_INFERENCE_STEPS
    preview_count: int = 4
    # inpaint mode: where crops are centred and how edit regions are drawn (generator/inpaint_data.py)
    edit_margin: int = 3                # pixels added around every edit region (training and sampling alike)
    p_lesion_crop: float = 0.8          # crop centred (with jitter) on a pathology component, else anywhere
    p_lesion_edit: float = 0.6          # edit region = a pathology component of the crop + margin
    p_moved_edit: float = 0.2           # ... a pathology component rotated / dilated / moved onto host tissue;
                                        # otherwise a random blob over host tissue

    def resolved(self) -> "TrainingSettings":
        """A copy with every ``None`` preset field filled from the preset, after validation."""
        if self.preset not in PRESETS:
            raise NnsynthError(f"unknown preset '{self.preset}': choose one of {', '.join(PRESETS)}")
        if self.mode not in GENERATOR_MODES:
            raise NnsynthError(f"unknown generator mode '{self.mode}': choose one of {', '.join(GENERATOR_MODES)}")
        if self.ablation_mode not in ABLATION_MODES:
            raise NnsynthError(f"unknown ablation mode '{self.ablation_mode}': "
                               f"choose one of {', '.join(ABLATION_MODES)}")
        values = dataclasses.asdict(self)
        preset = preset_values(self.mode, self.preset)
        for key, preset_value in preset.items():
            if key in values and values[key] is None:
                values[key] = preset_value
        settings = TrainingSettings(**values)
        settings.block_out_channels = tuple(settings.block_out_channels)
        settings.adam_betas = tuple(settings.adam_betas)
        if settings.image_size % 2 ** (len(settings.block_out_channels) - 1):
            raise NnsynthError(f"image size {settings.image_size} must be divisible by "
                               f"{2 ** (len(settings.block_out_channels) - 1)} for {len(settings.block_out_channels)} "
                               f"UNet levels")
        if len(settings.block_out_channels) != len(preset["block_out_channels"]):
            raise NnsynthError(f"preset '{self.preset}' has {len(preset['block_out_channels'])} levels; "
                               f"--block-out-channels must give as many")
        for name in ("batch_size", "max_steps", "checkpoint_every", "preview_every"):
            if getattr(settings, name) < 1:
                raise NnsynthError(f"{name} must be at least 1, got {getattr(settings, name)}")
        if settings.frequency_definition not in FREQUENCY_DEFINITIONS:
            raise NnsynthError(f"unknown frequency definition '{settings.frequency_definition}': choose one of "
                               f"{', '.join(FREQUENCY_DEFINITIONS)}")
        if settings.probability_reading not in PROBABILITY_READINGS:
            raise NnsynthError(f"unknown probability reading '{settings.probability_reading}': choose one of "
                               f"{', '.join(PROBABILITY_READINGS)}")
        if not 0.0 <= settings.delta_0 <= 1.0:
            raise NnsynthError(f"delta_0 must lie in [0, 1], got {settings.delta_0}")
        if settings.mode == "inpaint":
            if settings.region_classes:
                raise NnsynthError("region masking (--region-classes) is for whole-slice generators: an inpainting "
                                   "generator sees the real pixels around every edit; leave it out with --mode inpaint")
            if settings.edit_margin < 0:
                raise NnsynthError(f"edit_margin must be at least 0, got {settings.edit_margin}")
            for name in ("p_lesion_crop", "p_lesion_edit", "p_moved_edit"):
                if not 0.0 <= getattr(settings, name) <= 1.0:
                    raise NnsynthError(f"{name} must lie in [0, 1], got {getattr(settings, name)}")
            if settings.p_lesion_edit + settings.p_moved_edit > 1.0:
                raise NnsynthError("p_lesion_edit + p_moved_edit must be at most 1 (the rest are random blobs)")
        check_training_numbers(settings)
        return settings


def check_training_numbers(settings: "TrainingSettings"):
    """Finite numbers in range for the options ``resolved`` does not check itself."""
    from nnunet_synth.dataset.validation import MAX_INFERENCE_STEPS, check_int_range, check_number_range, check_seed
    check_seed(settings.seed)
    check_int_range(settings.image_size, "--image-size", 8)
    check_int_range(min(settings.block_out_channels), "--block-out-channels", 1)
    check_int_range(settings.layers_per_block, "--layers-per-block", 1)
    check_number_range(settings.learning_rate, "--lr", 0, 1, low_open=True)
    check_int_range(settings.warmup_steps, "--warmup-steps", 0)
    check_number_range(settings.offset_noise, "--offset-noise", 0, None)
    check_number_range(settings.ema_max_decay, "--ema-max-decay", 0, 1)
    check_number_range(settings.max_grad_norm, "--max-grad-norm", 0, None, low_open=True)
    check_int_range(settings.keep_checkpoints, "--keep-checkpoints", 2)
    check_int_range(settings.preview_inference_steps, "--preview-inference-steps", 1, MAX_INFERENCE_STEPS)
    check_int_range(settings.data_workers, "--data-workers", 0)
    if settings.window is not None:
        lower, upper = settings.window
        check_number_range(lower, "--window LOWER", None, None)
        check_number_range(upper, "--window UPPER", None, None)
        if not lower < upper:
            raise NnsynthError(f"--window {lower:g} {upper:g}: LOWER must be below UPPER: "
                               f"give the window as LOWER UPPER")


def unet_input_channels(mode: str, num_channels: int, num_classes: int) -> int:
    """slice: noisy image + one-hot label map; inpaint: noisy image + known image (edit region blanked) + edit
    mask + one-hot label map, as diffusers' inpainting UNets take them."""
    if mode == "inpaint":
        return 2 * num_channels + 1 + num_classes
    return num_channels + num_classes


def build_unet(settings: TrainingSettings, num_classes: int, num_channels: int = 1) -> UNet2DModel:
    """The denoiser for ``num_channels`` image channels and ``num_classes`` one-hot condition channels (settings
    must be resolved); its inputs depend on ``settings.mode`` (``unet_input_channels``)."""
    preset = preset_values(settings.mode, settings.preset)
    return UNet2DModel(
        sample_size=settings.image_size,
        in_channels=unet_input_channels(settings.mode, num_channels, num_classes),
        out_channels=num_channels,
        layers_per_block=settings.layers_per_block,
        block_out_channels=tuple(settings.block_out_channels),
        down_block_types=preset["down_block_types"],
        up_block_types=preset["up_block_types"],
        norm_num_groups=preset["norm_num_groups"],
    )


def build_noise_scheduler() -> DDPMScheduler:
    """DDPM, epsilon prediction, 1000 steps, linear betas (Diff-Lung §2.1)."""
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear", prediction_type="epsilon")


@dataclass
class GeneratorConfig:
    """What is needed to use a trained generator; saved as ``generator_config.json`` beside its weights."""

    dataset_name: str
    labels: dict                        # label name -> value (value = one-hot channel index)
    window: list                        # ImageWindows.to_dict(): one window per image channel (a dict: one channel)
    image_size: int
    preset: str
    fold: str
    training_cases: list
    class_frequencies: dict             # label name -> pixel share over the training label maps
    ablation: dict                      # mode, delta_0, f_c definition and values, delta_c, protected, annealing
    region_classes: list                # label names of the region kept by Diff-Lung §3.2 masking, or None
    unet_config: dict
    scheduler_config: dict
    training: dict                      # the resolved TrainingSettings
    trained_steps: int = 0
    num_parameters: int = 0
    format_version: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def class_names(self):
        return [name for name, _ in sorted(self.labels.items(), key=lambda item: item[1])]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def num_channels(self) -> int:
        """Image channels the generator draws jointly (the UNet's output channels)."""
        return int(self.unet_config.get("out_channels", 1))

    @property
    def mode(self) -> str:
        """slice (whole-slice generator) or inpaint; generators written before inpainting are slice generators."""
        return self.training.get("mode", "slice")

    @property
    def ignore_label(self):
        """nnU-Net's ignore label (unannotated pixels) of the dataset, or None."""
        return self.labels.get("ignore")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GeneratorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})
