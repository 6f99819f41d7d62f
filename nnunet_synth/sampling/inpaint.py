"""In-place sampling: a balanced label map's changes drawn into its target's real slice, at native resolution.

The edit region of a new map is where it differs from its target's real map, grown by the generator's
``edit_margin``. Each connected part of it is filled in native-resolution crops of the generator's crop size
(parts that fit inside a crop's inner area together share one crop; a larger part gets a grid of crops, filled
one after another so that later crops see the earlier ones' pixels as known), conditioned on the new map and on the
real pixels around. Everything outside the edit region stays the target's real pixel, bit for bit; the label is
the new map itself (no resampling).

A volume (``inpaint_volume``) is drawn slice by slice along its first axis, each slice's edit region its own
changes grown in-plane, every slice's crops from their own seeds ("per-slice"). "aligned" takes every crop's
initial noise from one noise field of the volume in slice coordinates instead, so a voxel starts from the same
noise in every slice: on the MS volumes that made the edited regions smoother along the slice axis than real
lesions, with stripes in a coronal view (docs/volumes.md), so it is not the default.
"""
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from nnunet_synth.dataset import ImageWindows
from nnunet_synth.generator.ablation import mark_unannotated
from nnunet_synth.generator.data import MODEL_MINIMUM
from nnunet_synth.generator.inpaint_data import crop_origin, edit_region, take_crop

CONTEXT_FRACTION = 8     # a crop's inner area leaves crop_size / 8 pixels of real context on every side
VOLUME_NOISES = ("aligned", "per-slice")
SLICES_PER_ROUND = 16    # a volume's edited slices sampled together (their crops share batches)


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


def noise_field(seed: int, shape, crop_size: int, num_channels: int) -> np.ndarray:
    """(channels, H + 2 S, W + 2 S) Gaussian noise for slices of ``shape`` (H, W) and crops of side S: the crop
    with top-left pixel (r, c) takes ``field[:, r + S:r + 2 S, c + S:c + 2 S]`` (crops may start outside a slice
    that is smaller than one crop)."""
    size = (num_channels, shape[0] + 2 * crop_size, shape[1] + 2 * crop_size)
    return torch.randn(size, generator=torch.Generator("cpu").manual_seed(int(seed))).numpy()


def _field_crop(field: np.ndarray, origin, crop_size: int) -> np.ndarray:
    row, col = origin[0] + crop_size, origin[1] + crop_size
    return field[:, row:row + crop_size, col:col + crop_size]


def inpaint_slices(pipeline, window: ImageWindows, images, label_maps, edit_masks, seeds, dtypes,
                   num_inference_steps: int, ignore_label=None, batch_size: int = 16, noise_fields=None) -> list:
    """Draw the edit region of each slice with ``pipeline`` (an ``NnsynthInpaintPipeline``), conditioned on its label
    map (native size) and the real pixels around.

    ``images`` (C, H, W) real slices in the dataset's units, ``label_maps`` (H, W) the maps to draw, ``edit_masks``
    (H, W) bool, ``seeds`` one per slice, ``dtypes`` the pixel type of each channel per slice. The crops of all
    slices are sampled in rounds (round k = every slice's k-th crop), ``batch_size`` at a time. ``noise_fields``:
    one ``noise_field`` per slice whose crops take their initial noise from it (default: each crop's own seed).
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
        noise = None if noise_fields is None else np.stack(
            [_field_crop(noise_fields[i], tile.origin, crop_size) for i, tile in jobs])
        drawn = pipeline(known, masks, maps, [tile_seed(seeds[i], round_number) for i, _ in jobs],
                         num_inference_steps=num_inference_steps, batch_size=batch_size, progress=False, noise=noise)
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


@dataclass
class InpaintedVolume:
    """A volume with its edit region drawn slice by slice: ``channel_images`` one (D, H, W) array per channel in the
    dataset's units and pixel type (the real voxels outside ``edit``), ``edit`` (D, H, W) bool."""

    channel_images: list
    edit: np.ndarray
    tiles: dict             # edited slice index -> its crops (Tile)

    def record(self) -> dict:
        """What the manifest keeps of the edit: its size, box and the crops of each edited slice."""
        nonzero = np.nonzero(self.edit)
        box = ([int(a.min()) for a in nonzero] + [int(a.max()) + 1 for a in nonzero]) if nonzero[0].size else None
        return {"unit": "volume", "edit_voxels": int(self.edit.sum()), "edit_box": box,
                "crops": {str(z): [[int(t.origin[0]), int(t.origin[1])] for t in slice_tiles]
                          for z, slice_tiles in self.tiles.items()}}


def volume_edit_region(target_map: np.ndarray, new_map: np.ndarray, margin: int) -> np.ndarray:
    """``map_edit_region`` of every slice of a (D, H, W) volume: its changes grown in-plane."""
    edit = np.zeros(np.shape(new_map), dtype=bool)
    for z in np.flatnonzero((np.asarray(new_map) != np.asarray(target_map)).reshape(len(edit), -1).any(axis=1)):
        edit[z] = map_edit_region(target_map[z], new_map[z], margin)
    return edit


def inpaint_volume(pipeline, window: ImageWindows, image, label_map, edit, seed: int, dtypes,
                   num_inference_steps: int, ignore_label=None, batch_size: int = 16,
                   volume_noise: str = "per-slice") -> InpaintedVolume:
    """Draw the edit region (D, H, W) of a real volume ``image`` (C, D, H, W, the dataset's units) slice by slice,
    every slice conditioned on its slice of ``label_map``; the crops' noise as ``volume_noise`` says (module
    docstring)."""
    if volume_noise not in VOLUME_NOISES:
        raise ValueError(f"volume_noise must be one of {VOLUME_NOISES}, got {volume_noise!r}")
    edited = [int(z) for z in np.flatnonzero(edit.reshape(len(edit), -1).any(axis=1))]
    fields = None
    if volume_noise == "aligned":
        shared = noise_field(seed, edit.shape[1:], pipeline.image_size, pipeline.num_channels)
        fields = [shared] * len(edited)       # one array: every slice's crops read the same field
    channel_images = [np.asarray(image[channel]).astype(dtype) for channel, dtype in enumerate(dtypes)]
    tiles = {}
    for start in range(0, len(edited), SLICES_PER_ROUND):      # bounded memory: a few slices in model space at once
        chunk = edited[start:start + SLICES_PER_ROUND]
        results = inpaint_slices(pipeline, window, [image[:, z] for z in chunk], [label_map[z] for z in chunk],
                                 [edit[z] for z in chunk], [tile_seed(seed, z) for z in chunk], [dtypes] * len(chunk),
                                 num_inference_steps, ignore_label, batch_size,
                                 None if fields is None else fields[:len(chunk)])
        for z, result in zip(chunk, results):
            for channel, drawn in enumerate(result.channel_images):
                channel_images[channel][z] = drawn
            tiles[z] = result.tiles             # the record keeps the crops; the pixels are in channel_images
    return InpaintedVolume(channel_images, edit, tiles)
