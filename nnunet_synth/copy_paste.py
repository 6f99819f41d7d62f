"""Copy-paste synthetic cases: the balanced label maps with real pixels instead of a generator's.

Each new label map is a real target map with donor regions pasted into it (``masks/balance.py``); its provenance
records the donor map (a slice or a volume), the region (``bbox``, ``component_index``) and the operations. The image is
the target's real slice with the donor's real pixels moved exactly as the region was moved (rotation about the
region's box centre, shift, dilation) and pasted where the region landed, blended over a few pixels at the edge
(a signed-distance feather, scipy.ndimage) so the seam is not a hard step. No generator is trained or loaded: the
cheap baseline a generator has to beat, and a way to balance a dataset without a GPU.

Volumes (unit "volume", the default for 3D data): the maps are whole real volumes, the donors 3D connected
components, and a case is its target's whole volume, every channel, at the real case's geometry, with the
donor's voxels moved as the component was moved (in-plane rotation of every slice with linear interpolation, 3D
shift) and the seam feathered in 3D; outside the recorded ``edit_box`` it is the target's voxels bit for bit. The
pastes are replayed on the label map first and the image is blended inside that box only, so memory stays about
one volume plus the donors' patches. nnU-Net's 2d, 3d_fullres and 3d_lowres configurations all see such a case
as a real one.

The cases go through the same store, quality gate, preview and trainer as generated ones. They depend on their
``source_cases`` (target and donors) and, recorded as the fold's ``generator_training_cases``, on the fold's
training cases the label maps and the quality gate were built from (no generator saw anything: the list says
which cases shaped the fold's cases, so ``provenance.select_for_fold`` applies unchanged).
"""
import functools
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy import ndimage

from nnunet_synth.dataset import ImageWindows, RawDataset, choose_intensity_window
from nnunet_synth.dataset.native_slices import NativeVolumes, evenly_spread, open_native_slices
from nnunet_synth.dataset.splits import fold_training_cases
from nnunet_synth.fold_cases import (
    PREVIEW_ROWS,
    FoldMaps,
    MadeCase,
    check_role_names,
    prepare_fold_maps,
    resolve_unit,
    slice_counts,
    write_fold_cases,
    write_slice_preview,
)
from nnunet_synth.masks.paste import paste_region
from nnunet_synth.masks.placement import mask_box
from nnunet_synth.masks.regions import Region, dilate_region, rotate_region, shift_region
from nnunet_synth.masks.settings import BalancingSettings
from nnunet_synth.preview_grid import save_preview_grid
from nnunet_synth.quality.model_free import model_free_volume_score
from nnunet_synth.writer.synthetic_store import SyntheticStore

IMAGE_SOURCE = "copy-paste"
FEATHER_PIXELS = 2.0    # half-width of the blended seam
DONOR_CACHE_BYTES = 2 ** 29  # donors (region and patch) kept between new maps, at most this many bytes


@dataclass(frozen=True)
class DonorPatch:
    """Donor pixels moved like a region: ``image`` (C, *spatial) with its first pixel at ``origin`` in map
    coordinates (2D slices or 3D volumes)."""

    image: np.ndarray
    origin: tuple


def donor_patch(donor_image, bbox, margin: int) -> DonorPatch:
    """The donor's pixels around the region's box (``[starts..., stops...]``), ``margin`` pixels wider on every
    side; beyond the donor's border the edge pixels repeat (edge padding of the crop only, not of the donor)."""
    ndim = len(bbox) // 2
    starts, stops = np.asarray(bbox[:ndim]) - margin, np.asarray(bbox[ndim:]) + margin
    spatial = np.asarray(donor_image).shape[1:]
    indices = [np.clip(np.arange(start, stop), 0, size - 1) for start, stop, size in zip(starts, stops, spatial)]
    patch = np.asarray(donor_image)[(slice(None), *np.ix_(*indices))].astype(np.float64)
    return DonorPatch(patch, tuple(int(start) for start in starts))


