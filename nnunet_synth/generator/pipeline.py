"""``NnsynthPipeline``: the trained generator as a diffusers pipeline (UNet + DDIM scheduler) that turns label maps
into images, with optional noise seeding from a reference image (Paired Diffusion §2.5).

A generator's ``final/`` folder is saved with this pipeline: ``model_index.json``, ``unet/``, ``scheduler/`` and a
copy of this file as ``nnsynth_pipeline.py``, so that
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads it (diffusers runs a local pipeline
file only when trusted). This module therefore imports torch, numpy, tqdm and diffusers only.
"""
import contextlib

import numpy as np
import torch
from diffusers import DiffusionPipeline
from tqdm import tqdm

DEFAULT_SEEDING_STRENGTH = 0.8  # Paired Diffusion §2.5 noises the reference to 80-90 % of the schedule


def initial_noise(seeds, image_size: int, num_channels: int = 1) -> torch.Tensor:
    """(N, channels, S, S) Gaussian noise, each case drawn from its own CPU generator so that a case's noise
    depends on its seed only, not on the batch it lands in."""
    return torch.stack([torch.randn((num_channels, image_size, image_size),
                                    generator=torch.Generator("cpu").manual_seed(int(seed))) for seed in seeds])


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


class NnsynthPipeline(DiffusionPipeline):
    """Label map -> image. The UNet's input is the noisy image (``out_channels`` image channels, generated jointly)
    concatenated with the label map as one-hot channels (``in_channels - out_channels`` classes); the scheduler is
    DDIM (eta 0). Label maps hold the dataset's label values; map nnU-Net's ignore label to 0 (background) first,
    as training did (``nnunet_synth.sampling.sample_images`` does this)."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        return self.unet.config.in_channels - self.unet.config.out_channels

    @property
    def num_channels(self) -> int:
        return self.unet.config.out_channels

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size

    def _check_inputs(self, label_maps, seeds, reference_images, strength):
        size = self.image_size
        if label_maps.ndim != 3 or label_maps.shape[1:] != (size, size):
            raise ValueError(f"label_maps must have shape (N, {size}, {size}), got {label_maps.shape}")
        if len(seeds) != len(label_maps):
            raise ValueError(f"need one seed per label map: {len(seeds)} seeds for {len(label_maps)} maps")
        if label_maps.size and (label_maps.min() < 0 or label_maps.max() >= self.num_classes):
            raise ValueError(f"label values must lie in [0, {self.num_classes - 1}]")
        if reference_images is not None:
            expected = (len(label_maps), self.num_channels, size, size)
            if reference_images.shape != expected:
                raise ValueError(f"reference_images must have shape {expected}, got {reference_images.shape}")
            if not 0.0 < strength <= 1.0:
                raise ValueError(f"strength must lie in (0, 1], got {strength}")

    @torch.no_grad()
    def __call__(self, label_maps, seeds, num_inference_steps: int = 50, batch_size: int = 16,
                 reference_images=None, strength=None, progress: bool = True) -> np.ndarray:
        """One image per label map: (N, channels, S, S) float32 in [-1, 1] (model space).

        ``label_maps`` (N, S, S) int at the model size S; ``seeds`` one int per case (same seed, same device: same
        image whatever the batch). The one-hot label map is concatenated at every step and never ablated. With
        ``reference_images`` (N, channels, S, S) in model space, sampling starts from the reference noised to
        ``strength`` (default 0.8) of the schedule, skipping the first (1 - strength) of the timesteps as img2img does.
        """
        label_maps = np.asarray(label_maps)
        seeds = [int(seed) for seed in seeds]
        if reference_images is not None:
            reference_images = np.asarray(reference_images, dtype=np.float32)
            strength = DEFAULT_SEEDING_STRENGTH if strength is None else float(strength)
        self._check_inputs(label_maps, seeds, reference_images, strength)

        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        if reference_images is not None:
            kept_steps = min(num_inference_steps, max(1, int(round(num_inference_steps * strength))))
            timesteps = timesteps[num_inference_steps - kept_steps:]

        unet = self.unet.eval()
        device = unet.device
        unet_dtype = unet.dtype
        outputs = np.empty((len(label_maps), self.num_channels, self.image_size, self.image_size), dtype=np.float32)
        batches = range(0, len(label_maps), batch_size)
        for start in tqdm(batches, desc="sampling", unit="batch", disable=not progress):
            stop = min(start + batch_size, len(label_maps))
            noise = initial_noise(seeds[start:stop], self.image_size, self.num_channels).to(device)
            if reference_images is None:
                sample = noise * self.scheduler.init_noise_sigma
            else:
                reference = torch.from_numpy(reference_images[start:stop]).to(device)
                sample = self.scheduler.add_noise(reference, noise, timesteps[:1].repeat(stop - start))
            label_batch = torch.from_numpy(label_maps[start:stop]).to(device).long()
            condition = torch.nn.functional.one_hot(label_batch, self.num_classes).permute(0, 3, 1, 2).float()
            for timestep in timesteps:
                model_input = torch.cat([sample, condition], dim=1).to(unet_dtype)
                with _autocast(device):
                    noise_prediction = unet(model_input, timestep).sample
                sample = self.scheduler.step(noise_prediction.float(), timestep, sample).prev_sample
            outputs[start:stop] = sample.clamp(-1.0, 1.0).cpu().numpy()
        return outputs
