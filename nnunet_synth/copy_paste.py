"""Copy-paste synthetic cases: the balanced label maps with real pixels instead of a generator's.

Each new label map is a real target map with donor regions pasted into it (``masks/balance.py``); its provenance
records the donor slice, the region (``bbox``, ``component_index``) and the operations. The image is the
target's real slice with the donor's real pixels moved exactly as the region was moved (rotation about the
region's box centre, shift, dilation) and pasted where the region landed, blended over a few pixels at the edge
(a signed-distance feather, scipy.ndimage) so the seam is not a hard step. No generator is trained or loaded: the
cheap baseline a generator has to beat, and a way to balance a dataset without a GPU.

The cases go through the same store, quality gate, preview and trainer as generated ones. They depend on their
``source_cases`` (target and donors) and, recorded as the fold's ``generator_training_cases``, on the fold's
training cases the label maps and the quality gate were built from (no generator saw anything: the list says
which cases shaped the fold's cases, so ``provenance.select_for_fold`` applies unchanged).
"""
import functools
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from nnunet_synth.dataset import ImageWindows, RawDataset, choose_intensity_window
from nnunet_synth.dataset.native_slices import evenly_spread, open_native_slices
from nnunet_synth.dataset.splits import fold_training_cases
from nnunet_synth.masks.balance import Placement
from nnunet_synth.masks.paste import paste_region
from nnunet_synth.masks.regions import dilate_region, find_regions, rotate_region, shift_region
from nnunet_synth.provenance import SOURCE_CASES, label_map_source_cases
from nnunet_synth.quality.model_free import model_free_channel_score
from nnunet_synth.writer.synthetic_store import SyntheticStore, synthetic_case_id

IMAGE_SOURCE = "copy-paste"
FEATHER_PIXELS = 2.0    # half-width of the blended seam


@dataclass(frozen=True)
class DonorPatch:
    """Donor pixels moved like a region: ``image`` (C, h, w) with top-left pixel at ``origin`` in map coordinates."""

    image: np.ndarray
    origin: tuple


def donor_patch(donor_image, bbox, margin: int) -> DonorPatch:
    """The donor's pixels around the region's box, ``margin`` pixels wider on every side (edge-padded)."""
    row0, col0, row1, col1 = bbox
    padded = np.pad(np.asarray(donor_image, dtype=np.float64), ((0, 0), (margin, margin), (margin, margin)),
                    mode="edge")
    return DonorPatch(padded[:, row0:row1 + 2 * margin, col0:col1 + 2 * margin], (row0 - margin, col0 - margin))


def rotate_patch(patch: DonorPatch, angle_deg: float, centre) -> DonorPatch:
    """Rotate about ``centre`` (map coordinates), as ``rotate_region`` turns the mask (linear interpolation)."""
    rotated = np.stack([ndimage.rotate(channel, angle_deg, reshape=True, order=1, mode="nearest")
                        for channel in patch.image])
    origin = np.round(np.asarray(centre) - (np.asarray(rotated.shape[1:]) - 1) / 2).astype(int)
    return DonorPatch(rotated, (int(origin[0]), int(origin[1])))


def place_patch(patch: DonorPatch, shape):
    """(canvas (C, H, W), valid (H, W)): the patch drawn on a map of ``shape``; pixels it does not cover are not
    valid."""
    canvas, valid = np.zeros((len(patch.image), *shape)), np.zeros(shape, dtype=bool)
    row, col = patch.origin
    height, width = patch.image.shape[1:]
    r0, c0, r1, c1 = max(row, 0), max(col, 0), min(row + height, shape[0]), min(col + width, shape[1])
    if r0 < r1 and c0 < c1:
        canvas[:, r0:r1, c0:c1] = patch.image[:, r0 - row:r1 - row, c0 - col:c1 - col]
        valid[r0:r1, c0:c1] = True
    return canvas, valid


