"""In-place sampling: a balanced label map's changes drawn into its target's real slice, at native resolution.

The edit region of a new map is where it differs from its target's real map, grown by the generator's
``edit_margin``. Each connected part of it is filled in native-resolution crops of the generator's crop size
(parts that fit inside a crop's inner area together share one crop; a larger part gets a grid of crops, filled
one after another so that later crops see the earlier ones' pixels as known), conditioned on the new map and on the
real pixels around. Everything outside the edit region stays the target's real pixel, bit for bit; the label is
the new map itself (no resampling).
"""
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from nnunet_synth.dataset import ImageWindows
from nnunet_synth.generator.ablation import mark_unannotated
from nnunet_synth.generator.data import MODEL_MINIMUM
from nnunet_synth.generator.inpaint_data import crop_origin, edit_region, take_crop

CONTEXT_FRACTION = 8     # a crop's inner area leaves crop_size / 8 pixels of real context on every side


def map_edit_region(target_map: np.ndarray, new_map: np.ndarray, margin: int) -> np.ndarray:
    """The pixels to redraw for ``new_map`` made from ``target_map``: the changed pixels plus ``margin``."""
    return edit_region(np.asarray(new_map) != np.asarray(target_map), margin)


@dataclass
class Tile:
    """One crop to sample: its top-left pixel in the slice and the edit pixels it writes (slice coordinates)."""

    origin: tuple
    writes: np.ndarray      # (H, W) bool


