"""Pasting a region into a label map, only onto host tissue (000 §2.3: never over disease, never outside the lung)."""
import numpy as np

from nnunet_synth.masks.regions import Region


def region_footprint(region: Region, shape) -> np.ndarray:
    """The region as a boolean map of ``shape``; the parts outside the map are dropped."""
    footprint = np.zeros(shape, dtype=bool)
    row, col = region.origin
    height, width = region.mask.shape
    row_start, col_start = max(row, 0), max(col, 0)
    row_stop, col_stop = min(row + height, shape[0]), min(col + width, shape[1])
    if row_start < row_stop and col_start < col_stop:
        footprint[row_start:row_stop, col_start:col_stop] = \
            region.mask[row_start - row:row_stop - row, col_start - col:col_stop - col]
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
