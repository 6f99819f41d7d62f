"""Training crops of the inpainting generator: native-resolution crops of the real slices, each with an edit
region drawn the way generation will edit it.

A crop is centred (with jitter) on a pathology component with probability ``p_lesion_crop``, else on a random
host pixel of the slice (where generation pastes lesions). Its edit region is, like the balancer's edits
(masks/balance.py) plus the margin generation adds around every change:

- with ``p_lesion_edit``: a pathology component of the crop (the lesion is drawn from its label);
- with ``p_moved_edit``: a pathology component rotated, dilated and moved onto host tissue (what the balancer
  pastes), drawing whatever the real map holds there, so the mask's shape alone does not say "lesion";
- otherwise a random elliptic blob over host tissue (the body when the dataset has no host class).

Randomness of a training step is a pure function of (seed, step, process), so a resumed run draws the same crops.
"""
import functools
import sys
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from nnunet_synth.dataset import ImageWindows
from nnunet_synth.generator.ablation import mark_unannotated
from nnunet_synth.generator.data import MODEL_MINIMUM
from nnunet_synth.masks import (
    body_mask,
    dilate_region,
    find_regions,
    region_footprint,
    rotate_region,
    shift_region,
)

MIN_COMPONENT_AREA = 4       # smaller pathology components are not used as crop centres or edit shapes


def edit_region(changed: np.ndarray, margin: int) -> np.ndarray:
    """The pixels an edit redraws: ``changed`` grown by ``margin`` pixels (4-connected, as ``dilate_region``)."""
    changed = np.asarray(changed, dtype=bool)
    return ndimage.binary_dilation(changed, iterations=margin) if margin > 0 and changed.any() else changed.copy()


