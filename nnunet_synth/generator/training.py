"""DDPM training of the mask-conditioned generator with CBMAT / MAT / no ablation, in the style of diffusers'
training examples: explicit loop, ``Accelerator`` for devices, mixed precision and multi-GPU (works under
``accelerate launch``), EMA weights, AdamW with warm-up and cosine decay, gradient clipping.

Randomness of step s (data order, noise, timesteps, ablation draws) is a pure function of (seed, s, process), so a
resumed run repeats exactly what an uninterrupted run does; global RNG states are saved too.
"""
import dataclasses
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm import tqdm

import nnunet_synth
from nnunet_synth.dataset import ImageWindows, RawDataset, class_pixel_frequencies, dataset_intensity_window
from nnunet_synth.errors import NnsynthError
from nnunet_synth.generator.ablation import (AblationSchedule, ablate_label_maps, cbmat_class_frequencies,
                                             make_ablation_schedule, mark_unannotated, one_hot_condition,
                                             training_noise)
from nnunet_synth.masks.balance import default_class_roles
from nnunet_synth.generator.checkpoints import (FINAL_FOLDER, checkpoint_step, fresh_temp_folder, list_checkpoints,
                                                read_generator_config, replace_folder, write_generator_config)
from nnunet_synth.generator.config import (NUM_TRAIN_TIMESTEPS, GeneratorConfig, TrainingSettings,
                                           build_noise_scheduler, build_unet)
from nnunet_synth.dataset.splits import fold_training_cases
from nnunet_synth.generator.data import load_model_slices
from nnunet_synth.generator.preview import write_preview_grid

# keys of generator_config.json that must agree before a run folder is resumed
RESUME_KEYS = ("dataset_name", "labels", "image_size", "training_cases", "unet_config", "window", "region_classes")
# losses are copied to the host (one sync) every this many steps, and at checkpoints and the end
LOSS_SYNC_EVERY = 25


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
    images: np.ndarray                  # (N, channels, S, S) float32 in [-1, 1], host memory
    label_maps: np.ndarray              # (N, S, S) int64
    num_classes: int
    memory_format: torch.memory_format


def new_ema(unet, settings: TrainingSettings) -> EMAModel:
    return EMAModel(unet.parameters(), decay=settings.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0,
                    power=settings.ema_power, model_cls=UNet2DModel, model_config=unet.config, foreach=True)


def build_training_state(settings: TrainingSettings, images, label_maps, num_classes: int,
                         schedule: AblationSchedule, accelerator: Accelerator, resume_folder=None) -> TrainingState:
    """UNet, EMA, AdamW, LR schedule (fresh from ``settings.seed`` or loaded from ``resume_folder``) on the
    accelerator's device, with channels_last and fused AdamW on CUDA and optional torch.compile."""
    device = accelerator.device
    torch.manual_seed(settings.seed)
    unet = build_unet(settings, num_classes, images.shape[1])
    ema = new_ema(unet, settings)
    training_state = None
    if resume_folder is not None:
        unet = UNet2DModel.from_pretrained(resume_folder / "unet")
        ema = load_ema(resume_folder / "unet_ema")
        training_state = torch.load(resume_folder / "training_state.pt", map_location="cpu", weights_only=False)
    ema.to(device)
    on_cuda = device.type == "cuda"
    memory_format = torch.channels_last if (on_cuda and settings.channels_last) else torch.contiguous_format
    unet = unet.to(device, memory_format=memory_format)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.learning_rate, betas=settings.adam_betas,
                                  weight_decay=settings.weight_decay, fused=on_cuda)
    # The LR schedule is stepped by hand once per optimiser step (not passed to accelerator.prepare, which would
    # step it once per process).
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.max_steps)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if training_state is not None:
        optimizer.load_state_dict(training_state["optimizer"])
        lr_scheduler.load_state_dict(training_state["lr_scheduler"])
        _restore_rng_states(training_state["rng_states"])
    training_unet = torch.compile(unet) if settings.compile else unet
    noise_scheduler = build_noise_scheduler()
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    data_order = DataOrder(len(images), settings.batch_size, settings.seed, accelerator.num_processes,
                           accelerator.process_index)
    return TrainingState(settings, accelerator, unet, training_unet, optimizer, lr_scheduler, ema, noise_scheduler,
                         schedule, data_order, images, label_maps, num_classes, memory_format)


