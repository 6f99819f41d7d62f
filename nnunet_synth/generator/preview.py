"""Preview grid written during training: label map | real slice | generated from that label map."""
from nnunet_synth.preview_grid import save_preview_grid

MODEL_WINDOW = (-1.0, 1.0)   # training slices are in model space


def write_preview_grid(path, label_maps, real_images, generated_images, class_names, title=""):
    """One row per slice; columns: label map (colours), real slice and generated slice with the label overlay."""
    rows = [[(None, label_map), (real, label_map), (generated, label_map)]
            for label_map, real, generated in zip(label_maps, real_images, generated_images)]
    legend = ", ".join(f"{value}={name}" for value, name in enumerate(class_names) if value > 0)
    return save_preview_grid(rows, ["label map", "real", "generated"], path, len(class_names),
                             window=MODEL_WINDOW, title=f"{title}\n{legend}".strip())
