"""DDPM training of the mask-conditioned generator with CBMAT / MAT / no ablation, in the style of diffusers'
training examples: explicit loop, ``Accelerator`` for devices, mixed precision and multi-GPU (works under
``accelerate launch``), EMA weights, AdamW with warm-up and cosine decay, gradient clipping.

Randomness of step s (data order, noise, timesteps, ablation draws) is a pure function of (seed, s, process), so a
resumed run repeats exactly what an uninterrupted run does. Checkpoints are accelerate's ``save_state`` (model,
optimiser, RNG states) with the LR schedule, the EMA and the step registered for checkpointing; a resumed run must
have the same settings (``check_resumable``).
"""
import dataclasses
import errno
import pickle
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, parse_flag_from_env
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError
from tqdm import tqdm

import nnunet_synth
from nnunet_synth.dataset import ImageWindows, RawDataset, class_pixel_frequencies, dataset_intensity_window
from nnunet_synth.dataset.native_slices import open_native_slices
from nnunet_synth.dataset.splits import fold_training_cases
from nnunet_synth.errors import NnsynthError, first_line, storage_error
from nnunet_synth.generator.ablation import (
    AblationSchedule,
    ablate_label_maps,
    cbmat_class_frequencies,
    make_ablation_schedule,
    one_hot_condition,
    training_noise,
)
from nnunet_synth.generator.batches import StepBatches, StepLoader
from nnunet_synth.generator.checkpoints import (
    CHECKPOINTS_FOLDER,
    FINAL_FOLDER,
    check_no_old_checkpoints,
    checkpoint_folders,
    checkpoint_iteration,
    fresh_temp_folder,
    list_checkpoints,
    read_generator_config,
    replace_folder,
    save_pipeline_folder,
    write_generator_config,
)
from nnunet_synth.generator.config import (
    CPU_PRESET,
    GPU_PRESETS,
    NUM_TRAIN_TIMESTEPS,
    GeneratorConfig,
    TrainingSettings,
    build_noise_scheduler,
    build_unet,
)
from nnunet_synth.generator.inpaint_pipeline import inpainting_condition
from nnunet_synth.generator.inpaint_training import INPAINT_PIPELINE_FILE, inpaint_pipeline, inpaint_training_data
from nnunet_synth.generator.preview import write_preview_grid
from nnunet_synth.generator.slice_cache import open_slice_cache, slice_cache_root
from nnunet_synth.masks.balance import default_class_roles

# keys of generator_config.json that must agree before a run folder is resumed
RESUME_KEYS = ("dataset_name", "labels", "image_size", "training_cases", "unet_config", "window", "region_classes")
# training settings that may change on resume (they do not change what is computed); every other one must agree
CHANGEABLE_ON_RESUME = ("checkpoint_every", "preview_every", "keep_checkpoints", "preview_inference_steps",
                        "preview_count", "compile", "channels_last", "data_workers")
# losses are copied to the host (one sync) every this many steps, and at checkpoints and the end
LOSS_SYNC_EVERY = 25
# a preset meant for a GPU, trained on a CPU: the first steps are timed (this many, or fewer once they took
# CPU_ESTIMATE_SECONDS), then one line gives the estimated training time and the preset to use instead
CPU_ESTIMATE_STEPS = 3
CPU_ESTIMATE_SECONDS = 60.0


@dataclass
class TrainingResult:
    run_folder: Path
    final_folder: Path
    config: GeneratorConfig
    losses: list = field(default_factory=list)   # (step, loss) of the steps run by this call
    resumed_from_step: int = 0


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        if device.type != "cuda":
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested not in ("no", "fp16", "bf16"):
        raise NnsynthError(f"mixed precision must be auto, no, fp16 or bf16, got '{requested}'")
    return requested


