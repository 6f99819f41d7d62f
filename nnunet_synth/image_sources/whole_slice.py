"""The whole-slice image source (``nnsynth_generate D --image-source generator``): every case a whole slice drawn
by the mask-conditioned generator from its balanced label map (Diff-Lung), with DDIM.

The fold's maps, shards, resume, store and gate are ``fold_cases.py``'s, the generator's checks
``generators.py``'s; this module adds the block source (``SliceBlocks``) and its preview.
"""
import numpy as np

from nnunet_synth.dataset import ImageWindows, RawDataset, fit_slice, restore_slice
from nnunet_synth.errors import NnsynthError
from nnunet_synth.fold_cases import FoldMaps, MadeCase
from nnunet_synth.generator.config import DDIM_INFERENCE_STEPS
from nnunet_synth.generator.data import MODEL_MINIMUM
from nnunet_synth.image_sources.generators import GenerationSettings, GeneratorSource, LoadedGenerator
from nnunet_synth.image_sources.previews import write_slice_preview
from nnunet_synth.sampling import sample_images
from nnunet_synth.writer.synthetic_store import SyntheticStore

SLICES_ONLY = "--unit volume needs --image-source copy-paste or inpaint: the whole-slice generator draws slices"


class WholeSlice(GeneratorSource):
    """Whole slices from the whole-slice generator (mode "slice"); a case is always one slice."""

    name = "generator"
    generator_mode = "slice"

    def check_options(self, request):
        if request.unit == "volume":
            raise NnsynthError(SLICES_ONLY)
        super().check_options(request)

    def default_inference_steps(self, unit: str = "slice") -> int:
        return DDIM_INFERENCE_STEPS

    def unit(self, dataset: RawDataset, num_slices: dict, unit: str = None) -> str:
        if unit == "volume":
            raise NnsynthError(SLICES_ONLY)
        return "slice"

    def settings(self, request, num_cases: int, unit: str, store, fold) -> GenerationSettings:
        return GenerationSettings(num_cases=num_cases, seed=request.seed,
                                  num_inference_steps=request.num_inference_steps or self.default_inference_steps(unit),
                                  target_share=request.target_share,
                                  noise_seeding_strength=request.noise_seeding_strength,
                                  batch_size=request.batch_size, balancing=request.balancing, unit=unit,
                                  volume_noise=request.volume_noise)

    def blocks(self, dataset: RawDataset, settings, fold_maps: FoldMaps, generator: LoadedGenerator = None,
               device="cpu"):
        return SliceBlocks(generator.unet, generator.config, settings, fold_maps, generator.record, device)

    def preview(self, dataset: RawDataset, store: SyntheticStore, fold, fold_maps: FoldMaps, settings,
                generator: LoadedGenerator = None):
        window = ImageWindows.from_dict(generator.config.window)
        return write_slice_preview(dataset, store, fold, fold_maps.real, window)


WHOLE_SLICE = WholeSlice()


class SliceBlocks:
    """Whole slices drawn by the mask-conditioned generator from the new maps fitted to its size (Diff-Lung)."""

    def __init__(self, unet, config, settings: GenerationSettings, fold_maps: FoldMaps, generator_record: dict,
                 device):
        self.unet, self.config, self.settings, self.device = unet, config, settings, device
        self.real, self.new_maps, self.image_dtypes = fold_maps.real, fold_maps.new_maps, fold_maps.image_dtypes
        self.window, self.generator_record = ImageWindows.from_dict(config.window), generator_record

    def __call__(self, batch, seeds) -> list:
        model_label_maps, references, fits = [], [], []
        for index in batch:
            target = self.new_maps[index].provenance["target"]
            real_image, _ = self.real.slice(target["case_id"], target["slice_index"])
            reference, model_map, fit = fit_slice(self.window.to_model(real_image), self.new_maps[index].label_map,
                                                  self.config.image_size, MODEL_MINIMUM)
            model_label_maps.append(model_map)
            references.append(reference)
            fits.append((fit, target["case_id"]))
        strength = self.settings.noise_seeding_strength
        generated = sample_images(self.unet, self.config, np.stack(model_label_maps), seeds,
                                  num_inference_steps=self.settings.num_inference_steps, batch_size=len(batch),
                                  device=self.device, progress=False,
                                  reference_images=None if strength is None else np.stack(references),
                                  strength=strength)
        made = []
        for seed, generated_image, model_map, (fit, target_case) in zip(seeds, generated, model_label_maps, fits):
            # The label written is the conditioning map taken back to the slice's geometry (nearest), not the full
            # resolution map: below the slice size, a small pasted region can vanish when the map is fitted, and
            # would then be in the written label but not in the image.
            restored, label_map = restore_slice(generated_image, model_map, fit)
            made.append(MadeCase(self.window.from_model(restored, self.image_dtypes[target_case]), label_map,
                                 {"seed": seed, "generator": self.generator_record,
                                  "sampler": {"scheduler": "DDIM",
                                              "num_inference_steps": self.settings.num_inference_steps,
                                              "conditioning_size": self.config.image_size,
                                              "noise_seeding_strength": strength}}))
        return made
