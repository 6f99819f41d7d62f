"""Connected pathology regions of the real label maps, and the random transforms applied to them (Diff-Lung §2.3).

A region is a boolean crop plus the map coordinates of the crop's first pixel (``origin``); transforms return a
new region and never touch a label map. Maps are 2D slices (rows, cols) or 3D volumes (slices, rows, cols): a 3D
region is a 3D connected component, rotated in-plane (about the slice axis), shifted and dilated in 3D.
Morphology is scipy.ndimage's: ``label`` (face connectivity: 4 in 2D, 6 in 3D), ``rotate`` (order 0, so the mask
stays binary) and ``binary_dilation``.
"""
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Region:
    """A binary shape placed on a label-map grid: ``mask`` bool ((h, w) or (d, h, w)), first pixel at ``origin``.

    The origin may lie outside the map (a region moved or grown past the border); pasting clips it.
    """

    mask: np.ndarray
    origin: tuple

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def centroid(self) -> np.ndarray:
        """Centre of mass in map coordinates (one value per axis)."""
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
        """[starts..., stops...] in the donor map (stop exclusive): [row0, col0, row1, col1] in 2D."""
        starts = [int(o) for o in self.region.origin]
        return starts + [start + int(size) for start, size in zip(starts, self.region.mask.shape)]


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
        region = Region(mask, tuple(int(axis.start) for axis in box))
        regions.append(DonorRegion(map_index, int(pathology_class), component_index, region))
    return regions


def rotate_region(region: Region, angle_deg: float) -> Region:
    """Rotate in the plane of the last two axes about the crop centre (nearest neighbour, crop enlarged to hold
    the result)."""
    ndim = region.mask.ndim
    rotated = ndimage.rotate(region.mask.astype(np.uint8), angle_deg, axes=(ndim - 2, ndim - 1), reshape=True,
                             order=0) > 0
    centre = np.asarray(region.origin) + (np.asarray(region.mask.shape) - 1) / 2
    origin = np.round(centre - (np.asarray(rotated.shape) - 1) / 2).astype(int)
    return Region(rotated, tuple(int(o) for o in origin))


def shift_region(region: Region, offset) -> Region:
    """Move by ``offset`` (one value per axis)."""
    return Region(region.mask, tuple(int(o + d) for o, d in zip(region.origin, offset)))


def dilate_region(region: Region, iterations: int) -> Region:
    """Grow by ``iterations`` steps of binary dilation (face-connected structuring element); the crop grows."""
    padded = np.pad(region.mask, iterations)
    grown = ndimage.binary_dilation(padded, iterations=iterations)
    return Region(grown, tuple(int(o) - iterations for o in region.origin))