def rotate_patch(patch: DonorPatch, angle_deg: float, centre) -> DonorPatch:
    """Rotate every channel in the plane of the last two axes about ``centre`` (map coordinates), as
    ``rotate_region`` turns the mask (linear interpolation; a 3D patch turns slice by slice)."""
    ndim = patch.image.ndim - 1
    rotated = np.stack([ndimage.rotate(channel, angle_deg, axes=(ndim - 2, ndim - 1), reshape=True, order=1,
                                       mode="nearest") for channel in patch.image])
    origin = np.round(np.asarray(centre) - (np.asarray(rotated.shape[1:]) - 1) / 2).astype(int)
    return DonorPatch(rotated, tuple(int(o) for o in origin))


def _box_slices(box) -> tuple:
    ndim = len(box) // 2
    return tuple(slice(start, stop) for start, stop in zip(box[:ndim], box[ndim:]))


def _place(patch: DonorPatch, box):
    """(canvas (C, *box shape), valid (box shape)): the patch drawn on the map's ``box`` (``[starts...,
    stops...]``); pixels it does not cover are not valid."""
    ndim = len(box) // 2
    shape = tuple(stop - start for start, stop in zip(box[:ndim], box[ndim:]))
    canvas, valid = np.zeros((len(patch.image), *shape)), np.zeros(shape, dtype=bool)
    on_box, on_patch = [], []
    for axis in range(ndim):
        first = max(patch.origin[axis], box[axis])
        last = min(patch.origin[axis] + patch.image.shape[1 + axis], box[ndim + axis])
        if first >= last:
            return canvas, valid
        on_box.append(slice(first - box[axis], last - box[axis]))
        on_patch.append(slice(first - patch.origin[axis], last - patch.origin[axis]))
    canvas[(slice(None), *on_box)] = patch.image[(slice(None), *on_patch)]
    valid[tuple(on_box)] = True
    return canvas, valid


def place_patch(patch: DonorPatch, shape):
    """(canvas (C, *shape), valid (shape)): the patch drawn on a whole map of ``shape``."""
    return _place(patch, (*([0] * len(shape)), *shape))


def feather_weights(pasted: np.ndarray, may_blend: np.ndarray, width: float = FEATHER_PIXELS) -> np.ndarray:
    """Weight of the donor pixel: 1 deeper than ``width`` inside the pasted pixels, falling linearly across the
    edge to 0 at ``width`` outside (outside only where ``may_blend``); 0 everywhere else. Any number of axes."""
    inside = ndimage.distance_transform_edt(pasted) - 0.5
    outside = ndimage.distance_transform_edt(~pasted) - 0.5
    signed = np.where(pasted, inside, -outside)
    weights = np.clip(0.5 + signed / (2 * width), 0.0, 1.0)
    return np.where(pasted | may_blend, weights, 0.0)


def blend_box(pasted: np.ndarray, feather: float):
    """The box (``[starts..., stops...]``) of the pixels a paste may change: the pasted pixels' box grown past the
    feather's reach (the signed distances inside it are those of the whole map), clipped to the map; None if
    nothing was pasted."""
    box = mask_box(pasted)
    if box is None:
        return None
    ndim, grow = pasted.ndim, int(np.ceil(feather)) + 2
    return ([max(start - grow, 0) for start in box[:ndim]] +
            [min(stop + grow, size) for stop, size in zip(box[ndim:], pasted.shape)])


@dataclass
class _ReplayedPaste:
    """One paste replayed on the label map: the donor patch moved like the region, and inside ``box`` the pasted
    pixels and where the seam may blend."""

    patch: DonorPatch
    box: list
    pasted: np.ndarray
    may_blend: np.ndarray


def _union_box(boxes) -> list:
    ndim = len(boxes[0]) // 2
    return [min(box[axis] for box in boxes) for axis in range(ndim)] + \
           [max(box[ndim + axis] for box in boxes) for axis in range(ndim)]


