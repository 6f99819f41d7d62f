"""Sampling with a loaded generator (UNet + GeneratorConfig): builds the ``NnsynthPipeline`` (DDIM from the
training scheduler's config) and runs it."""
import torch
from diffusers import DDIMScheduler

from nnunet_synth.generator.ablation import mark_unannotated
from nnunet_synth.generator.config import DDIM_INFERENCE_STEPS, GeneratorConfig
from nnunet_synth.generator.pipeline import NnsynthPipeline


def _as_config(generator_config) -> GeneratorConfig:
    return (generator_config if isinstance(generator_config, GeneratorConfig)
            else GeneratorConfig.from_dict(generator_config))


def generator_pipeline(unet, generator_config, device="cpu") -> NnsynthPipeline:
    """The pipeline of a generator: ``unet`` (moved to ``device``) and DDIM built from its DDPM scheduler config."""
    config = _as_config(generator_config)
    scheduler = DDIMScheduler.from_config(config.scheduler_config)
    return NnsynthPipeline(unet=unet.to(torch.device(device)), scheduler=scheduler)


def sample_images(unet, generator_config, label_maps, seeds, num_inference_steps=DDIM_INFERENCE_STEPS, batch_size=16,
                  device="cpu", reference_images=None, strength=None, progress=True):
    """Generate one image per label map with ``NnsynthPipeline``; returns (N, channels, S, S) float32 in [-1, 1].

    See ``NnsynthPipeline.__call__`` for the arguments (seeded per case, noise seeding from ``reference_images``).
    Pixels of nnU-Net's ignore label are "unknown": background in the condition, as in training.
    """
    config = _as_config(generator_config)
    pipeline = generator_pipeline(unet, config, device)
    return pipeline(mark_unannotated(label_maps, config.ignore_label), seeds, num_inference_steps=num_inference_steps,
                    batch_size=batch_size, reference_images=reference_images, strength=strength, progress=progress)