def _to_device(array_or_tensor, device: torch.device) -> torch.Tensor:
    """Host -> device through pinned memory (asynchronous) on CUDA; the caching host allocator keeps the pinned
    block alive until the copy is done."""
    tensor = torch.as_tensor(array_or_tensor)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def training_step(state: TrainingState, step: int) -> torch.Tensor:
    """Optimiser step ``step`` (0-based) of ``nnsynth_train_generator``: the step's slices and randomness (pure
    functions of seed, step and process), denoising loss, backward, clipping, AdamW, LR schedule, EMA.

    Returns the loss averaged over processes as a device tensor (no host sync). benchmarks/generator_throughput.py
    times this very function.
    """
    settings, accelerator = state.settings, state.accelerator
    device = accelerator.device
    generator = step_generator(settings.seed, step, accelerator.process_index)
    batch = state.data_order.batch_indices(step)
    batch_images = _to_device(state.images[batch], device)
    batch_label_maps = _to_device(state.label_maps[batch], device)
    noise, timesteps, ablated_classes = draw_step_randomness(len(batch), settings.image_size, step, state.schedule,
                                                             settings.offset_noise, generator, state.images.shape[1])
    loss = denoising_loss(state.training_unet, state.noise_scheduler, batch_images, batch_label_maps,
                          _to_device(noise, device), _to_device(timesteps, device), ablated_classes,
                          state.num_classes, state.memory_format)
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(state.unet.parameters(), settings.max_grad_norm)
    state.optimizer.step()
    state.lr_scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.ema.step(accelerator.unwrap_model(state.unet).parameters())
    return accelerator.gather(loss.detach()[None]).mean()


def _names_to_values(names, dataset: RawDataset, what: str):
    unknown = [name for name in names if name not in dataset.labels]
    if unknown:
        raise NnsynthError(f"{what} {unknown} are not labels of {dataset.name} (labels: {list(dataset.labels)})")
    return sorted(dataset.labels[name] for name in names)


def prepare_generator_config(dataset: RawDataset, settings: TrainingSettings, case_ids, fold) -> GeneratorConfig:
    """Frequencies, window, ablation schedule and UNet config of a run, before any training."""
    frequencies = class_pixel_frequencies(dataset, case_ids)
    if settings.protected_classes is None:
        # the surrounding tissue of 000 = the host class of the label maps (masks.default_class_roles): the most
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
    window = dataset_intensity_window(dataset, case_ids, override=settings.window)
    unet = build_unet(settings, dataset.num_classes, dataset.num_channels)
    ablation = {**schedule.to_dict(), "delta_0": settings.delta_0,
                "frequency_definition": settings.frequency_definition,
                "probability_reading": settings.probability_reading,
                "frequencies": {name: float(f) for name, f in zip(dataset.class_names, cbmat_frequencies)},
                "delta_c": {name: float(p) for name, p in zip(dataset.class_names, schedule.initial_probabilities)},
                "protected_classes": [dataset.class_names[v] for v in protected_values] if schedule.mode == "cbmat" else [],
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


def _check_resumable(saved: GeneratorConfig, new: GeneratorConfig, run_folder: Path):
    saved_dict, new_dict = _jsonable(saved.to_dict()), _jsonable(new.to_dict())
    differing = [key for key in RESUME_KEYS if saved_dict[key] != new_dict[key]]
    if saved_dict["ablation"]["mode"] != new_dict["ablation"]["mode"]:
        differing.append("ablation mode")
    if saved_dict["ablation"].get("delta_c", new_dict["ablation"]["delta_c"]) != new_dict["ablation"]["delta_c"]:
        differing.append("CBMAT delta_c (frequency definition or reading)")
    if differing:
        raise NnsynthError(f"{run_folder} holds a run with different {', '.join(differing)}: give another --output "
                           f"folder or delete that one to start over")


def _rng_states():
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_folder: Path, step: int, unet, ema: EMAModel, optimizer, lr_scheduler,
                    noise_scheduler, config: GeneratorConfig, keep: int):
    """Write ``checkpoint-<step>/`` atomically and keep only the ``keep`` newest checkpoints."""
    final_folder = run_folder / f"checkpoint-{step}"
    temp_folder = fresh_temp_folder(final_folder)
    unet.save_pretrained(temp_folder / "unet")
    ema.save_pretrained(temp_folder / "unet_ema")
    noise_scheduler.save_pretrained(temp_folder / "scheduler")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "rng_states": _rng_states()}, temp_folder / "training_state.pt")
    write_generator_config(dataclasses.replace(config, trained_steps=step), temp_folder)
    replace_folder(temp_folder, final_folder)
    for old in list_checkpoints(run_folder)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)


