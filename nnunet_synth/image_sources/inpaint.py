"""The inpaint image source (``nnsynth_generate D --image-source inpaint``): each balanced label map's new lesions
drawn by the inpainting generator inside its target's real slice (DiffTumor, LeFusion), at native resolution.

The fold's maps, shards, resume, store and gate are ``fold_cases.py``'s and the generator's checks
``generators.py``'s; this module adds the options only this source takes (``--sampler``, ``--volume-noise``),
its sampling defaults, the block source (``InpaintBlocks``: edit regions and crops, ``sampling/inpaint.py``) and
the preview grid, which sets the same edit beside copy-paste's real pixels (``masks/pixel_paste.py``).

Unit "volume" (3D data): a map is a whole real volume with 3D lesion components pasted into it
(``masks.balance``), and a case is its target's whole volume, every channel, with the edit region drawn slice by
slice (``sampling.inpaint.inpaint_volume``) and scored inside it (``model_free_volume_score``).
"""
import functools

import numpy as np
from scipy import ndimage

from nnunet_synth.dataset import ImageWindows, RawDataset
from nnunet_synth.dataset.native_slices import NativeSlices
from nnunet_synth.errors import NnsynthError
from nnunet_synth.fold_cases import FoldMaps, MadeCase, resolve_unit
from nnunet_synth.generator.inpaint_pipeline import renoises
from nnunet_synth.generator.inpaint_training import DEFAULT_SAMPLER, inpaint_pipeline, sampling_defaults
from nnunet_synth.image_sources.generators import GenerationSettings, GeneratorSource, LoadedGenerator
from nnunet_synth.image_sources.previews import PREVIEW_ROWS, display_windows, write_volume_preview
from nnunet_synth.masks.pixel_paste import replay_pastes
from nnunet_synth.preview_grid import save_preview_grid
from nnunet_synth.quality.model_free import model_free_volume_score
from nnunet_synth.sampling.inpaint import inpaint_slices, inpaint_volume, map_edit_region, volume_edit_region
from nnunet_synth.writer.synthetic_store import SyntheticStore

IMAGE_SOURCE = "inpaint"
ZOOM_SIZE = 64      # side of the zoomed crop around one edit in the preview


def inpaint_sampling(store: SyntheticStore, fold, unit: str, sampler: str = None, num_inference_steps: int = None):
    """The ``GenerationSettings`` fields sampler, num_inference_steps, clip_x0 and renoise_x0 of an inpainting fold:
    the sampler and steps given; with neither given, those of the fold's recipe in ``store`` (a store resumes as it
    was written, whatever today's default); else ``sampling_defaults``, the estimate clipped and, for a solver of
    ``inpaint_pipeline.RENOISE``, re-noised."""
    recorded = store.manifest["folds"].get(str(fold), {}).get("settings") or {}
    if sampler is None and num_inference_steps is None and recorded.get("sampler") is not None:
        return {"sampler": recorded["sampler"], "num_inference_steps": recorded["num_inference_steps"],
                "clip_x0": recorded.get("clip_x0"), "renoise_x0": recorded.get("renoise_x0")}
    sampler, num_inference_steps = sampling_defaults(unit, sampler, num_inference_steps)
    # renoise_x0 named only for a solver it changes, so a DDIM or UniPC fold's recipe is as it was before
    return {"sampler": sampler, "num_inference_steps": num_inference_steps, "clip_x0": True,
            "renoise_x0": True if renoises(sampler) else None}


