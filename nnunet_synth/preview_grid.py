"""Preview grids: real and synthetic slices side by side, with the label map as a colour overlay."""
import numpy as np

from nnunet_synth.atomic import atomic_path

OVERLAY_ALPHA = 0.35


def label_overlay_colours(num_classes: int) -> np.ndarray:
    """RGBA colours per class value; background transparent."""
    import matplotlib
    colours = matplotlib.colormaps["tab10"](np.arange(max(num_classes, 2)) % 10)
    colours[:, 3] = OVERLAY_ALPHA
    colours[0] = (0, 0, 0, 0)
    return colours


def save_preview_grid(rows, column_titles, path, num_classes, window=None, title=None):
    """Save a grid PNG. ``rows`` is a list of rows; each cell is ``(image or None, label_map or None)``.

    An image with a label map is drawn with the overlay; a label map alone is drawn in colour; ``window``
    (lower, upper) fixes the grey scale for images in dataset units; ``title`` goes above the grid. A
    multi-channel image (C, H, W) is drawn as its channels side by side (bring them to one scale first, e.g. model
    space), each with the overlay.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = label_overlay_colours(num_classes)
    num_rows, num_columns = len(rows), len(column_titles)
    figure, axes = plt.subplots(num_rows, num_columns, figsize=(2.2 * num_columns, 2.2 * num_rows), squeeze=False)
    grey_range = {} if window is None else {"vmin": window[0], "vmax": window[1]}
    for row_index, row in enumerate(rows):
        for column_index, (image, label_map) in enumerate(row):
            axis = axes[row_index][column_index]
            axis.axis("off")
            if image is not None and image.ndim == 3:
                if label_map is not None:
                    label_map = np.concatenate([label_map] * len(image), axis=1)
                image = np.concatenate(list(image), axis=1)
            if image is not None:
                axis.imshow(image, cmap="gray", interpolation="nearest", **grey_range)
            if label_map is not None:
                rgba = colours[np.clip(label_map.astype(int), 0, len(colours) - 1)]
                if image is None:
                    rgba = rgba.copy()
                    rgba[..., 3] = 1.0
                axis.imshow(rgba, interpolation="nearest")
            if row_index == 0:
                axis.set_title(column_titles[column_index], fontsize=8)
    if title:
        figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as temp_name:
        figure.savefig(temp_name, dpi=80)
    plt.close(figure)
    return path