@dataclass
class ReplayedPastes:
    """A new map's pastes replayed on its target: the label map, and the image as the target's pixels with
    ``edited`` (C, *box) float64 inside ``edit_box`` (``[starts..., stops...]``; None when nothing was pasted).
    ``exact`` marks the pixels that are the donor's unblended."""

    label_map: np.ndarray
    edit_box: list
    edited: np.ndarray
    exact: np.ndarray

    def channel_images(self, target_image, dtypes) -> list:
        """The image channel by channel in the files' pixel types (``_to_dtype``): the target's pixels outside the
        box, the blended ones inside. Converting the box apart gives the pixels a whole float64 image would."""
        channels = []
        for channel, dtype in enumerate(dtypes):
            converted = _to_dtype(np.asarray(target_image[channel]), dtype)
            if self.edit_box is not None:
                converted[_box_slices(self.edit_box)] = _to_dtype(self.edited[channel], dtype)
            channels.append(converted)
        return channels


def replay_pastes(target_image, target_map, provenance: dict, read_slice, host_classes, where_allowed=None,
                  feather: float = FEATHER_PIXELS, donor_cache=None) -> ReplayedPastes:
    """Every paste of ``provenance`` replayed on the target's map and on the pixels of every channel of its
    image, a (C, H, W) slice or a (C, D, H, W) volume. ``read_slice(case_id, slice_index)`` = (image, label map)
    of a real slice or volume (``NativeSlices.slice``, ``NativeVolumes.slice``: slice index None for a volume);
    ``where_allowed(map, class)`` is where a paste could land (datasets without a host class:
    ``balance.Placement.mask``), default host tissue. ``donor_cache`` (a dict) keeps donors between calls.

    The pastes are replayed on the map first; the image is then blended in float64 only inside the box that
    holds every paste's seam, so a volume is never copied whole in float64 and the pixels outside are the
    target's own.
    """
    working = np.asarray(target_map).copy()
    donor_cache = {} if donor_cache is None else donor_cache
    replayed = []
    for paste in provenance["pastes"]:
        dilation = sum(op.get("iterations", 0) for op in paste["operations"])
        region, patch = _donor(paste["donor"], dilation + int(np.ceil(feather)) + 2, read_slice, donor_cache)
        for operation in paste["operations"]:
            if operation["op"] == "rotate":
                centre = np.asarray(region.origin) + (np.asarray(region.mask.shape) - 1) / 2
                region = rotate_region(region, operation["angle_deg"])
                patch = rotate_patch(patch, operation["angle_deg"], centre)
            elif operation["op"] == "shift":
                region = shift_region(region, operation["offset"])
                patch = DonorPatch(patch.image, tuple(o + d for o, d in zip(patch.origin, operation["offset"])))
            elif operation["op"] == "dilate":
                region = dilate_region(region, operation["iterations"])
        allowed = None if where_allowed is None else where_allowed(working, paste["class"])
        new_map, _ = paste_region(working, region, paste["class"], host_classes, allowed)
        box = blend_box(new_map != working, feather)
        if box is not None:
            before = working[_box_slices(box)]
            may_blend = np.isin(before, list(host_classes)) if host_classes else (before == 0)
            replayed.append(_ReplayedPaste(patch, box, new_map[_box_slices(box)] != before, may_blend))
        working = new_map
    exact = np.zeros(working.shape, dtype=bool)
    if not replayed:
        return ReplayedPastes(working, None, None, exact)
    edit_box = _union_box([paste.box for paste in replayed])
    ndim = len(edit_box) // 2
    edited = np.asarray(target_image)[(slice(None), *_box_slices(edit_box))].astype(np.float64)
    exact_in_box = exact[_box_slices(edit_box)]           # a view: written through
    for paste in replayed:
        inside = _box_slices([value - edit_box[axis % ndim] for axis, value in enumerate(paste.box)])
        canvas, valid = _place(paste.patch, paste.box)
        weights = feather_weights(paste.pasted, paste.may_blend, feather) * valid
        edited[(slice(None), *inside)] = weights * canvas + (1 - weights) * edited[(slice(None), *inside)]
        exact_in_box[inside] = (exact_in_box[inside] & ~(weights > 0)) | (weights == 1.0)
    return ReplayedPastes(working, edit_box, edited, exact)