class Inpaint(GeneratorSource):
    """The new lesions (plus a margin) drawn inside the target's real slice or volume by the inpainting
    generator (mode "inpaint"); every other pixel stays real."""

    name = IMAGE_SOURCE
    generator_mode = "inpaint"

    def check_options(self, request):
        if request.noise_seeding_strength is not None:
            raise NnsynthError("--noise-seeding starts a whole slice from its real image; an inpainting generator "
                               "keeps the real pixels anyway: leave it out with --image-source inpaint")
        super().check_options(request)

    def refuse_foreign_options(self, request):
        if request.volume_noise == "aligned":
            raise NnsynthError("--volume-noise aligned chooses the initial noise of an inpainting generator's volumes "
                               "(the other image sources do not sample volumes): use it with --image-source inpaint")
        if request.sampler is not None:
            raise NnsynthError("--sampler chooses the inpainting generator's scheduler (the whole-slice generator "
                               "samples with DDIM): use it with --image-source inpaint")

    def default_inference_steps(self, unit: str = "slice") -> int:
        return sampling_defaults(unit)[1]

    def unit(self, dataset: RawDataset, num_slices: dict, unit: str = None) -> str:
        return resolve_unit(dataset, num_slices, unit)

    def settings(self, request, num_cases: int, unit: str, store: SyntheticStore, fold) -> GenerationSettings:
        # the sampler is named in the recipe, so that a later default never mixes into a fold
        sampling = inpaint_sampling(store, fold, unit, request.sampler, request.num_inference_steps)
        return GenerationSettings(num_cases=num_cases, seed=request.seed, target_share=request.target_share,
                                  batch_size=request.batch_size, balancing=request.balancing, unit=unit,
                                  volume_noise=request.volume_noise, **sampling)

    def blocks(self, dataset: RawDataset, settings, fold_maps: FoldMaps, generator: LoadedGenerator = None,
               device="cpu"):
        return InpaintBlocks(generator.unet, generator.config, settings, fold_maps, generator.record,
                             dataset.ignore_label, device)

    def preview(self, dataset: RawDataset, store: SyntheticStore, fold, fold_maps: FoldMaps, settings,
                generator: LoadedGenerator = None):
        if settings.unit == "volume":
            return write_volume_preview(dataset, store, fold, fold_maps.real,
                                        display_windows(dataset, fold_maps.real.slices.images))
        return write_inpaint_preview(dataset, store, fold, fold_maps.real, fold_maps)


INPAINT = Inpaint()


class InpaintBlocks:
    """The cases of a block of new maps: the target's real slice with the map's changes (plus the margin) inpainted;
    the label written is the new map."""

    def __init__(self, unet, config, settings, fold_maps: FoldMaps, generator_record: dict, ignore_label, device):
        self.sampler = settings.sampler or DEFAULT_SAMPLER
        self.pipeline = inpaint_pipeline(unet, config, self.sampler, device, bool(settings.clip_x0),
                                         bool(settings.renoise_x0))
        self.config, self.settings, self.generator_record = config, settings, generator_record
        self.real, self.new_maps, self.image_dtypes = fold_maps.real, fold_maps.new_maps, fold_maps.image_dtypes
        self.ignore_label, self.gates = ignore_label, fold_maps.gates
        self.margin = int(config.training["edit_margin"])
        self.window = ImageWindows.from_dict(config.window)

    def _sampler_record(self) -> dict:
        return {"scheduler": self.sampler, "num_inference_steps": self.settings.num_inference_steps,
                "clip_x0": bool(self.settings.clip_x0), "renoise_x0": self.pipeline.renoises,
                "crop_size": self.config.image_size, "edit_margin": self.margin}

    def __call__(self, batch, seeds) -> list:
        if self.settings.unit == "volume":
            return [self.volume_case(index, seed) for index, seed in zip(batch, seeds)]
        images, label_maps, edits, dtypes = [], [], [], []
        for index in batch:
            new_map = self.new_maps[index]
            target = new_map.provenance["target"]
            real_image, real_map = self.real.slice(target["case_id"], target["slice_index"])
            images.append(real_image)
            label_maps.append(new_map.label_map)
            edits.append(map_edit_region(real_map, new_map.label_map, self.margin))
            dtypes.append(self.image_dtypes[target["case_id"]])
        inpainted = inpaint_slices(self.pipeline, self.window, images, label_maps, edits, seeds, dtypes,
                                   self.settings.num_inference_steps, self.ignore_label, self.settings.batch_size)
        return [MadeCase(result.channel_images, np.asarray(label_map),
                         {"seed": seed, "generator": self.generator_record, "image_source": IMAGE_SOURCE,
                          "sampler": self._sampler_record(), "inpaint": result.record()}, edited=edit)
                for seed, result, label_map, edit in zip(seeds, inpainted, label_maps, edits)]

    def volume_case(self, index: int, seed: int) -> MadeCase:
        """The target's whole volume with the new map's changes (plus the in-plane margin) drawn slice by slice."""
        new_map = self.new_maps[index]
        target_case = new_map.provenance["target"]["case_id"]
        real_image, real_map = self.real.slice(target_case)
        label_map = np.asarray(new_map.label_map)
        edit = volume_edit_region(real_map, label_map, self.margin)
        result = inpaint_volume(self.pipeline, self.window, real_image, label_map, edit, seed,
                                self.image_dtypes[target_case], self.settings.num_inference_steps, self.ignore_label,
                                self.settings.batch_size, self.settings.volume_noise)
        quality = model_free_volume_score(np.stack(result.channel_images).astype(np.float32), label_map, edit,
                                          self.gates)
        return MadeCase(result.channel_images, label_map,
                        {"seed": seed, "generator": self.generator_record, "image_source": IMAGE_SOURCE,
                         "sampler": {**self._sampler_record(), "volume_noise": self.settings.volume_noise},
                         "inpaint": result.record()}, quality, edit)


