"""Stage 4: images from label maps with a trained generator: whole slices (``sample_images``, the DDIM
``NnsynthPipeline`` that lives beside the generator so that training previews need no later stage) and edit
regions filled in place inside real slices (``inpaint``)."""
from nnunet_synth.generator.inference import generator_pipeline, sample_images
from nnunet_synth.generator.pipeline import NnsynthPipeline, initial_noise

__all__ = ["NnsynthPipeline", "generator_pipeline", "sample_images", "initial_noise"]
