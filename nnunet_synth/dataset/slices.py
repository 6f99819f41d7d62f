"""2D slices of an nnU-Net raw dataset, and the per-class pixel frequencies of its label maps.

Volumes are sliced along their first array axis (z for NIfTI as SimpleITK reads it); 2D images are one slice.
"""
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from nnunet_synth.dataset.intensity import ImageWindows, choose_intensity_window
from nnunet_synth.dataset.raw_dataset import RawDataset


@dataclass
class LabelledSlice:
    """One 2D slice in the dataset's own units, with its label map and where it came from."""

    case_id: str
    slice_index: int
    image: np.ndarray        # (C, H, W) float32, dataset units
    label_map: np.ndarray    # (H, W) int16, dataset label values
    spacing: tuple           # in-plane spacing (row, column) in nnU-Net's order


def iter_case_volumes(dataset: RawDataset, case_ids=None, store=None):
    """Yield (case_id, image (C, Z, Y, X) float32, label (Z, Y, X) int16, properties) for every case of
    ``case_ids`` (default: all training cases): assembled from ``store`` (a ``NativeSlices`` that holds these
    cases, so nothing is decoded again) when given, else read from the raw files."""
    case_ids = dataset.case_ids if case_ids is None else list(case_ids)
    if store is None:
        for case_id in case_ids:
            yield (case_id, *dataset.read_case(case_id))
        return
    rows = store.case_rows()
    for case_id in case_ids:
        image = np.stack([store.images[row] for row in rows[case_id]], axis=1)
        label_map = np.stack([store.label_maps[row] for row in rows[case_id]])
        yield case_id, image, label_map, store.properties[case_id]


def iter_slices(dataset: RawDataset, case_ids=None, skip_background_only=False, progress=False, store=None):
    """Yield ``LabelledSlice`` for every slice of ``case_ids`` (default: all training cases); from ``store``
    when given (see ``iter_case_volumes``)."""
    case_ids = dataset.case_ids if case_ids is None else list(case_ids)
    volumes = iter_case_volumes(dataset, case_ids, store)
    for case_id, image, label_map, properties in tqdm(volumes, total=len(case_ids), desc=f"reading {dataset.name}",
                                                      disable=not progress, unit="case"):
        in_plane_spacing = tuple(float(s) for s in properties["spacing"][-2:])
        for slice_index in range(image.shape[1]):
            if skip_background_only and not label_map[slice_index].any():
                continue
            yield LabelledSlice(case_id, slice_index, image[:, slice_index], label_map[slice_index], in_plane_spacing)


def class_pixel_frequencies(dataset: RawDataset, case_ids=None, store=None) -> np.ndarray:
    """Fraction of the annotated label-map pixels that belong to each class (index = label value), summing to 1.
    Pixels of the ignore label are not annotated: they are not counted (their entry is 0). From ``store`` when
    given (see ``iter_case_volumes``)."""
    counts = np.zeros(dataset.num_classes, dtype=np.int64)
    for _, _, label_map, _ in iter_case_volumes(dataset, case_ids, store):
        counts += np.bincount(label_map.ravel(), minlength=dataset.num_classes)[:dataset.num_classes]
    if dataset.ignore_label is not None:
        counts[dataset.ignore_label] = 0
    return counts / counts.sum()


def dataset_intensity_window(dataset: RawDataset, case_ids=None, override=None, max_samples=2_000_000,
                             seed=0, store=None) -> ImageWindows:
    """Choose one intensity window per channel from (a seeded sample of) the training images; see
    ``choose_intensity_window``. ``override`` (lower, upper) is used for every channel. From ``store`` when given
    (see ``iter_case_volumes``)."""
    if override is not None:
        return ImageWindows(tuple(choose_intensity_window(np.zeros(1), name, override)
                                  for name in dataset.channel_list))
    rng = np.random.default_rng(seed)
    case_ids = dataset.case_ids if case_ids is None else list(case_ids)
    per_case = max(1, max_samples // max(1, len(case_ids)))
    samples = [[] for _ in dataset.channel_list]
    for _, image, _, _ in iter_case_volumes(dataset, case_ids, store):
        for channel, channel_image in enumerate(image):
            flat = channel_image.ravel()
            # the same pixels for every channel: one draw per case from a generator advanced once per case
            if channel == 0:
                chosen = None if flat.size <= per_case else rng.choice(flat.size, per_case, replace=False)
            samples[channel].append(flat if chosen is None else flat[chosen])
    return ImageWindows(tuple(choose_intensity_window(np.concatenate(channel_samples), name)
                              for channel_samples, name in zip(samples, dataset.channel_list)))