def step_generator(seed: int, step: int, process_index: int = 0) -> torch.Generator:
    """The CPU generator that draws all randomness of one training step on one process."""
    state = np.random.SeedSequence([seed, step, process_index]).generate_state(2, dtype=np.uint64)
    return torch.Generator("cpu").manual_seed(int(state[0] % (2 ** 63)))


class DataOrder:
    """Seeded reshuffle per epoch; the slices of global step s are a pure function of (seed, s)."""

    def __init__(self, num_slices: int, batch_size: int, seed: int, num_processes: int = 1, process_index: int = 0):
        self.num_slices, self.batch_size, self.seed = num_slices, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self._permutations = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            self._permutations = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_slices)}
        return self._permutations[epoch]

    def batch_indices(self, step: int) -> np.ndarray:
        first = (step * self.num_processes + self.process_index) * self.batch_size
        positions = np.arange(first, first + self.batch_size)
        return np.array([self._permutation(int(p // self.num_slices))[p % self.num_slices] for p in positions])


def draw_step_randomness(batch_size: int, image_size: int, step: int, schedule: AblationSchedule,
                         offset_noise: float, generator: torch.Generator, num_channels: int = 1):
    """Noise (B, channels, S, S), timesteps (B,) and ablated classes (B, classes) for one step, all from
    ``generator``."""
    noise = training_noise((batch_size, num_channels, image_size, image_size), offset_noise, generator)
    timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch_size,), generator=generator)
    ablated_classes = schedule.draw(batch_size, step, generator)
    return noise, timesteps, ablated_classes


def denoising_loss(unet, noise_scheduler: DDPMScheduler, images, label_maps, noise, timesteps, ablated_classes,
                   num_classes: int, memory_format=torch.contiguous_format):
    """Epsilon-prediction MSE: noise the images, condition on the (ablated) one-hot label map, predict the noise.
    ``images`` (B, channels, S, S) in [-1, 1], ``label_maps`` (B, S, S) int64; the image itself is never ablated."""
    noisy_images = noise_scheduler.add_noise(images, noise, timesteps)
    condition = one_hot_condition(ablate_label_maps(label_maps, ablated_classes), num_classes, dtype=images.dtype)
    model_input = torch.cat([noisy_images, condition], dim=1).contiguous(memory_format=memory_format)
    noise_prediction = unet(model_input, timesteps).sample
    return F.mse_loss(noise_prediction.float(), noise.float())


def inpainting_loss(unet, noise_scheduler: DDPMScheduler, images, label_maps, edit_masks, noise, timesteps,
                    ablated_classes, num_classes: int, memory_format=torch.contiguous_format):
    """Epsilon-prediction MSE inside the edit region of native-resolution crops. The UNet sees the noisy crop, the
    known crop (edit region blanked), the edit mask and the (ablated, CBMAT) one-hot label map. Outside the edit
    region sampling replaces the prediction by the known pixels' exact noise (``NnsynthInpaintPipeline``), so only
    the edit region's prediction is learnt. ``edit_masks`` (B, S, S) float, 1 = edit."""
    noisy_images = noise_scheduler.add_noise(images, noise, timesteps)
    condition = inpainting_condition(images, edit_masks, ablate_label_maps(label_maps, ablated_classes), num_classes)
    model_input = torch.cat([noisy_images, condition], dim=1).contiguous(memory_format=memory_format)
    noise_prediction = unet(model_input, timesteps).sample
    weights = edit_masks[:, None].float().expand_as(noise_prediction)
    squared_error = (noise_prediction.float() - noise.float()) ** 2
    return (squared_error * weights).sum() / weights.sum().clamp(min=1.0)


class TrainingProgress:
    """The data position (optimiser steps done), registered for checkpointing with accelerate."""

    def __init__(self, step: int = 0):
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict):
        self.step = int(state["step"])


@dataclass
class TrainingState:
    """Everything one optimiser step touches; built by ``build_training_state``."""

    settings: TrainingSettings
    accelerator: Accelerator
    unet: torch.nn.Module               # as prepared by accelerate (what the optimiser updates)
    training_unet: torch.nn.Module      # ``unet``, or its torch.compile wrapper
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: EMAModel
    noise_scheduler: DDPMScheduler
    schedule: AblationSchedule
    data_order: "DataOrder"
    images: object                      # (N, channels, S, S) rows as float32 in [-1, 1]: an array or the cache's
    label_maps: object                  # (N, S, S) rows as int64 (conditioning maps)
    loader: StepLoader                  # the batches of consecutive steps (DataLoader)
    num_classes: int
    memory_format: torch.memory_format
    progress: TrainingProgress = field(default_factory=TrainingProgress)
    loss: object = denoising_loss       # denoising_loss (whole slices) or inpainting_loss (crops + edit masks)

    def load_checkpoint(self, checkpoint_folder):
        """Restore model, optimiser, LR schedule, EMA, step and RNG states saved by ``save_checkpoint``."""
        try:
            self.accelerator.load_state(str(checkpoint_folder))
        except (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError,
                SafetensorError) as error:          # a truncated or garbled file of the checkpoint
            raise NnsynthError(f"{checkpoint_folder}: the checkpoint cannot be read ({first_line(error)}): delete "
                               f"this folder and rerun the same command (it resumes from the checkpoint before, or "
                               f"starts over)") from None
        self.ema.to(self.accelerator.device)        # accelerate loads custom states on the CPU


def new_ema(unet, settings: TrainingSettings) -> EMAModel:
    return EMAModel(unet.parameters(), decay=settings.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0,
                    power=settings.ema_power, model_cls=UNet2DModel, model_config=unet.config, foreach=True)


def build_training_state(settings: TrainingSettings, images, label_maps, num_classes: int,
                         schedule: AblationSchedule, accelerator: Accelerator, num_channels: int = None,
                         step_batches=StepBatches, loss=denoising_loss) -> TrainingState:
    """UNet, EMA, AdamW, LR schedule (fresh from ``settings.seed``; ``TrainingState.load_checkpoint`` resumes) on the
    accelerator's device, with channels_last and fused AdamW on CUDA and optional torch.compile. ``step_batches``
    and ``loss`` are those of the generator's mode (inpainting: ``inpaint_step_batches``, ``inpainting_loss``)."""
    device = accelerator.device
    torch.manual_seed(settings.seed)
    unet = build_unet(settings, num_classes, images.shape[1] if num_channels is None else num_channels)
    ema = new_ema(unet, settings)
    ema.to(device)
    on_cuda = device.type == "cuda"
    memory_format = torch.channels_last if (on_cuda and settings.channels_last) else torch.contiguous_format
    unet = unet.to(device, memory_format=memory_format)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.learning_rate, betas=settings.adam_betas,
                                  weight_decay=settings.weight_decay, fused=on_cuda)
    # The LR schedule is stepped by hand once per optimiser step (not passed to accelerator.prepare, which would
    # step it once per process); it is registered for checkpointing instead.
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.max_steps)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(lr_scheduler, ema, progress)
    training_unet = torch.compile(unet) if settings.compile else unet
    noise_scheduler = build_noise_scheduler()
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    data_order = DataOrder(len(images), settings.batch_size, settings.seed, accelerator.num_processes,
                           accelerator.process_index)
    workers = settings.data_workers if settings.data_workers is not None else (4 if on_cuda else 0)
    loader = StepLoader(images, label_maps, data_order, workers, pin_memory=on_cuda, step_batches=step_batches)
    return TrainingState(settings, accelerator, unet, training_unet, optimizer, lr_scheduler, ema, noise_scheduler,
                         schedule, data_order, images, label_maps, loader, num_classes, memory_format, progress, loss)