def feather_weights(pasted: np.ndarray, may_blend: np.ndarray, width: float = FEATHER_PIXELS) -> np.ndarray:
    """Weight of the donor pixel: 1 deeper than ``width`` inside the pasted pixels, falling linearly across the
    edge to 0 at ``width`` outside (outside only where ``may_blend``); 0 everywhere else."""
    inside = ndimage.distance_transform_edt(pasted) - 0.5
    outside = ndimage.distance_transform_edt(~pasted) - 0.5
    signed = np.where(pasted, inside, -outside)
    weights = np.clip(0.5 + signed / (2 * width), 0.0, 1.0)
    return np.where(pasted | may_blend, weights, 0.0)


def replay_pastes(target_image, target_map, provenance: dict, read_slice, host_classes, where_allowed=None,
                  feather: float = FEATHER_PIXELS):
    """(image, label map, donor-pixel mask): the target slice (C, H, W) with every paste of ``provenance``
    replayed on the map and on the pixels of every channel. ``read_slice(case_id, slice_index)`` = (image, label
    map) of a real slice (``NativeSlices.slice``); ``where_allowed(map, class)`` is where a paste could land (datasets without a host class:
    ``balance.Placement.mask``), default host tissue. The donor-pixel mask marks the pixels that are the donor's
    unblended."""
    image = np.asarray(target_image, dtype=np.float64).copy()
    working = np.asarray(target_map).copy()
    exact = np.zeros(working.shape, dtype=bool)
    for paste in provenance["pastes"]:
        donor = paste["donor"]
        donor_image, donor_map = read_slice(donor["case_id"], donor["slice_index"])
        region = next(r.region for r in find_regions(np.asarray(donor_map), donor["class"])
                      if r.component_index == donor["component_index"])
        dilation = sum(op.get("iterations", 0) for op in paste["operations"])
        patch = donor_patch(donor_image, donor["bbox"], margin=dilation + int(np.ceil(feather)) + 2)
        for operation in paste["operations"]:
            if operation["op"] == "rotate":
                centre = np.asarray(region.origin) + (np.asarray(region.mask.shape) - 1) / 2
                region = rotate_region(region, operation["angle_deg"])
                patch = rotate_patch(patch, operation["angle_deg"], centre)
            elif operation["op"] == "shift":
                region = shift_region(region, operation["offset"])
                patch = DonorPatch(patch.image, (patch.origin[0] + operation["offset"][0],
                                                 patch.origin[1] + operation["offset"][1]))
            elif operation["op"] == "dilate":
                region = dilate_region(region, operation["iterations"])
        allowed = None if where_allowed is None else where_allowed(working, paste["class"])
        new_map, _ = paste_region(working, region, paste["class"], host_classes, allowed)
        pasted = new_map != working
        canvas, valid = place_patch(patch, working.shape)
        may_blend = np.isin(working, list(host_classes)) if host_classes else (working == 0)
        weights = feather_weights(pasted, may_blend, feather) * valid
        image = weights * canvas + (1 - weights) * image
        exact = (exact & ~(weights > 0)) | (weights == 1.0)
        working = new_map
    return image, working, exact


def _placement_mask(placement: Placement, working, pathology_class, target_index):
    """Where ``pathology_class`` may land in ``working``, a map made from real map ``target_index``."""
    return placement.mask(working, pathology_class, target_index)


def _to_dtype(image: np.ndarray, dtype) -> np.ndarray:
    """One channel in the file's pixel type (rounded and clipped for integer types)."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(image), info.min, info.max).astype(dtype)
    return image.astype(dtype)


@dataclass
class CopyPasteSettings:
    """What decides the copy-paste cases; recorded in the manifest as the fold's settings."""

    num_cases: int
    seed: int = 0
    target_share: float = None
    balancing: dict = None
    feather: float = FEATHER_PIXELS

    def recipe(self) -> dict:
        recipe = {k: v for k, v in asdict(self).items() if k != "num_cases"}
        recipe["image_source"] = IMAGE_SOURCE
        return recipe


def num_copy_paste_cases(dataset: RawDataset, fold, ratio: float) -> int:
    """``ratio`` cases per real slice of the fold's training cases (at least 1)."""
    return max(1, round(ratio * len(open_native_slices(dataset, fold_training_cases(dataset, fold)))))


