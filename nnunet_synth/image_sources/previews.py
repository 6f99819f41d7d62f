"""The preview grids the image sources share: a fold's slices or whole volumes beside their real targets, in the
grey scale of ``display_windows``."""
import numpy as np

from nnunet_synth.dataset import ImageWindows, RawDataset, choose_intensity_window
from nnunet_synth.dataset.native_slices import NativeSlices, NativeVolumes, evenly_spread
from nnunet_synth.preview_grid import save_preview_grid
from nnunet_synth.writer.synthetic_store import SyntheticStore

PREVIEW_ROWS = 6


def write_slice_preview(dataset: RawDataset, store: SyntheticStore, fold, real: NativeSlices, window: ImageWindows,
                        num_rows=PREVIEW_ROWS):
    """Grid: target real slice with its label | new label map | synthetic image | synthetic with overlay.
    Images are shown in model space (each channel through its own window), channels side by side."""
    reader = dataset.reader_writer()
    rows = []
    for case_id in store.complete_case_ids(fold)[:num_rows]:
        target = store.cases[case_id]["source"]["target"]
        real_image, real_label_map = real.slice(target["case_id"], target["slice_index"])
        synthetic_image = window.to_model(reader.read_images([str(p) for p in store.image_files(case_id)])[0][:, 0])
        synthetic_label = reader.read_seg(str(store.label_file(case_id)))[0][0, 0].astype(int)
        rows.append([(window.to_model(real_image), real_label_map), (None, synthetic_label),
                     (synthetic_image, None), (synthetic_image, synthetic_label)])
    path = store.preview_file(fold)
    if rows:
        save_preview_grid(rows, ["real target + labels", "new label map", "synthetic", "synthetic + labels"],
                          path, dataset.num_classes, window=(-1.0, 1.0))
    return path


def write_volume_preview(dataset: RawDataset, store: SyntheticStore, fold, real: NativeVolumes,
                         window: ImageWindows, num_rows: int = PREVIEW_ROWS):
    """The preview grid of ``write_slice_preview`` for whole volumes: per case, the slice with
    the most pasted voxels."""
    reader = dataset.reader_writer()
    rows = []
    for case_id in store.complete_case_ids(fold)[:num_rows]:
        target_image, target_map = real.slice(store.cases[case_id]["source"]["target"]["case_id"])
        synthetic_image = reader.read_images([str(p) for p in store.image_files(case_id)])[0]
        synthetic_label = reader.read_seg(str(store.label_file(case_id)))[0][0].astype(int)
        z = int(np.argmax((synthetic_label != target_map).reshape(len(target_map), -1).sum(axis=1)))
        rows.append([(window.to_model(target_image[:, z]), target_map[z]), (None, synthetic_label[z]),
                     (window.to_model(synthetic_image[:, z]), None),
                     (window.to_model(synthetic_image[:, z]), synthetic_label[z])])
    path = store.preview_file(fold)
    if rows:
        save_preview_grid(rows, ["real target + labels", "new label map", "synthetic", "synthetic + labels"],
                          path, dataset.num_classes, window=(-1.0, 1.0))
    return path


def display_windows(dataset: RawDataset, images, max_slices: int = 2000) -> ImageWindows:
    """The preview grid's grey scale per channel, chosen as a generator's window would be (a sample of at most
    ``max_slices`` real slices, evenly spread)."""
    chosen = [images[i] for i in evenly_spread(len(images), max_slices)]
    return ImageWindows(tuple(
        choose_intensity_window(np.concatenate([np.asarray(image[channel], dtype=np.float32).ravel()[::97]
                                                for image in chosen]), name)
        for channel, name in enumerate(dataset.channel_list)))
