"""Stage 4: images from label maps with a trained generator (DDIM, noise seeding)."""
from nnunet_synth.sampling.ddim import initial_noise, sample_images

__all__ = ["sample_images", "initial_noise"]
