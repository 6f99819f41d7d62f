"""Pasting a region into a label map, only onto host tissue (Diff-Lung §2.3: never over disease, never outside the
lung). Maps and regions may be 2D or 3D."""
import numpy as np

from nnunet_synth.masks.regions import Region


def region_window(region: Region, shape):
    """(slices of the map, slices of the region's mask) where the region overlaps a map of ``shape``; None when
    it lies entirely outside."""
    starts = [max(o, 0) for o in region.origin]
    stops = [min(o + size, limit) for o, size, limit in zip(region.origin, region.mask.shape, shape)]
    if not all(start < stop for start, stop in zip(starts, stops)):
        return None
    return (tuple(slice(start, stop) for start, stop in zip(starts, stops)),
            tuple(slice(start - o, stop - o) for start, stop, o in zip(starts, stops, region.origin)))


def region_footprint(region: Region, shape) -> np.ndarray:
    """The region as a boolean map of ``shape``; the parts outside the map are dropped."""
    footprint = np.zeros(shape, dtype=bool)
    window = region_window(region, shape)
    if window is not None:
        footprint[window[0]] = region.mask[window[1]]
    return footprint


def host_mask(label_map: np.ndarray, host_classes) -> np.ndarray:
    """Pixels that may receive pathology: those of a host class (normal lung for the COVID data)."""
    return np.isin(label_map, list(host_classes))


def paste_region(label_map: np.ndarray, region: Region, pathology_class: int, host_classes, allowed=None):
    """Return (new map, pasted pixel count): ``pathology_class`` written where the region meets host tissue only
    (or, when ``allowed`` is given, where it meets ``allowed``: a dataset without a host class).

    Pixels of every other class (background, existing pathology) keep their value; ``label_map`` is not modified.
    """
    allowed = host_mask(label_map, host_classes) if allowed is None else allowed
    pasted = region_footprint(region, label_map.shape) & allowed
    new_map = label_map.copy()
    new_map[pasted] = pathology_class
    return new_map, int(pasted.sum())