def _zoom_origin(edit: np.ndarray, size: int):
    """Top-left pixel of the ``size`` window around the largest connected part of ``edit``."""
    parts, count = ndimage.label(edit)
    if count == 0:
        return 0, 0
    largest = 1 + int(np.argmax(ndimage.sum_labels(edit, parts, range(1, count + 1))))
    rows, cols = np.nonzero(parts == largest)
    centre = ((rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2)
    return tuple(int(np.clip(c - size // 2, 0, max(0, n - size))) for c, n in zip(centre, edit.shape))


def write_inpaint_preview(dataset: RawDataset, store: SyntheticStore, fold, real: NativeSlices, fold_maps: FoldMaps,
                          num_rows=PREVIEW_ROWS):
    """Grid: real target + labels | new label map | copy-paste (real pixels) | inpainted | zoom on one edit:
    copy-paste, then inpainted. Images in model space, channels side by side."""
    window = display_windows(dataset, real.images)
    reader = dataset.reader_writer()
    placement = fold_maps.placement()
    rows = []
    for case_id in store.complete_case_ids(fold)[:num_rows]:
        entry = store.cases[case_id]
        target = (entry["source"]["target"]["case_id"], entry["source"]["target"]["slice_index"])
        real_image, real_map = real.slice(*target)
        inpainted = window.to_model(reader.read_images([str(p) for p in store.image_files(case_id)])[0][:, 0])
        label_map = reader.read_seg(str(store.label_file(case_id)))[0][0, 0].astype(int)
        allowed = None if placement is None else functools.partial(placement.mask, target_index=real.row(*target))
        replayed = replay_pastes(real_image, real_map, entry["source"], real.slice, fold_maps.host, allowed)
        pasted = np.asarray(real_image, dtype=np.float64).copy()
        if replayed.edit_box is not None:
            half = len(replayed.edit_box) // 2
            box = tuple(slice(a, b) for a, b in zip(replayed.edit_box[:half], replayed.edit_box[half:]))
            pasted[(slice(None), *box)] = replayed.edited
        pasted = window.to_model(pasted)
        edit = label_map != real_map
        row, col = _zoom_origin(edit, ZOOM_SIZE)
        zoom = (slice(row, row + ZOOM_SIZE), slice(col, col + ZOOM_SIZE))
        rows.append([(window.to_model(real_image), real_map), (None, label_map), (pasted, None), (inpainted, None),
                     (pasted[:, zoom[0], zoom[1]], None), (inpainted[:, zoom[0], zoom[1]], None)])
    path = store.preview_file(fold)
    if rows:
        save_preview_grid(rows, ["real target + labels", "new label map", "copy-paste", "inpainted",
                                 "copy-paste (zoom)", "inpainted (zoom)"], path, dataset.num_classes,
                          window=(-1.0, 1.0))
    return path
