"""Where a pathology region may be pasted when the dataset has no host class (lesions drawn on unlabelled
background, method.md §3): where the class occurs in the real maps, and inside the body of the target map.
Maps may be 2D slices or 3D volumes; positions are relative to the body's box, so patients of different size
and position line up."""
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

PRIOR_GRID = {2: 128, 3: 64}   # occurrence priors live on this grid per axis, relative to the map's frame


def _box(shape, box):
    """(starts..., stops...) of the frame positions are relative to: the body's box, else the whole map."""
    return (*([0] * len(shape)), *shape) if box is None else tuple(box)


def _grid_positions(coordinates, start, stop, grid):
    return np.clip(((coordinates - start) * grid) // max(1, stop - start), 0, grid - 1)


def class_occurrence_prior(label_maps, class_value: int, dilation: int, boxes=None, min_maps: int = 2,
                           grid=None) -> np.ndarray:
    """Bool array (grid per axis): positions, relative to each map's frame (its body box when ``boxes`` are
    given, else the map), where ``class_value`` occurs in at least ``min_maps`` real maps or in half of the maps
    that hold it, whichever is fewer, grown by ``dilation`` grid pixels. The grid is ``PRIOR_GRID``, or the median
    frame's shortest side when that is smaller, so that a grid pixel is never smaller than a map pixel (a finer
    grid would leave holes between the pixels seen)."""
    hits, maps_with_class = None, 0
    if grid is None:
        sides = [min(stop - start for start, stop in zip(box[:len(box) // 2], box[len(box) // 2:]))
                 for box in boxes if box is not None] if boxes is not None else []
        sides = sides or [min(np.asarray(label_maps[0]).shape)]
        grid = max(8, min(PRIOR_GRID[np.asarray(label_maps[0]).ndim], int(np.median(sides))))
    for index, label_map in enumerate(label_maps):
        present = np.asarray(label_map) == class_value
        if hits is None:
            ndim = present.ndim
            hits = np.zeros((grid,) * ndim, dtype=np.int32)
        if not present.any():
            continue
        maps_with_class += 1
        frame = _box(present.shape, None if boxes is None else boxes[index])
        positions = tuple(_grid_positions(axis, frame[i], frame[i + ndim], grid)
                          for i, axis in enumerate(np.nonzero(present)))
        seen = np.zeros(hits.shape, dtype=bool)
        seen[positions] = True
        hits += seen
    # few maps hold the class (a handful of 3D volumes): half of them, not all of them (their intersection)
    prior = hits >= min(min_maps, max(1, (maps_with_class + 1) // 2), max(1, hits.max()))
    return ndimage.binary_dilation(prior, iterations=dilation) if dilation > 0 else prior


def prior_on_map(prior: np.ndarray, shape, box=None) -> np.ndarray:
    """The occurrence prior resampled (nearest) onto a map of ``shape`` whose frame is ``box`` (None = the map);
    False outside the frame."""
    grid, ndim = prior.shape[0], len(shape)
    frame = _box(shape, box)
    inside, indices = np.ones(shape, dtype=bool), []
    for axis in range(ndim):
        positions = ((np.arange(shape[axis]) - frame[axis]) * grid) // max(1, frame[axis + ndim] - frame[axis])
        along = [1] * ndim
        along[axis] = shape[axis]
        inside &= ((positions >= 0) & (positions < grid)).reshape(along)
        indices.append(np.clip(positions, 0, grid - 1).reshape(along))
    return inside & prior[tuple(indices)]


def mask_box(mask: np.ndarray):
    """(starts..., stops...) of a boolean mask (stop exclusive), None if empty: (row0, col0, row1, col1) in 2D."""
    coordinates = np.nonzero(mask)
    if coordinates[0].size == 0:
        return None
    return tuple(int(axis.min()) for axis in coordinates) + tuple(int(axis.max()) + 1 for axis in coordinates)


def body_mask(image: np.ndarray) -> np.ndarray:
    """The body in a real slice or volume: smoothed image above Otsu's threshold, closed, holes (lungs, bowel gas)
    filled, the largest component (drops the table and noise). A volume is masked slice by slice: lungs or a
    trachea cut open by the first or last slice are still holes of each slice, and a volume of a few slices is not
    eroded away from its ends."""
    if np.ndim(image) == 3:
        return np.stack([body_mask(plane) for plane in image])
    image = ndimage.gaussian_filter(np.asarray(image, dtype=np.float32), 2)
    if image.max() <= image.min():
        return np.zeros(image.shape, dtype=bool)
    foreground = ndimage.binary_fill_holes(ndimage.binary_closing(image > threshold_otsu(image), iterations=2))
    foreground = ndimage.binary_opening(foreground, iterations=3)
    components, count = ndimage.label(foreground)
    if count == 0:
        return np.zeros(image.shape, dtype=bool)
    largest = 1 + int(np.argmax(ndimage.sum_labels(foreground, components, range(1, count + 1))))
    return ndimage.binary_fill_holes(components == largest)