def _to_device(array_or_tensor, device: torch.device) -> torch.Tensor:
    """Host -> device through pinned memory (asynchronous) on CUDA; the caching host allocator keeps the pinned
    block alive until the copy is done."""
    tensor = torch.as_tensor(array_or_tensor)
    if device.type != "cuda":
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def training_step(state: TrainingState, step: int) -> torch.Tensor:
    """Optimiser step ``step`` (0-based) of ``nnsynth_train_generator``: the step's slices and randomness (pure
    functions of seed, step and process), denoising loss, backward, clipping, AdamW, LR schedule, EMA.

    Returns the loss averaged over processes as a device tensor (no host sync). benchmarks/generator_throughput.py
    times this very function.
    """
    settings, accelerator = state.settings, state.accelerator
    device = accelerator.device
    generator = step_generator(settings.seed, step, accelerator.process_index)
    # images, label maps (and the edit masks of an inpainting run), pinned on CUDA by the DataLoader
    batch = [_to_device(tensor, device) for tensor in state.loader.batch(step)]
    noise, timesteps, ablated_classes = draw_step_randomness(len(batch[0]), settings.image_size, step,
                                                             state.schedule, settings.offset_noise, generator,
                                                             batch[0].shape[1])
    loss = state.loss(state.training_unet, state.noise_scheduler, *batch, _to_device(noise, device),
                      _to_device(timesteps, device), ablated_classes, state.num_classes, state.memory_format)
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(state.unet.parameters(), settings.max_grad_norm)
    state.optimizer.step()
    state.lr_scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.ema.step(accelerator.unwrap_model(state.unet).parameters())
    state.progress.step = step + 1
    return accelerator.gather(loss.detach()[None]).mean()


