"""What an inpainting run (``--mode inpaint``) adds to generator training: crops instead of whole slices, their
previews, and the pipeline its ``final/`` folder holds. The loop, checkpoints, EMA and CBMAT are training.py's."""
from dataclasses import dataclass

import numpy as np

from nnunet_synth.dataset import ImageWindows
from nnunet_synth.generator.config import GeneratorConfig, TrainingSettings
from nnunet_synth.generator.inpaint_data import (
    CropSampler,
    inpaint_step_batches,
    pathology_components,
    preview_crops,
)
from nnunet_synth.generator.inpaint_pipeline import (
    NnsynthInpaintPipeline,
    make_scheduler,
)
from nnunet_synth.masks.balance import default_class_roles
from nnunet_synth.preview_grid import save_preview_grid

INPAINT_PIPELINE_FILE = "nnsynth_inpaint_pipeline.py"
DEFAULT_SAMPLER = "unipc"         # the best sampler at <= 20 steps on lesion-region fidelity (docs/inpainting.md)
DEFAULT_INFERENCE_STEPS = 10
# whole volumes: DPM-Solver++ re-noised from its clipped estimate (inpaint_pipeline.RENOISE) drew the large edits of
# an MS volume with DDIM 20's speckle in 0.6x its time; UniPC's corrector undoes the re-noising (docs/inpainting.md,
# few-step samplers)
VOLUME_SAMPLER, VOLUME_INFERENCE_STEPS = "dpmsolver++", 12


def sampling_defaults(unit: str, sampler: str = None, num_inference_steps: int = None):
    """(sampler, steps) of an inpainting generator: the given ones, else UniPC 10 for slices, DPM-Solver++ 12 for
    volumes."""
    volume = unit == "volume"
    return (sampler or (VOLUME_SAMPLER if volume else DEFAULT_SAMPLER),
            num_inference_steps or (VOLUME_INFERENCE_STEPS if volume else DEFAULT_INFERENCE_STEPS))


def inpaint_pipeline(unet, generator_config: GeneratorConfig, sampler: str = DEFAULT_SAMPLER,
                     device="cpu", clip_x0: bool = True, renoise_x0: bool = True) -> NnsynthInpaintPipeline:
    """The pipeline of an inpainting generator with the scheduler ``sampler`` built from its DDPM config
    (``clip_x0``, ``renoise_x0``: ``make_scheduler``'s and ``NnsynthInpaintPipeline``'s)."""
    import torch
    scheduler = make_scheduler(sampler, generator_config.scheduler_config, clip_x0, renoise_x0)
    return NnsynthInpaintPipeline(unet=unet.to(torch.device(device)), scheduler=scheduler, renoise_x0=renoise_x0)


def class_roles_of(generator_config: GeneratorConfig):
    """(host, pathology) class values of the generator's training maps (``masks.default_class_roles`` on its class
    frequencies); nnU-Net's ignore label is neither."""
    frequencies = np.asarray([generator_config.class_frequencies[name] for name in generator_config.class_names])
    host, pathology = default_class_roles(frequencies)
    ignore = generator_config.ignore_label
    return [c for c in host if c != ignore], [c for c in pathology if c != ignore]


@dataclass
class InpaintTrainingData:
    sampler: CropSampler
    preview: tuple                  # fixed crops (images, maps, edit masks) drawn once

    @property
    def step_batches(self):
        return inpaint_step_batches(self.sampler)

    def write_preview(self, path, unet, config: GeneratorConfig, device, num_inference_steps, step):
        """Rows: known crop (edit region blanked) | label map | inpainted | real crop."""
        images, label_maps, edit_masks = self.preview
        pipeline = inpaint_pipeline(unet, config, DEFAULT_SAMPLER, device)
        drawn = pipeline(images, edit_masks > 0, label_maps, seeds=list(range(len(images))),
                         num_inference_steps=num_inference_steps, progress=False)
        rows = [[(image * (1 - edit), edit.astype(int)), (None, label_map), (result, None), (image, label_map)]
                for image, label_map, edit, result in zip(images, label_maps, edit_masks, drawn)]
        save_preview_grid(rows, ["known + edit region", "label map", "inpainted", "real"], path,
                          config.num_classes, window=(-1.0, 1.0),
                          title=f"{config.dataset_name} inpainting step {step} ({config.ablation['mode']})")


def inpaint_training_data(store, config: GeneratorConfig, settings: TrainingSettings, ignore_label):
    """The crop sampler of a run on ``store`` (the training cases' ``NativeSlices``) and its preview crops."""
    host, pathology = class_roles_of(config)
    sampler = CropSampler(store.images, store.label_maps, pathology_components(store.label_maps, pathology),
                          ImageWindows.from_dict(config.window), settings.image_size, host, ignore_label,
                          settings.edit_margin, settings.p_lesion_crop, settings.p_lesion_edit, settings.p_moved_edit)
    return InpaintTrainingData(sampler, preview_crops(sampler, settings.preview_count, settings.seed, len(store)))