def generate_copy_paste_cases(dataset: RawDataset, settings: CopyPasteSettings, fold="0", overwrite=False) -> dict:
    """Make and write ``settings.num_cases`` copy-paste cases for nnU-Net fold ``fold`` from its training cases
    only; returns the same summary as ``generation.generate_synthetic_cases``."""
    from nnunet_synth.generation import (_check_recipe, check_role_names, prepare_fold_maps,
                                         write_generation_preview)
    fold = str(fold)
    training_cases = fold_training_cases(dataset, fold)
    store = SyntheticStore(dataset)
    with store.exclusive_writer():
        if overwrite:
            check_role_names(dataset, settings.balancing)      # bad names fail before anything is removed
            store.remove_fold(fold)
        recipe = settings.recipe()
        _check_recipe(store, fold, recipe)
        # no generator: generator_training_cases lists the cases the maps and the gate came from
        fold_maps = prepare_fold_maps(dataset, store, fold, recipe, training_cases, settings)
        real, new_maps, mask_report, quality_gates = (fold_maps.real, fold_maps.new_maps, fold_maps.report,
                                                      fold_maps.gates)
        host = fold_maps.host
        placement = None if host else Placement(real.label_maps, real.map_ids, [], fold_maps.pathology,
                                                fold_maps.mask_config, fold_maps.body_masks)
        dtypes = {case_id: [dataset.source_dtype(case_id, channel) for channel in range(dataset.num_channels)]
                  for case_id in training_cases}
        todo = [i for i in range(len(new_maps)) if not store.is_complete(synthetic_case_id(i, fold))]
        for index in tqdm(todo, desc="pasting real pixels", unit="case"):
            provenance = new_maps[index].provenance
            target = (provenance["target"]["case_id"], provenance["target"]["slice_index"])
            allowed = None if placement is None else functools.partial(_placement_mask, placement,
                                                                        target_index=real.row(*target))
            image, label_map, _ = replay_pastes(*real.slice(*target), provenance, real.slice, host, allowed,
                                                settings.feather)
            if not np.array_equal(label_map, new_maps[index].label_map):
                raise RuntimeError(f"replaying the pastes of new map {index} did not give the map (a bug)")
            channel_images = [_to_dtype(channel, dtype) for channel, dtype in zip(image, dtypes[target[0]])]
            entry = {"fold": fold, SOURCE_CASES: label_map_source_cases(provenance), "source": provenance,
                     "seed": settings.seed, "image_source": IMAGE_SOURCE, "generator": None,
                     "copy_paste": {"feather_pixels": settings.feather},
                     "quality": {"model_free": model_free_channel_score(
                         np.stack(channel_images).astype(np.float32), label_map, quality_gates)}}
            store.write_case(synthetic_case_id(index, fold), channel_images, label_map, real.properties[target[0]],
                             dtypes[target[0]], entry)
        store.save_manifest()
        preview = write_generation_preview(dataset, store, fold, real, display_windows(dataset, real.images))
    fold_cases = store.complete_case_ids(fold)
    passed = [c for c in fold_cases if store.cases[c].get("quality", {}).get("model_free", {}).get("passed")]
    return {"fold": fold, "written": len(todo), "skipped": len(new_maps) - len(todo), "total": len(fold_cases),
            "label_map_report": mask_report, "model_free_passed": len(passed), "preview": str(preview),
            "store": str(store.manifest_file)}


def display_windows(dataset: RawDataset, images, max_slices: int = 2000) -> ImageWindows:
    """The preview grid's grey scale per channel, chosen as a generator's window would be (a sample of at most
    ``max_slices`` real slices, evenly spread)."""
    chosen = [images[i] for i in evenly_spread(len(images), max_slices)]
    return ImageWindows(tuple(
        choose_intensity_window(np.concatenate([np.asarray(image[channel], dtype=np.float32).ravel()[::97]
                                                for image in chosen]), name)
        for channel, name in enumerate(dataset.channel_list)))