def _donor(donor: dict, margin: int, read_slice, cache: dict):
    """(region as found in the donor map, donor patch ``margin`` pixels wider than its box) of a paste's donor;
    ``cache`` keeps the latest up to DONOR_CACHE_BYTES, so a donor volume is read once while its regions are
    pasted."""
    key = (donor["case_id"], donor["slice_index"], donor["class"], donor["component_index"], margin)
    if key not in cache:
        donor_image, donor_map = read_slice(donor["case_id"], donor["slice_index"])
        # the component as find_regions found it: ndimage.label of the class, cropped to its box
        components, _ = ndimage.label(np.asarray(donor_map) == donor["class"])
        box = _box_slices(donor["bbox"])
        region = Region(components[box] == donor["component_index"], tuple(int(s.start) for s in box))
        cache[key] = (region, donor_patch(donor_image, donor["bbox"], margin))
        while sum(kept[0].mask.nbytes + kept[1].image.nbytes for kept in cache.values()) > DONOR_CACHE_BYTES \
                and len(cache) > 1:
            cache.pop(next(iter(cache)))            # the oldest
    return cache[key]


def _to_dtype(image: np.ndarray, dtype) -> np.ndarray:
    """One channel in the file's pixel type (rounded and clipped for integer types)."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(image), info.min, info.max).astype(dtype)
    return image.astype(dtype)


@dataclass
class CopyPasteSettings:
    """What decides the copy-paste cases; recorded in the manifest as the fold's settings. ``unit``: "slice" (a
    case is one slice) or "volume" (a case is a whole real volume with lesions added); None = "volume" for 3D
    data, "slice" for 2D data (``resolve_unit``)."""

    num_cases: int
    seed: int = 0
    target_share: float = None
    balancing: BalancingSettings = field(default_factory=BalancingSettings)
    feather: float = FEATHER_PIXELS
    unit: str = None

    def recipe(self) -> dict:
        recipe = {k: v for k, v in asdict(self).items() if k != "num_cases"}
        recipe["balancing"] = self.balancing.to_recipe()
        recipe["image_source"] = IMAGE_SOURCE
        return recipe


def num_copy_paste_cases(dataset: RawDataset, fold, amount: float, unit=None) -> int:
    """The number of cases for an amount (``-r``): ``amount`` cases per real slice (unit "slice") or per real
    volume (unit "volume") of the fold's training cases (at least 1)."""
    slices = open_native_slices(dataset, fold_training_cases(dataset, fold))
    units = len(slices) if resolve_unit(dataset, slice_counts(slices), unit) == "slice" else len(slices.case_rows())
    return max(1, round(amount * units))


def generate_copy_paste_cases(dataset: RawDataset, settings: CopyPasteSettings, fold="0", overwrite=False) -> dict:
    """Make and write ``settings.num_cases`` copy-paste cases for nnU-Net fold ``fold`` from its training cases
    only; returns the same summary as ``generation.generate_synthetic_cases``. With unit "volume" each case is its
    target's whole volume, its geometry and every channel, with the donors' voxels pasted in."""
    fold = str(fold)
    training_cases = fold_training_cases(dataset, fold)
    settings = replace(settings, unit=resolve_unit(
        dataset, slice_counts(open_native_slices(dataset, training_cases)), settings.unit))
    store = SyntheticStore(dataset)
    if overwrite:
        check_role_names(dataset, settings.balancing)      # bad names fail before anything is removed
        with store.exclusive_writer():
            store.remove_fold(fold)
    # as the generators' runs: the store shared (other folds may write at the same time), this fold claimed
    with store.shared_writer(), store.fold_writer(fold, settings.recipe(), batch_size=1):
        # no generator: generator_training_cases lists the cases the maps and the gate came from
        fold_maps = prepare_fold_maps(dataset, store, fold, settings.recipe(), training_cases, settings,
                                      settings.unit)
        write_preview = functools.partial(write_copy_paste_preview, dataset, store, fold, fold_maps.real,
                                          settings.unit)
        return write_fold_cases(store, fold, fold_maps, CopyPasteBlocks(settings, fold_maps), settings.seed,
                                write_preview, f"pasting real pixels ({settings.unit}s)", unit=settings.unit)


