"""``NnsynthInpaintPipeline``: the inpainting generator as a diffusers pipeline (UNet + scheduler) that fills the
edit region of native-resolution crops from a label map, keeping every other pixel.

The UNet's input is, as in diffusers' inpainting UNets, the noisy image concatenated with the known image (the real
crop with the edit region blanked to 0), the edit mask and the label map as one-hot channels. Known pixels
(outside the edit mask) follow the real image at every step: their noise prediction is replaced by the noise that
makes the scheduler's clean-image estimate the real pixel, so every solver (DDIM, DPM-Solver++, UniPC) keeps them on
the real image's noising path without drawing extra noise (the known-region step of RePaint, made deterministic).
With DPM-Solver++ and its estimate clipped, the sample is re-noised from the clipped estimate before each step
(``renoise_x0``, see ``RENOISE``), so that its first-order step is DDIM's clipped step; ``make_scheduler`` gives such a
solver trailing timesteps.

An inpainting generator's ``final/`` folder is saved with this pipeline: ``model_index.json``, ``unet/``,
``scheduler/`` and a copy of this file as ``nnsynth_inpaint_pipeline.py``, so that
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads it. This module therefore imports
torch, numpy, tqdm and diffusers only; training and sampling both import it from here. The helpers it shares with
``pipeline.py`` are copies marked ``# Copied from`` (``tests/test_layers.py`` compares them with the source).
"""
import contextlib

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)
from tqdm import tqdm

# name -> (scheduler class, options); all are built from the training DDPM scheduler's config
SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {"solver_order": 2}),
}
# The clean-image estimate clipped to the model range [-1, 1] at every step. DDIM does it through the DDPM config's
# clip_sample; the multistep solvers have no clip_sample and clip only with thresholding (Imagen's dynamic
# thresholding, Saharia et al. 2022, whose per-image scale s is held at sample_max_value = 1, i.e. plain clipping).
# Without it an undertrained model's estimates of large edit regions leave [-1, 1] by far at the first, noisiest
# steps, a few-step solver carries them into the result and the final clamp turns them into salt-and-pepper
# pixels (docs/inpainting.md, "Few-step samplers").
CLIP_X0_OPTIONS = {"thresholding": True, "sample_max_value": 1.0}
# Clipping the estimate is not enough for a multistep solver: it steps from x_t and the clipped estimate, so the part
# of the estimate that was clipped off stays in x_t (the step is DDIM's with the noise implied by the clipped
# estimate, DDIMScheduler's use_clipped_model_output=True). At the noisy steps most estimates of a large edit region
# lie outside [-1, 1]; the excess kept in x_t pushes the next estimates further out, and the edit ends in
# salt-and-pepper pixels (DDIM 20 stepped that way speckles as UniPC 10 does on the MS volumes). DDIM steps from the
# clipped estimate and the model's own noise; re-noising x_t <- sqrt(a) clip(x0) + sqrt(1 - a) eps before the step
# gives DPM-Solver++ the same start, its first-order step is then DDIM's (docs/inpainting.md, "Few-step samplers").
# DDIM's own step does it already; UniPC's corrector moves x_t again after the model's call, which undoes it.
RENOISE = (DPMSolverMultistepScheduler,)
# The re-noised solver's timesteps: trailing (from t = 999, 999 - 1000 / n, ...) instead of the DDPM config's leading
# spacing (from t = 900 at 10 steps); on the MS volume's large edits it halved the speckle of 10 steps.
RENOISE_OPTIONS = {"timestep_spacing": "trailing"}


def renoises(sampler: str) -> bool:
    """Whether the pipeline re-noises the steps of ``sampler`` (a solver of ``RENOISE``)."""
    return sampler in SAMPLERS and issubclass(SAMPLERS[sampler][0], RENOISE)


