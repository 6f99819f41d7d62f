"""DDIM sampling of images from label maps, with optional noise seeding from a reference image (004 §2.5)."""
import contextlib

import numpy as np
import torch
from diffusers import DDIMScheduler
from tqdm import tqdm

from nnunet_synth.generator.ablation import mark_unannotated, one_hot_condition
from nnunet_synth.generator.config import GeneratorConfig

DEFAULT_SEEDING_STRENGTH = 0.8  # 004 §2.5 noises the reference to 80-90 % of the schedule


def _as_config(generator_config) -> GeneratorConfig:
    return generator_config if isinstance(generator_config, GeneratorConfig) else GeneratorConfig.from_dict(generator_config)


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def initial_noise(seeds, image_size: int, num_channels: int = 1) -> torch.Tensor:
    """(N, channels, S, S) Gaussian noise, each case drawn from its own CPU generator so that a case's noise
    depends on its seed only, not on the batch it lands in."""
    return torch.stack([torch.randn((num_channels, image_size, image_size),
                                    generator=torch.Generator("cpu").manual_seed(int(seed))) for seed in seeds])


@torch.no_grad()
def sample_images(unet, generator_config, label_maps, seeds, num_inference_steps=50, batch_size=16, device="cpu",
                  reference_images=None, strength=None, progress=True) -> np.ndarray:
    """Generate one image per label map; returns (N, channels, S, S) float32 in [-1, 1] (model space).

    ``label_maps`` (N, S, S) int at the model size S; ``seeds`` one int per case (same seed, same device: same
    image whatever the batch). DDIM (eta 0) built from the training DDPM scheduler config; the one-hot label map
    is concatenated at every step and never ablated (pixels of nnU-Net's ignore label are "unknown": background in
    the condition, as in training). With ``reference_images`` (N, channels, S, S) in model space, sampling
    starts from the reference noised to ``strength`` (default 0.8) of the schedule, skipping the first
    (1 - strength) of the timesteps as diffusers' img2img does (noise seeding, 004 §2.5).
    """
    config = _as_config(generator_config)
    device = torch.device(device)
    label_maps = np.asarray(label_maps)
    seeds = [int(seed) for seed in seeds]
    size = config.image_size
    if label_maps.ndim != 3 or label_maps.shape[1:] != (size, size):
        raise ValueError(f"label_maps must have shape (N, {size}, {size}), got {label_maps.shape}")
    if len(seeds) != len(label_maps):
        raise ValueError(f"need one seed per label map: {len(seeds)} seeds for {len(label_maps)} maps")
    if label_maps.size and (label_maps.min() < 0 or label_maps.max() >= config.num_classes):
        raise ValueError(f"label values must lie in [0, {config.num_classes - 1}]")
    if reference_images is not None:
        reference_images = np.asarray(reference_images, dtype=np.float32)
        expected = (len(label_maps), config.num_channels, size, size)
        if reference_images.shape != expected:
            raise ValueError(f"reference_images must have shape {expected}, got {reference_images.shape}")
        strength = DEFAULT_SEEDING_STRENGTH if strength is None else float(strength)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must lie in (0, 1], got {strength}")

    scheduler = DDIMScheduler.from_config(config.scheduler_config)
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps
    if reference_images is not None:
        kept_steps = min(num_inference_steps, max(1, int(round(num_inference_steps * strength))))
        timesteps = timesteps[num_inference_steps - kept_steps:]

    unet = unet.to(device).eval()
    unet_dtype = next(unet.parameters()).dtype
    outputs = np.empty((len(label_maps), config.num_channels, size, size), dtype=np.float32)
    condition_maps = mark_unannotated(label_maps, config.ignore_label)
    batches = range(0, len(label_maps), batch_size)
    for start in tqdm(batches, desc="sampling", unit="batch", disable=not progress):
        stop = min(start + batch_size, len(label_maps))
        noise = initial_noise(seeds[start:stop], size, config.num_channels).to(device)
        if reference_images is None:
            sample = noise * scheduler.init_noise_sigma
        else:
            reference = torch.from_numpy(reference_images[start:stop]).to(device)
            sample = scheduler.add_noise(reference, noise, timesteps[:1].repeat(stop - start))
        condition = one_hot_condition(torch.from_numpy(condition_maps[start:stop]).to(device), config.num_classes)
        for timestep in timesteps:
            model_input = torch.cat([sample, condition], dim=1).to(unet_dtype)
            with _autocast(device):
                noise_prediction = unet(model_input, timestep).sample
            sample = scheduler.step(noise_prediction.float(), timestep, sample).prev_sample
        outputs[start:stop] = sample.clamp(-1.0, 1.0).cpu().numpy()
    return outputs
