"""Where a pathology region may be pasted when the dataset has no host class (lesions drawn on unlabelled
background, method.md §3): where the class occurs in the real maps, and inside the body of the target slice."""
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

PRIOR_GRID = 128   # occurrence priors live on this grid, in coordinates relative to the map's size


def _box(shape, box):
    """(row0, col0, row1, col1) of the frame positions are relative to: the body's box, else the whole map."""
    return (0, 0, shape[0], shape[1]) if box is None else box


def class_occurrence_prior(label_maps, class_value: int, dilation: int, boxes=None, min_maps: int = 2,
                           grid=PRIOR_GRID) -> np.ndarray:
    """(grid, grid) bool: positions, relative to each map's frame (its body box when ``boxes`` are given, else
    the map), where ``class_value`` occurs in at least ``min_maps`` real maps, grown by ``dilation`` grid pixels.
    Relative to the body box, patients of different size and position line up."""
    hits = np.zeros((grid, grid), dtype=np.int32)
    for index, label_map in enumerate(label_maps):
        present = np.asarray(label_map) == class_value
        if not present.any():
            continue
        row0, col0, row1, col1 = _box(present.shape, None if boxes is None else boxes[index])
        rows, cols = np.nonzero(present)
        rows = np.clip(((rows - row0) * grid) // max(1, row1 - row0), 0, grid - 1)
        cols = np.clip(((cols - col0) * grid) // max(1, col1 - col0), 0, grid - 1)
        seen = np.zeros((grid, grid), dtype=bool)
        seen[rows, cols] = True
        hits += seen
    prior = hits >= min(min_maps, max(1, hits.max()))
    return ndimage.binary_dilation(prior, iterations=dilation) if dilation > 0 else prior


def prior_on_map(prior: np.ndarray, shape, box=None) -> np.ndarray:
    """The occurrence prior resampled (nearest) onto a map of ``shape`` whose frame is ``box`` (None = the map);
    False outside the frame."""
    grid = prior.shape[0]
    row0, col0, row1, col1 = _box(shape, box)
    rows = ((np.arange(shape[0]) - row0) * grid) // max(1, row1 - row0)
    cols = ((np.arange(shape[1]) - col0) * grid) // max(1, col1 - col0)
    inside = ((rows >= 0) & (rows < grid))[:, None] & ((cols >= 0) & (cols < grid))[None, :]
    return inside & prior[np.clip(rows, 0, grid - 1)[:, None], np.clip(cols, 0, grid - 1)[None, :]]


def mask_box(mask: np.ndarray):
    """(row0, col0, row1, col1) of a boolean mask (stop exclusive), None if empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)


def body_mask(image: np.ndarray) -> np.ndarray:
    """The body in a real slice: smoothed image above Otsu's threshold, closed, holes (lungs, bowel gas) filled,
    the largest component (drops the table and noise)."""
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
