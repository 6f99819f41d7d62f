"""Stage 4: images from label maps with a trained generator (DDIM pipeline, noise seeding)."""
from nnunet_synth.sampling.ddim import generator_pipeline, sample_images
from nnunet_synth.sampling.pipeline import NnsynthPipeline, initial_noise

__all__ = ["NnsynthPipeline", "generator_pipeline", "sample_images", "initial_noise"]
