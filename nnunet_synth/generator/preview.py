"""Preview grid written during training: label map | real slice | generated from that label map."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage.color import label2rgb  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402

from nnunet_synth.atomic import atomic_path  # noqa: E402

OVERLAY_COLOURS = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "purple"]


def _overlay(image, label_map):
    """Grey image in [-1, 1] with each class's outline drawn in its colour."""
    grey = np.clip((image + 1.0) / 2.0, 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    outlines = np.where(find_boundaries(label_map, mode="inner"), label_map, 0)
    coloured = label2rgb(outlines, image=rgb, bg_label=0, alpha=1.0, colors=OVERLAY_COLOURS, image_alpha=1.0)
    return np.where((outlines > 0)[..., None], coloured, rgb)


def write_preview_grid(path, label_maps, real_images, generated_images, class_names, title=""):
    """One row per slice; columns: label map (colours), real slice and generated slice with class outlines."""
    rows = len(label_maps)
    figure, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    for row in range(rows):
        panels = [label2rgb(label_maps[row], bg_label=0, colors=OVERLAY_COLOURS),
                  _overlay(real_images[row], label_maps[row]), _overlay(generated_images[row], label_maps[row])]
        for column, (panel, name) in enumerate(zip(panels, ("label map", "real", "generated"))):
            axes[row, column].imshow(panel, interpolation="nearest")
            axes[row, column].set_axis_off()
            if row == 0:
                axes[row, column].set_title(name, fontsize=9)
    legend = ", ".join(f"{value}={name}({OVERLAY_COLOURS[(value - 1) % len(OVERLAY_COLOURS)]})"
                       for value, name in enumerate(class_names) if value > 0)
    figure.suptitle(f"{title}\n{legend}".strip(), fontsize=8)
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as temp_name:
        figure.savefig(temp_name, format="png", dpi=80)
    plt.close(figure)