class CopyPasteBlocks:
    """The cases of a block of new maps: each map's pastes replayed on its target's real pixels (a slice, or a
    whole volume with unit "volume"); a volume is scored inside the pasted voxels (``model_free_volume_score``)."""

    def __init__(self, settings: CopyPasteSettings, fold_maps: FoldMaps):
        self.settings, self.real, self.new_maps = settings, fold_maps.real, fold_maps.new_maps
        self.host, self.gates, self.image_dtypes = fold_maps.host, fold_maps.gates, fold_maps.image_dtypes
        self.placement = fold_maps.placement()
        self.donor_cache = {}

    def __call__(self, batch, seeds) -> list:
        return [self.paste(index) for index in batch]

    def paste(self, index: int) -> MadeCase:
        provenance = self.new_maps[index].provenance
        target = (provenance["target"]["case_id"], provenance["target"]["slice_index"])
        allowed = None if self.placement is None else functools.partial(self.placement.mask,
                                                                         target_index=self.real.row(*target))
        target_image, target_map = self.real.slice(*target)
        replayed = replay_pastes(target_image, target_map, provenance, self.real.slice, self.host, allowed,
                                 self.settings.feather, self.donor_cache)
        label_map = replayed.label_map
        if not np.array_equal(label_map, self.new_maps[index].label_map):
            raise RuntimeError(f"replaying the pastes of new map {index} did not give the map (a bug)")
        channel_images = replayed.channel_images(target_image, self.image_dtypes[target[0]])
        copy_paste = {"feather_pixels": self.settings.feather}
        quality = None      # a slice: the score of the whole image
        if self.settings.unit == "volume":
            # outside this box the volume is its target's voxels, bit for bit
            copy_paste.update(unit="volume", edit_box=[int(v) for v in replayed.edit_box])
            quality = model_free_volume_score(np.stack(channel_images).astype(np.float32), label_map,
                                              label_map != target_map, self.gates)
        return MadeCase(channel_images, label_map, {"seed": self.settings.seed, "image_source": IMAGE_SOURCE,
                                                    "generator": None, "copy_paste": copy_paste}, quality,
                        label_map != target_map)


def write_copy_paste_preview(dataset: RawDataset, store: SyntheticStore, fold, real, unit: str):
    """The preview grid of slices (``fold_cases.write_slice_preview``) or of whole volumes, in the grey scale of
    ``display_windows``."""
    slices = real if unit == "slice" else real.slices
    window = display_windows(dataset, slices.images)
    if unit == "slice":
        return write_slice_preview(dataset, store, fold, real, window)
    return write_volume_preview(dataset, store, fold, real, window)


def write_volume_preview(dataset: RawDataset, store: SyntheticStore, fold, real: NativeVolumes,
                         window: ImageWindows, num_rows: int = PREVIEW_ROWS):
    """The preview grid of ``fold_cases.write_slice_preview`` for whole volumes: per case, the slice with
    the most pasted voxels."""
    reader = dataset.reader_writer()
    rows = []
    for case_id in store.complete_case_ids(fold)[:num_rows]:
        target_image, target_map = real.slice(store.cases[case_id]["source"]["target"]["case_id"])
        synthetic_image = reader.read_images([str(p) for p in store.image_files(case_id)])[0]
        synthetic_label = reader.read_seg(str(store.label_file(case_id)))[0][0].astype(int)
        z = int(np.argmax((synthetic_label != target_map).reshape(len(target_map), -1).sum(axis=1)))
        rows.append([(window.to_model(target_image[:, z]), target_map[z]), (None, synthetic_label[z]),
                     (window.to_model(synthetic_image[:, z]), None),
                     (window.to_model(synthetic_image[:, z]), synthetic_label[z])])
    path = store.preview_file(fold)
    if rows:
        save_preview_grid(rows, ["real target + labels", "new label map", "synthetic", "synthetic + labels"],
                          path, dataset.num_classes, window=(-1.0, 1.0))
    return path


def display_windows(dataset: RawDataset, images, max_slices: int = 2000) -> ImageWindows:
    """The preview grid's grey scale per channel, chosen as a generator's window would be (a sample of at most
    ``max_slices`` real slices, evenly spread)."""
    chosen = [images[i] for i in evenly_spread(len(images), max_slices)]
    return ImageWindows(tuple(
        choose_intensity_window(np.concatenate([np.asarray(image[channel], dtype=np.float32).ravel()[::97]
                                                for image in chosen]), name)
        for channel, name in enumerate(dataset.channel_list)))