def _names_to_values(names, dataset: RawDataset, what: str):
    unknown = [name for name in names if name not in dataset.labels]
    if unknown:
        raise NnsynthError(f"{what} {unknown} are not labels of {dataset.name} (labels: {list(dataset.labels)})")
    return sorted(dataset.labels[name] for name in names)


def prepare_generator_config(dataset: RawDataset, settings: TrainingSettings, case_ids, fold,
                             store=None) -> GeneratorConfig:
    """Frequencies, window, ablation schedule and UNet config of a run, before any training; read from ``store``
    (the cases' ``NativeSlices``) when given, else from the raw cases."""
    frequencies = class_pixel_frequencies(dataset, case_ids, store)
    if settings.protected_classes is None:
        # the surrounding tissue of Diff-Lung = the host class of the label maps (masks.default_class_roles): the most
        # frequent class only if it is most of the foreground; ground glass beside consolidation is no host
        host = default_class_roles(frequencies)[0] if np.any(frequencies[1:] > 0) else []
        protected_names = [dataset.class_names[value] for value in host]
    else:
        protected_names = list(settings.protected_classes)
    protected_values = _names_to_values(protected_names, dataset, "protected classes")
    if 0 in protected_values:
        protected_values.remove(0)  # background is never ablated anyway
    region_values = None
    if settings.region_classes:
        region_values = _names_to_values(settings.region_classes, dataset, "region classes")
    cbmat_frequencies = cbmat_class_frequencies(frequencies, settings.frequency_definition, protected_values)
    schedule = make_ablation_schedule(settings.ablation_mode, cbmat_frequencies, protected_values, settings.delta_0,
                                      settings.max_steps, settings.probability_reading, dataset.ignore_label)
    window = dataset_intensity_window(dataset, case_ids, override=settings.window, store=store)
    unet = build_unet(settings, dataset.num_classes, dataset.num_channels)
    ablation = {**schedule.to_dict(), "delta_0": settings.delta_0,
                "frequency_definition": settings.frequency_definition,
                "probability_reading": settings.probability_reading,
                "frequencies": {name: float(f) for name, f in zip(dataset.class_names, cbmat_frequencies)},
                "delta_c": {name: float(p) for name, p in zip(dataset.class_names, schedule.initial_probabilities)},
                "protected_classes": [dataset.class_names[v] for v in protected_values]
                                     if schedule.mode == "cbmat" else [],
                "annealing": "delta_c(t) = delta_c * (1 + cos(pi t / T)) / 2, t = step, T = max_steps"
                             if schedule.annealed else "none"}
    return GeneratorConfig(
        dataset_name=dataset.name, labels=dict(dataset.labels), window=window.to_dict(),
        image_size=settings.image_size, preset=settings.preset, fold=str(fold), training_cases=list(case_ids),
        class_frequencies={name: float(f) for name, f in zip(dataset.class_names, frequencies)},
        ablation=ablation, region_classes=[dataset.class_names[v] for v in region_values] if region_values else None,
        unet_config={k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
        scheduler_config={k: v for k, v in dict(build_noise_scheduler().config).items() if not k.startswith("_")},
        training=_jsonable(dataclasses.asdict(settings)), num_parameters=sum(p.numel() for p in unet.parameters()),
        extra={"nnunet_synth_version": nnunet_synth.__version__})


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _differences(saved: dict, new: dict, keys) -> list:
    return [f"{key} {saved.get(key)!r} -> {new.get(key)!r}" for key in keys if saved.get(key) != new.get(key)]


def check_resumable(saved: GeneratorConfig, new: GeneratorConfig, run_folder: Path):
    """Refuse to continue the run in ``run_folder`` (saved config) with other data or settings (new config)."""
    saved_dict, new_dict = _jsonable(saved.to_dict()), _jsonable(new.to_dict())
    # settings added after a run was saved take their default there (e.g. ``mode``: slice)
    saved_dict["training"] = {**_jsonable(dataclasses.asdict(TrainingSettings())), **saved_dict["training"]}
    differing = [key for key in RESUME_KEYS if saved_dict[key] != new_dict[key]]
    if saved_dict["ablation"].get("delta_c", new_dict["ablation"]["delta_c"]) != new_dict["ablation"]["delta_c"]:
        differing.append("CBMAT delta_c")
    settings = sorted(set(saved_dict["training"]) | set(new_dict["training"]))
    differing += _differences(saved_dict["training"], new_dict["training"],
                              [key for key in settings if key not in CHANGEABLE_ON_RESUME])
    if "num_processes" in saved_dict["extra"]:     # the data order depends on it
        differing += _differences(saved_dict["extra"], new_dict["extra"], ["num_processes"])
    if differing:
        raise NnsynthError(f"{run_folder} holds a run with other settings ({'; '.join(differing)}): rerun with the "
                           f"run's settings to resume it, or give another --output folder (or delete {run_folder}) "
                           f"to start a new run")


def _project_configuration(run_folder: Path, settings: TrainingSettings) -> ProjectConfiguration:
    if settings.keep_checkpoints < 2:
        raise NnsynthError(f"--keep-checkpoints must be at least 2, got {settings.keep_checkpoints} (accelerate "
                           f"deletes the oldest checkpoint before writing the next one)")
    return ProjectConfiguration(project_dir=str(run_folder), automatic_checkpoint_naming=True,
                                total_limit=settings.keep_checkpoints)


def resume_checkpoint(run_folder: Path, accelerator: Accelerator):
    """The newest complete checkpoint (or None); sets accelerate's save iteration after it and, on the main
    process, removes checkpoints a killed run left incomplete."""
    check_no_old_checkpoints(run_folder)
    complete = list_checkpoints(run_folder)
    newest = complete[-1] if complete else None
    newest_iteration = checkpoint_iteration(newest) if newest is not None else -1
    if accelerator.is_main_process:
        for folder in checkpoint_folders(run_folder):
            if checkpoint_iteration(folder) > newest_iteration:
                shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    accelerator.project_configuration.iteration = newest_iteration + 1
    return newest


def save_checkpoint(state: TrainingState, config: GeneratorConfig, step: int):
    """accelerate ``save_state`` (on every process), then generator_config.json with the step: from then on the
    checkpoint counts. accelerate removes the oldest beyond ``keep_checkpoints`` before saving."""
    accelerator = state.accelerator
    try:
        accelerator.save_state()
    except (OSError, RuntimeError, SafetensorError) as error:     # e.g. a full disk (torch / safetensors writers)
        raise storage_error(Path(accelerator.project_dir) / CHECKPOINTS_FOLDER,
                            _with_errno(error, accelerator.project_dir), "write a checkpoint") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint_folder = checkpoint_folders(accelerator.project_dir)[-1]
        write_generator_config(dataclasses.replace(config, trained_steps=step), checkpoint_folder)
    accelerator.wait_for_everyone()


def ema_unet(ema: EMAModel, unet_config) -> UNet2DModel:
    """A fresh UNet holding the EMA weights."""
    model = UNet2DModel.from_config(unet_config)
    ema.copy_to(model.parameters())
    return model


def write_preview(path, ema: EMAModel, config: GeneratorConfig, images, label_maps, device, num_inference_steps,
                  step):
    from nnunet_synth.generator.inference import sample_images
    model = ema_unet(ema, config.unet_config)
    generated = sample_images(model, config, label_maps, seeds=list(range(len(label_maps))),
                              num_inference_steps=num_inference_steps, device=device, progress=False)
    write_preview_grid(path, label_maps, images, generated, config.class_names,
                       title=f"{config.dataset_name} step {step} ({config.ablation['mode']})")


def write_final(run_folder: Path, ema: EMAModel, config: GeneratorConfig, preview_file=None) -> Path:
    """``final/``: the pipeline of the EMA model (NnsynthPipeline, or NnsynthInpaintPipeline for an inpainting
    generator; loads with ``DiffusionPipeline.from_pretrained``), generator_config.json and the last preview,
    renamed into place when done."""
    final_folder = run_folder / FINAL_FOLDER
    try:
        temp_folder = fresh_temp_folder(final_folder)
        if config.mode == "inpaint":
            save_pipeline_folder(inpaint_pipeline(ema_unet(ema, config.unet_config), config), temp_folder,
                                 INPAINT_PIPELINE_FILE)
        else:
            from nnunet_synth.generator.inference import generator_pipeline
            save_pipeline_folder(generator_pipeline(ema_unet(ema, config.unet_config), config), temp_folder)
        write_generator_config(config, temp_folder)
        if preview_file is not None and Path(preview_file).is_file():
            shutil.copyfile(preview_file, temp_folder / "preview.png")
        replace_folder(temp_folder, final_folder)
    except (OSError, RuntimeError, SafetensorError) as error:
        shutil.rmtree(final_folder.with_name(final_folder.name + ".incomplete"), ignore_errors=True)
        raise storage_error(final_folder, _with_errno(error, run_folder), "write the trained generator") from None
    return final_folder


def format_duration(seconds: float) -> str:
    """``seconds`` in the largest unit that keeps the number readable: 40 s, 12 min, 5.3 h, 139 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def cpu_cost_warning(preset: str, seconds: float, steps_timed: int, steps_in_run: int) -> str:
    """The line printed when a preset meant for a GPU trains on a CPU: ``steps_timed`` steps took ``seconds``, the
    run has ``steps_in_run`` steps (this call's, from its start or resume step)."""
    per_step = seconds / steps_timed
    return (f"nnsynth: warning: preset '{preset}' is meant for a GPU; on this CPU a step takes {per_step:.1f} s, so "
            f"the {steps_in_run} steps of this run would take about {format_duration(per_step * steps_in_run)}: to "
            f"train on a CPU use --preset {CPU_PRESET} (or a machine with a GPU)")


class CpuCostTimer:
    """Times the first steps of a GPU preset on a CPU and prints ``cpu_cost_warning`` once (on stderr, above the
    progress bar); does nothing on a GPU or for a CPU preset."""

    def __init__(self, preset: str, device: torch.device, steps_in_run: int, enabled: bool = True):
        self.active = enabled and device.type == "cpu" and preset in GPU_PRESETS and steps_in_run > 0
        self.preset, self.steps_in_run = preset, steps_in_run
        self.seconds, self.steps = 0.0, 0

    def start(self):
        self.started = time.perf_counter()

    def stop(self):
        if not self.active:
            return
        self.seconds += time.perf_counter() - self.started
        self.steps += 1
        if self.steps >= CPU_ESTIMATE_STEPS or self.seconds >= CPU_ESTIMATE_SECONDS:
            tqdm.write(cpu_cost_warning(self.preset, self.seconds, self.steps, self.steps_in_run), file=sys.stderr)
            self.active = False


def _with_errno(error: BaseException, folder) -> BaseException:
    """Writers other than Python's (torch, safetensors) lose the errno of a full disk: put it back when the disk
    holding ``folder`` is (nearly) full."""
    if isinstance(error, OSError) and error.errno:
        return error
    free = shutil.disk_usage(Path(folder)).free if Path(folder).exists() else None
    code = errno.ENOSPC if free is not None and free < 16 * 1024 * 1024 else None
    return OSError(code, first_line(error)) if code else error


def train_generator(dataset: RawDataset, run_folder, settings: TrainingSettings, fold="all", case_ids=None,
                    progress=True, step_callback=None) -> TrainingResult:
    """Train (or resume) a generator on the training cases of ``fold`` (or on ``case_ids``) into ``run_folder``.

    Resumes from the newest complete checkpoint in ``run_folder`` when the settings agree (else NnsynthError).
    ``step_callback(step, loss)`` is called after every optimiser step (1-based ``step``). Returns the final
    folder, config and the losses of this call.
    """
    settings = settings.resolved()
    run_folder = Path(run_folder)
    case_ids = fold_training_cases(dataset, fold) if case_ids is None else sorted(case_ids)
    launched = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))   # accelerate launch --cpu: gloo processes
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(settings.mixed_precision, launched.device),
                              project_config=_project_configuration(run_folder, settings))
    device = accelerator.device
    is_main = accelerator.is_main_process
    with accelerator.main_process_first():   # the raw cases are decoded once, into the store generation reads too
        store = open_native_slices(dataset, case_ids, progress=progress and is_main)
    config = prepare_generator_config(dataset, settings, case_ids, fold, store)
    config = dataclasses.replace(config, extra={**config.extra, "num_processes": accelerator.num_processes})

    final_folder = run_folder / FINAL_FOLDER
    if (final_folder / "generator_config.json").is_file():
        final_config = read_generator_config(final_folder)
        check_resumable(final_config, config, run_folder)
        if final_config.trained_steps >= settings.max_steps:
            if is_main:
                print(f"{run_folder} is already trained for {final_config.trained_steps} steps")
            return TrainingResult(run_folder, final_folder, final_config, resumed_from_step=final_config.trained_steps)
    resume_folder = resume_checkpoint(run_folder, accelerator)
    if resume_folder is not None:
        check_resumable(read_generator_config(resume_folder), config, run_folder)

    region_values = [dataset.labels[name] for name in config.region_classes] if config.region_classes else None
    if settings.mode == "inpaint":
        # native-resolution crops drawn from the real slices on demand (inpaint_data.py)
        inpaint_data = inpaint_training_data(store, config, settings, dataset.ignore_label)
        images, label_maps = store.images, store.label_maps
        mode_options = {"num_channels": dataset.num_channels, "step_batches": inpaint_data.step_batches,
                        "loss": inpainting_loss}
    else:
        with accelerator.main_process_first():        # the main process builds the slice cache, the others read it
            cache = open_slice_cache(dataset, case_ids, ImageWindows.from_dict(config.window), settings.image_size,
                                     slice_cache_root(dataset, run_folder), region_values,
                                     progress=progress and is_main, store=store)
        images, label_maps = cache.images, cache.label_maps     # ignore label already "unknown" (0) in the cache
        mode_options = {}
    schedule = make_ablation_schedule(settings.ablation_mode,
                                      list((config.ablation.get("frequencies") or config.class_frequencies).values()),
                                      [dataset.labels[n] for n in config.ablation["protected_classes"]],
                                      settings.delta_0, settings.max_steps, settings.probability_reading,
                                      dataset.ignore_label)

    state = build_training_state(settings, images, label_maps, dataset.num_classes, schedule, accelerator,
                                 **mode_options)
    if resume_folder is not None:
        state.load_checkpoint(resume_folder)
    start_step = state.progress.step
    preview_indices = np.linspace(0, len(images) - 1, min(settings.preview_count, len(images))).astype(int) \
        if settings.mode == "slice" else None
    previews_folder = run_folder / "previews"
    last_preview = None
    if is_main:
        run_folder.mkdir(parents=True, exist_ok=True)
        action = f"resuming at step {start_step}" if resume_folder else "starting"
        size = f"{settings.image_size}px" + (" native-resolution crops (inpainting)" if settings.mode == "inpaint"
                                              else "")
        print(f"training generator on {len(case_ids)} cases ({len(images)} slices) of {dataset.name}, fold {fold}, "
              f"preset {settings.preset} {size}, {config.num_parameters / 1e6:.2f} M parameters, "
              f"ablation {settings.ablation_mode}, {accelerator.num_processes} process(es) on {device}, "
              f"mixed precision {accelerator.mixed_precision}; {action} -> {run_folder}")
        if schedule.mode == "cbmat":
            print("CBMAT delta_c (f_c over " + settings.frequency_definition + " pixels, " +
                  settings.probability_reading + " reading): " +
                  ", ".join(f"{name} {p:.3f}" for name, p in config.ablation["delta_c"].items()))

    losses, pending = [], []      # pending: (step, loss on the device) not yet copied to the host

    def sync_losses():
        if pending:
            values = torch.stack([loss for _, loss in pending]).tolist()
            losses.extend((done_step, value) for (done_step, _), value in zip(pending, values))
            pending.clear()
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}", lr=f"{state.lr_scheduler.get_last_lr()[0]:.2e}")

    bar = tqdm(range(start_step, settings.max_steps), initial=start_step, total=settings.max_steps,
               desc="generator", unit="step", disable=not (progress and is_main))
    cpu_cost = CpuCostTimer(settings.preset, device, settings.max_steps - start_step, enabled=is_main)
    for step in bar:
        cpu_cost.start()
        pending.append((step + 1, training_step(state, step)))
        cpu_cost.stop()
        done = step + 1
        is_last = done == settings.max_steps
        is_checkpoint = done % settings.checkpoint_every == 0 or is_last
        if step_callback is not None or is_checkpoint or done % LOSS_SYNC_EVERY == 0:
            sync_losses()
        if is_main and (done % settings.preview_every == 0 or is_last):
            last_preview = previews_folder / f"step-{done:07d}.png"
            if settings.mode == "inpaint":
                inpaint_data.write_preview(last_preview, ema_unet(state.ema, config.unet_config), config, device,
                                           settings.preview_inference_steps, done)
            else:
                write_preview(last_preview, state.ema, config, images[preview_indices], label_maps[preview_indices],
                              device, settings.preview_inference_steps, done)
        if is_checkpoint:
            save_checkpoint(state, config, done)
        if step_callback is not None:
            step_callback(done, losses[-1][1])
    bar.close()

    final_config = dataclasses.replace(config, trained_steps=settings.max_steps)
    if is_main:
        if last_preview is None:
            existing = sorted(previews_folder.glob("step-*.png"))
            last_preview = existing[-1] if existing else None
        write_final(run_folder, state.ema, final_config, last_preview)
        print(f"generator written to {final_folder}")
    accelerator.wait_for_everyone()
    return TrainingResult(run_folder, final_folder, final_config, losses, start_step)