def load_ema(folder) -> EMAModel:
    """EMAModel.from_pretrained without its deprecated ``from_config(path)`` call: weights plus EMA counters."""
    model = UNet2DModel.from_pretrained(folder)
    ema = EMAModel(model.parameters(), model_cls=UNet2DModel, model_config=model.config, foreach=True)
    ema_keys = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")
    saved = UNet2DModel.load_config(folder)
    ema.load_state_dict({key: saved[key] for key in ema_keys if key in saved})
    return ema


def ema_unet(ema: EMAModel, unet_config) -> UNet2DModel:
    """A fresh UNet holding the EMA weights."""
    model = UNet2DModel.from_config(unet_config)
    ema.copy_to(model.parameters())
    return model


def write_preview(path, ema: EMAModel, config: GeneratorConfig, images, label_maps, device, num_inference_steps,
                  step):
    from nnunet_synth.sampling import sample_images
    model = ema_unet(ema, config.unet_config)
    generated = sample_images(model, config, label_maps, seeds=list(range(len(label_maps))),
                              num_inference_steps=num_inference_steps, device=device, progress=False)
    write_preview_grid(path, label_maps, images, generated, config.class_names,
                       title=f"{config.dataset_name} step {step} ({config.ablation['mode']})")


def write_final(run_folder: Path, ema: EMAModel, noise_scheduler, config: GeneratorConfig, preview_file=None) -> Path:
    """``final/``: EMA model, scheduler, generator_config.json and the last preview, renamed into place when done."""
    final_folder = run_folder / FINAL_FOLDER
    temp_folder = fresh_temp_folder(final_folder)
    ema_unet(ema, config.unet_config).save_pretrained(temp_folder / "unet")
    noise_scheduler.save_pretrained(temp_folder / "scheduler")
    write_generator_config(config, temp_folder)
    if preview_file is not None and Path(preview_file).is_file():
        shutil.copyfile(preview_file, temp_folder / "preview.png")
    replace_folder(temp_folder, final_folder)
    return final_folder