def plan_tiles(edit: np.ndarray, crop_size: int) -> list:
    """The crops that fill ``edit`` (H, W) bool. Connected parts that fit inside a crop's inner area together share
    one crop centred on them (greedily, in scan order); a larger part gets a grid of crops spaced by the inner
    area's side, each writing the part's pixels nearest its centre."""
    inner = max(1, crop_size - 2 * (crop_size // CONTEXT_FRACTION))
    components, _ = ndimage.label(edit)
    groups, tiles = [], []       # groups: [box (r0, c0, r1, c1), component indices]
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        r0, c0, r1, c1 = box[0].start, box[1].start, box[0].stop, box[1].stop
        if r1 - r0 > inner or c1 - c0 > inner:
            tiles += _grid_tiles(components == index, box, inner, crop_size)
            continue
        for group in groups:
            joined = (min(group[0][0], r0), min(group[0][1], c0), max(group[0][2], r1), max(group[0][3], c1))
            if joined[2] - joined[0] <= inner and joined[3] - joined[1] <= inner:
                group[0] = joined
                group[1].append(index)
                break
        else:
            groups.append([(r0, c0, r1, c1), [index]])
    for (r0, c0, r1, c1), indices in groups:
        centre = ((r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2)
        tiles.append(Tile(crop_origin(np.round(centre), edit.shape, crop_size), np.isin(components, indices)))
    return tiles


def _grid_tiles(part: np.ndarray, box, inner: int, crop_size: int) -> list:
    """Crops on a grid over one part larger than the inner area; each pixel is written by the nearest centre."""
    centres_per_axis = []
    for axis_slice in box:
        length = axis_slice.stop - axis_slice.start
        pieces = int(np.ceil(length / inner))
        centres_per_axis.append(axis_slice.start + (np.arange(pieces) + 0.5) * length / pieces - 0.5)
    centres = np.array([(r, c) for r in centres_per_axis[0] for c in centres_per_axis[1]])
    rows, cols = np.nonzero(part)
    nearest = np.argmin(np.maximum(np.abs(rows[:, None] - centres[None, :, 0]),
                                   np.abs(cols[:, None] - centres[None, :, 1])), axis=1)
    tiles = []
    for number, centre in enumerate(centres):
        writes = np.zeros(part.shape, dtype=bool)
        writes[rows[nearest == number], cols[nearest == number]] = True
        if writes.any():
            tiles.append(Tile(crop_origin(np.round(centre), part.shape, crop_size), writes))
    return tiles


def tile_seed(seed: int, tile_number: int) -> int:
    """The noise seed of crop ``tile_number`` of a case whose seed is ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(tile_number)]).generate_state(1)[0])


@dataclass
class InpaintedSlice:
    """A slice with its edit region drawn: ``model_image`` (C, H, W) model space, ``channel_images`` one array per
    channel in the dataset's units and pixel type (the real pixels outside ``edit``), and its crops."""

    model_image: np.ndarray
    channel_images: list
    edit: np.ndarray
    tiles: list = field(default_factory=list)

    def record(self) -> dict:
        """What the manifest keeps of the edit: its size and the crops."""
        rows, cols = np.nonzero(self.edit)
        box = [int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1] if rows.size else None
        return {"edit_pixels": int(self.edit.sum()), "edit_components": int(ndimage.label(self.edit)[1]),
                "edit_bbox": box, "crops": [[int(t.origin[0]), int(t.origin[1])] for t in self.tiles]}


def inpaint_slices(pipeline, window: ImageWindows, images, label_maps, edit_masks, seeds, dtypes,
                   num_inference_steps: int, ignore_label=None, batch_size: int = 16) -> list:
    """Draw the edit region of each slice with ``pipeline`` (an ``NnsynthInpaintPipeline``), conditioned on its label
    map (native size) and the real pixels around.

    ``images`` (C, H, W) real slices in the dataset's units, ``label_maps`` (H, W) the maps to draw, ``edit_masks``
    (H, W) bool, ``seeds`` one per slice, ``dtypes`` the pixel type of each channel per slice. The crops of all
    slices are sampled in rounds (round k = every slice's k-th crop), ``batch_size`` at a time.
    """
    crop_size = pipeline.image_size
    working = [window.to_model(np.asarray(image)) for image in images]
    conditions = [mark_unannotated(np.asarray(label_map), ignore_label).astype(np.int64) for label_map in label_maps]
    plans = [plan_tiles(np.asarray(edit, dtype=bool), crop_size) for edit in edit_masks]
    pending = [np.asarray(edit, dtype=bool).copy() for edit in edit_masks]   # edit pixels not drawn yet
    for round_number in range(max((len(plan) for plan in plans), default=0)):
        jobs = [(i, plan[round_number]) for i, plan in enumerate(plans) if round_number < len(plan)]
        known = np.stack([take_crop(working[i], tile.origin, crop_size, MODEL_MINIMUM) for i, tile in jobs])
        masks = np.stack([take_crop(pending[i], tile.origin, crop_size, False) for i, tile in jobs])
        maps = np.stack([take_crop(conditions[i], tile.origin, crop_size, 0) for i, tile in jobs])
        drawn = pipeline(known, masks, maps, [tile_seed(seeds[i], round_number) for i, _ in jobs],
                         num_inference_steps=num_inference_steps, batch_size=batch_size, progress=False)
        for (i, tile), crop in zip(jobs, drawn):
            _write_back(working[i], crop, tile)
            pending[i] &= ~tile.writes
    results = []
    for image, model_image, edit, slice_dtypes, plan in zip(images, working, edit_masks, dtypes, plans):
        edit = np.asarray(edit, dtype=bool)
        drawn_channels = window.from_model(model_image, slice_dtypes)
        channel_images = []
        for real, drawn_channel, dtype in zip(np.asarray(image), drawn_channels, slice_dtypes):
            channel = real.astype(dtype)          # the real pixels, in the file's pixel type
            channel[edit] = drawn_channel[edit]
            channel_images.append(channel)
        results.append(InpaintedSlice(model_image, channel_images, edit, plan))
    return results


def _write_back(model_image: np.ndarray, crop: np.ndarray, tile: Tile):
    """Copy the crop's pixels that ``tile`` writes into the slice (model space, in place)."""
    rows, cols = np.nonzero(tile.writes)
    model_image[:, rows, cols] = crop[:, rows - tile.origin[0], cols - tile.origin[1]]