def crop_origin(centre, shape, size: int) -> tuple:
    """Top-left pixel of the ``size`` crop around ``centre`` kept inside the slice (centred on the slice along a
    side shorter than ``size``)."""
    origin = []
    for position, length in zip(centre, shape):
        if length <= size:
            origin.append((length - size) // 2)
        else:
            origin.append(int(np.clip(int(position) - size // 2, 0, length - size)))
    return tuple(origin)


def take_crop(array: np.ndarray, origin, size: int, fill) -> np.ndarray:
    """The (..., size, size) window of ``array`` (..., H, W) at ``origin``; pixels outside the array are ``fill``."""
    row, col = origin
    height, width = array.shape[-2:]
    out = np.full((*array.shape[:-2], size, size), fill, dtype=array.dtype)
    r0, c0, r1, c1 = max(row, 0), max(col, 0), min(row + size, height), min(col + size, width)
    if r0 < r1 and c0 < c1:
        out[..., r0 - row:r1 - row, c0 - col:c1 - col] = array[..., r0:r1, c0:c1]
    return out


def pathology_components(label_maps, pathology_classes, min_area: int = MIN_COMPONENT_AREA) -> np.ndarray:
    """(K, 5) int array: slice row, class, component index (``find_regions``), centre row, centre col of every
    pathology component of at least ``min_area`` pixels; one pass over the maps."""
    found = []
    for row, label_map in enumerate(label_maps):
        label_map = np.asarray(label_map)
        for pathology_class in pathology_classes:
            if not np.any(label_map == pathology_class):
                continue
            for donor in find_regions(label_map, pathology_class, row, min_area):
                centre = np.round(donor.region.centroid).astype(int)
                found.append((row, pathology_class, donor.component_index, centre[0], centre[1]))
    return np.asarray(found, dtype=np.int64).reshape(-1, 5)


def _random_pixel(mask: np.ndarray, rng: np.random.Generator):
    positions = np.flatnonzero(mask)
    return None if positions.size == 0 else np.unravel_index(positions[rng.integers(positions.size)], mask.shape)


def _blob(shape, centre, rng: np.random.Generator, max_radius: float) -> np.ndarray:
    """A filled ellipse at ``centre`` with random radii (2 .. ``max_radius``) and angle."""
    radii = rng.uniform(2.0, max(2.5, max_radius), size=2)
    angle = rng.uniform(0, np.pi)
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    dr, dc = rows - centre[0], cols - centre[1]
    u = dr * np.cos(angle) + dc * np.sin(angle)
    v = -dr * np.sin(angle) + dc * np.cos(angle)
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 <= 1.0


@dataclass
class CropSampler:
    """Draws training crops (image, conditioning map, edit mask) from the real slices ``images``/``label_maps``
    (``NativeSlices`` rows: dataset units, native size)."""

    images: object
    label_maps: object
    components: np.ndarray          # pathology_components(label_maps, pathology classes)
    window: ImageWindows
    crop_size: int
    host_classes: list
    ignore_label: int
    margin: int
    p_lesion_crop: float
    p_lesion_edit: float
    p_moved_edit: float

    def host_pixels(self, image, label_map) -> np.ndarray:
        """Where edits may land: host tissue, or the body of the slice without a host class."""
        if self.host_classes:
            return np.isin(label_map, self.host_classes)
        return body_mask(image[0])

    def draw(self, slice_row: int, rng: np.random.Generator):
        """(image (C, S, S) float32 model space, conditioning map (S, S) int64, edit mask (S, S) float32)."""
        component = None
        if len(self.components) and rng.random() < self.p_lesion_crop:
            component = self.components[rng.integers(len(self.components))]
            slice_row = int(component[0])
        image, label_map = self.images[slice_row], np.asarray(self.label_maps[slice_row])
        if component is not None:
            jitter = rng.integers(-(self.crop_size // 4), self.crop_size // 4 + 1, size=2)
            centre = np.asarray(component[3:5]) + jitter
        else:       # where generation edits: host tissue (or the body)
            centre = _random_pixel(self.host_pixels(image, label_map), rng)
            if centre is None:
                centre = (rng.integers(label_map.shape[0]), rng.integers(label_map.shape[1]))
        origin = crop_origin(centre, label_map.shape, self.crop_size)
        in_crop = take_crop(np.ones(label_map.shape, dtype=bool), origin, self.crop_size, False)
        edit = self._edit_mask(image, label_map, origin, component, rng)
        edit_crop = take_crop(edit, origin, self.crop_size, False) & in_crop
        if not edit_crop.any():      # e.g. no host tissue in the crop: a blob in the middle of the crop
            middle = (self.crop_size // 2, self.crop_size // 2)
            edit_crop = edit_region(_blob(edit_crop.shape, middle, rng, self.crop_size / 6), self.margin) & in_crop
        image_crop = take_crop(self.window.to_model(image), origin, self.crop_size, MODEL_MINIMUM)
        map_crop = take_crop(mark_unannotated(label_map, self.ignore_label).astype(np.int64), origin,
                             self.crop_size, 0)
        return image_crop.astype(np.float32), map_crop, edit_crop.astype(np.float32)

    def _edit_mask(self, image, label_map, origin, component, rng) -> np.ndarray:
        """The edit region on the whole slice (before cropping)."""
        crop_box = np.zeros(label_map.shape, dtype=bool)
        crop_box[max(origin[0], 0):origin[0] + self.crop_size, max(origin[1], 0):origin[1] + self.crop_size] = True
        in_crop = [c for c in self.components_of(label_map)
                   if crop_box[c.region.origin[0] + c.region.mask.shape[0] // 2,
                               c.region.origin[1] + c.region.mask.shape[1] // 2]]
        kind = rng.random()
        if in_crop and kind < self.p_lesion_edit + self.p_moved_edit:
            chosen = in_crop[rng.integers(len(in_crop))]
            if component is not None:    # the component the crop is centred on
                chosen = next((c for c in in_crop if c.pathology_class == component[1]
                               and c.component_index == component[2]), chosen)
            if kind < self.p_lesion_edit:
                return edit_region(region_footprint(chosen.region, label_map.shape), self.margin)
            return edit_region(self._moved(chosen.region, image, label_map, crop_box, rng), self.margin)
        host = self.host_pixels(image, label_map)
        centre = _random_pixel(host & crop_box, rng)
        if centre is None:
            return np.zeros(label_map.shape, dtype=bool)
        return edit_region(_blob(label_map.shape, centre, rng, self.crop_size / 6) & host, self.margin)

    def components_of(self, label_map) -> list:
        return [region for pathology_class in np.unique(self.components[:, 1]) if len(self.components)
                for region in find_regions(label_map, int(pathology_class), 0, MIN_COMPONENT_AREA)]

    def _moved(self, region, image, label_map, crop_box, rng) -> np.ndarray:
        """A component rotated (p 0.5), dilated (p 0.3) and moved onto host tissue inside the crop; the pixels it
        covers there (host tissue only, as the balancer pastes)."""
        host = self.host_pixels(image, label_map)
        if rng.random() < 0.5:
            region = rotate_region(region, float(rng.uniform(-180, 180)))
        if rng.random() < 0.3:
            region = dilate_region(region, int(rng.integers(1, 4)))
        anchor = _random_pixel(host & crop_box, rng)
        if anchor is not None and region.area:
            region = shift_region(region, np.round(np.asarray(anchor) - region.centroid).astype(int))
        return region_footprint(region, label_map.shape) & host


def crop_rng(seed: int, step: int, process_index: int, sample: int) -> np.random.Generator:
    """The generator of one crop of one training step (a pure function of its arguments)."""
    return np.random.default_rng([seed, step, process_index, sample, 1])


class InpaintStepBatches(Dataset):
    """Item k = (images (B, C, S, S) float32, conditioning maps (B, S, S) int64, edit masks (B, S, S) float32) of
    training step ``first_step + k`` (the slices of ``data_order``, crops from ``sampler``)."""

    def __init__(self, images, label_maps, data_order, first_step: int, sampler: CropSampler = None):
        # images and label maps are read through ``sampler``; the arguments keep StepBatches' signature
        self.data_order, self.first_step, self.sampler = data_order, first_step, sampler

    def __len__(self) -> int:
        return sys.maxsize - self.first_step

    def __getitem__(self, k: int):
        step = self.first_step + k
        rows = self.data_order.batch_indices(step)
        crops = [self.sampler.draw(int(row), crop_rng(self.data_order.seed, step, self.data_order.process_index, i))
                 for i, row in enumerate(rows)]
        images, label_maps, edit_masks = (np.stack(parts) for parts in zip(*crops))
        return torch.from_numpy(images), torch.from_numpy(label_maps), torch.from_numpy(edit_masks)


def inpaint_step_batches(sampler: CropSampler):
    """The ``StepLoader`` batch class of an inpainting run."""
    return functools.partial(InpaintStepBatches, sampler=sampler)


def preview_crops(sampler: CropSampler, count: int, seed: int, num_slices: int):
    """``count`` fixed crops (images, maps, edit masks) for the training previews."""
    rng = np.random.default_rng([seed, 2])
    crops = [sampler.draw(int(rng.integers(num_slices)), np.random.default_rng([seed, 3, i])) for i in range(count)]
    return tuple(np.stack(parts) for parts in zip(*crops))
