"""A region's real pixels moved and pasted as its label-map region was (``masks/balance.py``): the donor's pixels
around the region, rotated about the region's box centre, shifted, and blended over a few pixels at the edge (a
signed-distance feather, scipy.ndimage) so the seam is not a hard step. Slices (C, H, W) or volumes (C, D, H, W);
a volume's patch turns slice by slice in the axial plane. Used by the copy-paste image source
(``image_sources/copy_paste.py``, every paste of a new map replayed on its target) and by the online paste of the
trainers (``trainers/pasting.py``)."""
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nnunet_synth.masks.paste import paste_region
from nnunet_synth.masks.placement import mask_box
from nnunet_synth.masks.regions import Region, dilate_region, rotate_region, shift_region

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


