"""Connected pathology regions of the real label maps, and the random transforms applied to them (000 §2.3).

A region is a boolean crop plus the map coordinates of the crop's top-left pixel (``origin``); transforms return a
new region and never touch a label map. Morphology is scipy.ndimage's: ``label`` (default 4-connectivity in 2D),
``rotate`` (order 0, so the mask stays binary) and ``binary_dilation``.
"""
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Region:
    """A binary shape placed on a label-map grid: ``mask`` (h, w) bool, top-left pixel at ``origin`` (row, col).

    The origin may lie outside the map (a region moved or grown past the border); pasting clips it.
    """

    mask: np.ndarray
    origin: tuple

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def centroid(self) -> np.ndarray:
        """Centre of mass (row, col) in map coordinates."""
        return np.asarray(ndimage.center_of_mass(self.mask)) + np.asarray(self.origin)


@dataclass(frozen=True)
class DonorRegion:
    """One connected region of one pathology class in one real label map (a donor for copy-paste)."""

    map_index: int           # position in the caller's list of real maps
    pathology_class: int
    component_index: int     # label value ndimage.label gave the region in that map (1-based)
    region: Region           # the region cropped to its bounding box, at its place in the donor map

    @property
    def bbox(self) -> list:
        """[row_start, col_start, row_stop, col_stop] in the donor map (stop exclusive)."""
        row, col = self.region.origin
        return [int(row), int(col), int(row + self.region.mask.shape[0]), int(col + self.region.mask.shape[1])]


def find_regions(label_map: np.ndarray, pathology_class: int, map_index: int = 0, min_area: int = 1) -> list:
    """The connected regions of ``pathology_class`` in one map with at least ``min_area`` pixels, as ``DonorRegion``."""
    components, _ = ndimage.label(label_map == pathology_class)
    regions = []
    for component_index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        mask = components[box] == component_index
        if mask.sum() < min_area:
            continue
        region = Region(mask, (box[0].start, box[1].start))
        regions.append(DonorRegion(map_index, int(pathology_class), component_index, region))
    return regions


def rotate_region(region: Region, angle_deg: float) -> Region:
    """Rotate about the crop centre (nearest neighbour, crop enlarged to hold the result)."""
    rotated = ndimage.rotate(region.mask.astype(np.uint8), angle_deg, reshape=True, order=0) > 0
    centre = np.asarray(region.origin) + (np.asarray(region.mask.shape) - 1) / 2
    origin = np.round(centre - (np.asarray(rotated.shape) - 1) / 2).astype(int)
    return Region(rotated, (int(origin[0]), int(origin[1])))


def shift_region(region: Region, offset) -> Region:
    """Move by ``offset`` (rows, cols)."""
    return Region(region.mask, (int(region.origin[0] + offset[0]), int(region.origin[1] + offset[1])))


def dilate_region(region: Region, iterations: int) -> Region:
    """Grow by ``iterations`` steps of binary dilation (4-connected structuring element); the crop grows with it."""
    padded = np.pad(region.mask, iterations)
    grown = ndimage.binary_dilation(padded, iterations=iterations)
    return Region(grown, (region.origin[0] - iterations, region.origin[1] - iterations))
