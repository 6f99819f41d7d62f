"""The image sources of the generate step, side by side: each makes the images of a fold's balanced label maps
in its own way and answers, through ``ImageSource`` (``base.py``), every question in which they differ (option
checks, generator mode, unit, settings and recipe, blocks, preview).

    generator    whole slices from the whole-slice generator (``whole_slice.py``)
    inpaint      new lesions drawn inside real slices or volumes by the inpainting generator (``inpaint.py``)
    copy-paste   the donors' real pixels pasted where the maps were, no generator (``copy_paste.py``)
"""
from nnunet_synth.errors import NnsynthError
from nnunet_synth.image_sources.base import ImageSource, case_count
from nnunet_synth.image_sources.copy_paste import COPY_PASTE, CopyPasteSettings, generate_copy_paste_cases
from nnunet_synth.image_sources.generators import GenerationSettings, check_generator_for_fold
from nnunet_synth.image_sources.inpaint import INPAINT
from nnunet_synth.image_sources.whole_slice import WHOLE_SLICE

IMAGE_SOURCES = {source.name: source for source in (WHOLE_SLICE, COPY_PASTE, INPAINT)}


def image_source(name: str) -> ImageSource:
    """The image source of an ``--image-source`` value."""
    if name not in IMAGE_SOURCES:
        raise NnsynthError(f"--image-source {name}: choose one of {', '.join(IMAGE_SOURCES)}")
    return IMAGE_SOURCES[name]


def source_of_generator(mode: str) -> ImageSource:
    """The image source that samples a generator of ``mode`` (``TrainingSettings.mode``)."""
    return next(source for source in IMAGE_SOURCES.values() if source.generator_mode == mode)


def generate_synthetic_cases(dataset, generator_folder, settings: GenerationSettings, fold=None, device="cpu",
                             overwrite=False, num_shards: int = 1, shard_index: int = 0) -> dict:
    """Make and write ``settings.num_cases`` synthetic pairs for nnU-Net fold ``fold`` with the generator in
    ``generator_folder``, by the image source of its mode (``GeneratorSource.write_cases``). Returns the summary:
    counts written/skipped, the label-map report, quality pass rate and the preview path."""
    from nnunet_synth.generator.checkpoints import read_generator_config, resolve_generator_folder
    mode = read_generator_config(resolve_generator_folder(generator_folder)).mode
    return source_of_generator(mode).write_cases(dataset, settings, fold, generator_folder, device, overwrite,
                                                 num_shards, shard_index)


__all__ = ["IMAGE_SOURCES", "ImageSource", "image_source", "source_of_generator", "case_count",
           "generate_synthetic_cases", "generate_copy_paste_cases", "GenerationSettings", "CopyPasteSettings",
           "check_generator_for_fold"]