def make_scheduler(sampler: str, scheduler_config, clip_x0: bool = True, renoise_x0: bool = False):
    """The scheduler named ``sampler`` (see ``SAMPLERS``) from a DDPM scheduler config; ``clip_x0``: its clean-image
    estimate clipped to [-1, 1] at every step (DDIM always does, through the DDPM config's clip_sample);
    ``renoise_x0``: a solver of ``RENOISE`` gets the timesteps of ``RENOISE_OPTIONS``, for a pipeline that re-noises
    its sample from the clipped estimate (``NnsynthInpaintPipeline``)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    scheduler_class, options = SAMPLERS[sampler]
    if clip_x0 and scheduler_class is not DDIMScheduler:
        options = {**options, **CLIP_X0_OPTIONS}
    if clip_x0 and renoise_x0 and issubclass(scheduler_class, RENOISE):
        options = {**options, **RENOISE_OPTIONS}
    return scheduler_class.from_config(dict(scheduler_config), **options)


# Copied from nnunet_synth.generator.pipeline.initial_noise with case->crop
def initial_noise(seeds, image_size: int, num_channels: int = 1) -> torch.Tensor:
    """(N, channels, S, S) Gaussian noise, each crop drawn from its own CPU generator so that a crop's noise
    depends on its seed only, not on the batch it lands in."""
    return torch.stack([torch.randn((num_channels, image_size, image_size),
                                    generator=torch.Generator("cpu").manual_seed(int(seed))) for seed in seeds])


# Copied from nnunet_synth.generator.pipeline._autocast
def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def inpainting_condition(known_images: torch.Tensor, edit_masks: torch.Tensor, label_maps: torch.Tensor,
                         num_classes: int) -> torch.Tensor:
    """(B, channels + 1 + classes, S, S): known image with the edit region blanked to 0, the edit mask, the one-hot
    label map. ``known_images`` (B, C, S, S) in [-1, 1], ``edit_masks`` (B, S, S) (1 = edit), ``label_maps``
    (B, S, S) int."""
    mask = edit_masks[:, None].to(known_images.dtype)
    one_hot = torch.nn.functional.one_hot(label_maps.long(), num_classes).permute(0, 3, 1, 2).to(known_images.dtype)
    return torch.cat([known_images * (1 - mask), mask, one_hot], dim=1)


class NnsynthInpaintPipeline(DiffusionPipeline):
    """(known crop, edit mask, label map) -> crop with the edit region drawn. Label maps hold the dataset's label
    values with nnU-Net's ignore label already mapped to 0, as in training."""

    def __init__(self, unet, scheduler, renoise_x0: bool = True):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.renoise_x0 = renoise_x0        # re-noise from the clipped estimate before each step (RENOISE)

    @property
    def renoises(self) -> bool:
        """Whether each step starts from x_t re-noised from the clipped clean-image estimate (``RENOISE``)."""
        return (self.renoise_x0 and isinstance(self.scheduler, RENOISE)
                and bool(getattr(self.scheduler.config, "thresholding", False)))

    @property
    def num_channels(self) -> int:
        return self.unet.config.out_channels

    @property
    def num_classes(self) -> int:
        return self.unet.config.in_channels - 2 * self.unet.config.out_channels - 1

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size

    def _check_inputs(self, known_images, edit_masks, label_maps, seeds, noise=None):
        size, count = self.image_size, len(label_maps)
        if known_images.shape != (count, self.num_channels, size, size):
            raise ValueError(f"known_images must have shape ({count}, {self.num_channels}, {size}, {size}), got "
                             f"{known_images.shape}")
        if edit_masks.shape != (count, size, size) or label_maps.shape != (count, size, size):
            raise ValueError(f"edit_masks and label_maps must have shape ({count}, {size}, {size}), got "
                             f"{edit_masks.shape} and {label_maps.shape}")
        if len(seeds) != count:
            raise ValueError(f"need one seed per crop: {len(seeds)} seeds for {count} crops")
        if noise is not None and noise.shape != known_images.shape:
            raise ValueError(f"noise must have the shape of known_images {known_images.shape}, got {noise.shape}")
        if label_maps.size and (label_maps.min() < 0 or label_maps.max() >= self.num_classes):
            raise ValueError(f"label values must lie in [0, {self.num_classes - 1}]")

    @torch.no_grad()
    def __call__(self, known_images, edit_masks, label_maps, seeds, num_inference_steps: int = 20,
                 batch_size: int = 16, progress: bool = True, noise=None) -> np.ndarray:
        """(N, channels, S, S) float32 in [-1, 1]: the crops with their edit regions drawn; pixels outside the edit
        mask are ``known_images`` exactly. ``known_images`` (N, C, S, S) in model space, ``edit_masks`` (N, S, S)
        bool, ``label_maps`` (N, S, S) int, ``seeds`` one int per crop (same seed, same device: same result
        whatever the batch). ``noise`` (N, C, S, S): the initial noise of each crop instead of its seed's."""
        known_images = np.asarray(known_images, dtype=np.float32)
        edit_masks = np.asarray(edit_masks, dtype=bool)
        label_maps = np.asarray(label_maps)
        seeds = [int(seed) for seed in seeds]
        noise = None if noise is None else np.asarray(noise, dtype=np.float32)
        self._check_inputs(known_images, edit_masks, label_maps, seeds, noise)
        unet = self.unet.eval()
        device, unet_dtype = unet.device, unet.dtype
        alphas_cumprod = self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        renoises = self.renoises
        outputs = known_images.copy()
        for start in tqdm(range(0, len(label_maps), batch_size), desc="inpainting", unit="batch",
                          disable=not progress):
            stop = min(start + batch_size, len(label_maps))
            known = torch.from_numpy(known_images[start:stop]).to(device)
            mask = torch.from_numpy(edit_masks[start:stop]).to(device)
            condition = inpainting_condition(known, mask, torch.from_numpy(label_maps[start:stop]).to(device),
                                             self.num_classes)
            edit = mask[:, None].float()
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            sample = (initial_noise(seeds[start:stop], self.image_size, self.num_channels) if noise is None
                      else torch.from_numpy(noise[start:stop])).to(device)
            sample = sample * self.scheduler.init_noise_sigma
            for timestep in self.scheduler.timesteps:
                model_input = torch.cat([self.scheduler.scale_model_input(sample, timestep), condition], dim=1)
                with _autocast(device):
                    noise_prediction = unet(model_input.to(unet_dtype), timestep).sample.float()
                alpha = alphas_cumprod[int(timestep)]
                known_noise = (sample - alpha.sqrt() * known) / (1 - alpha).sqrt()
                noise_prediction = edit * noise_prediction + (1 - edit) * known_noise
                if renoises:
                    estimate = (sample - (1 - alpha).sqrt() * noise_prediction) / alpha.sqrt()
                    sample = alpha.sqrt() * estimate.clamp(-1.0, 1.0) + (1 - alpha).sqrt() * noise_prediction
                sample = self.scheduler.step(noise_prediction, timestep, sample).prev_sample
            drawn = sample.clamp(-1.0, 1.0).cpu().numpy()
            region = edit_masks[start:stop][:, None].repeat(self.num_channels, axis=1)
            outputs[start:stop][region] = drawn[region]
        return outputs