def train_generator(dataset: RawDataset, run_folder, settings: TrainingSettings, fold="all", case_ids=None,
                    progress=True, step_callback=None) -> TrainingResult:
    """Train (or resume) a generator on the training cases of ``fold`` (or on ``case_ids``) into ``run_folder``.

    Resumes from the newest ``checkpoint-*`` in ``run_folder``. ``step_callback(step, loss)`` is called after every
    optimiser step (1-based ``step``). Returns the final folder, config and the losses of this call.
    """
    settings = settings.resolved()
    run_folder = Path(run_folder)
    case_ids = fold_training_cases(dataset, fold) if case_ids is None else sorted(case_ids)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(settings.mixed_precision, PartialState().device))
    device = accelerator.device
    is_main = accelerator.is_main_process
    config = prepare_generator_config(dataset, settings, case_ids, fold)

    checkpoints = list_checkpoints(run_folder)
    resume_folder = checkpoints[-1] if checkpoints else None
    if resume_folder is not None:
        _check_resumable(read_generator_config(resume_folder), config, run_folder)
        start_step = checkpoint_step(resume_folder)
    else:
        start_step = 0
    if start_step >= settings.max_steps and (run_folder / FINAL_FOLDER).is_dir():
        if is_main:
            print(f"{run_folder} is already trained for {start_step} steps (max_steps {settings.max_steps})")
        return TrainingResult(run_folder, run_folder / FINAL_FOLDER, read_generator_config(run_folder / FINAL_FOLDER),
                              resumed_from_step=start_step)

    region_values = [dataset.labels[name] for name in config.region_classes] if config.region_classes else None
    images, label_maps, _ = load_model_slices(dataset, case_ids, ImageWindows.from_dict(config.window),
                                              settings.image_size, region_values, progress=progress and is_main)
    label_maps = mark_unannotated(label_maps, dataset.ignore_label)
    schedule = make_ablation_schedule(settings.ablation_mode,
                                      list((config.ablation.get("frequencies") or config.class_frequencies).values()),
                                      [dataset.labels[n] for n in config.ablation["protected_classes"]],
                                      settings.delta_0, settings.max_steps, settings.probability_reading,
                                      dataset.ignore_label)

    state = build_training_state(settings, images, label_maps, dataset.num_classes, schedule, accelerator,
                                 resume_folder)
    preview_indices = np.linspace(0, len(images) - 1, min(settings.preview_count, len(images))).astype(int)
    previews_folder = run_folder / "previews"
    last_preview = None
    if is_main:
        run_folder.mkdir(parents=True, exist_ok=True)
        action = f"resuming at step {start_step}" if resume_folder else "starting"
        print(f"training generator on {len(case_ids)} cases ({len(images)} slices) of {dataset.name}, fold {fold}, "
              f"preset {settings.preset} {settings.image_size}px, {config.num_parameters / 1e6:.2f} M parameters, "
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
    for step in bar:
        pending.append((step + 1, training_step(state, step)))
        done = step + 1
        is_last = done == settings.max_steps
        is_checkpoint = done % settings.checkpoint_every == 0 or is_last
        if step_callback is not None or is_checkpoint or done % LOSS_SYNC_EVERY == 0:
            sync_losses()
        if is_main and (done % settings.preview_every == 0 or is_last):
            last_preview = previews_folder / f"step-{done:07d}.png"
            write_preview(last_preview, state.ema, config, images[preview_indices], label_maps[preview_indices],
                          device, settings.preview_inference_steps, done)
        if is_checkpoint:
            if is_main:
                save_checkpoint(run_folder, done, accelerator.unwrap_model(state.unet), state.ema, state.optimizer,
                                state.lr_scheduler, state.noise_scheduler, config, settings.keep_checkpoints)
            accelerator.wait_for_everyone()
        if step_callback is not None:
            step_callback(done, losses[-1][1])
    bar.close()

    final_config = dataclasses.replace(config, trained_steps=settings.max_steps)
    final_folder = run_folder / FINAL_FOLDER
    if is_main:
        if last_preview is None:
            existing = sorted(previews_folder.glob("step-*.png"))
            last_preview = existing[-1] if existing else None
        write_final(run_folder, state.ema, state.noise_scheduler, final_config, last_preview)
        print(f"generator written to {final_folder}")
    accelerator.wait_for_everyone()
    return TrainingResult(run_folder, final_folder, final_config, losses, start_step)
