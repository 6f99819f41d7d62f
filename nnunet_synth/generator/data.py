"""From dataset slices to model tensors: the glue training and generation share."""
import numpy as np

from nnunet_synth.dataset import ImageWindows, RawDataset, fit_slice, iter_slices
from nnunet_synth.errors import NnsynthError

MODEL_MINIMUM = -1.0  # the window's minimum in model space


def mask_outside_region(images: np.ndarray, label_maps: np.ndarray, region_values) -> np.ndarray:
    """Diff-Lung §3.2: pixels whose label is not in ``region_values`` are set to the window minimum (-1)."""
    inside = np.isin(label_maps, list(region_values))[:, None]      # the same pixels in every channel
    return np.where(inside, images, np.float32(MODEL_MINIMUM)).astype(np.float32)


def load_model_slices(dataset: RawDataset, case_ids, window: ImageWindows, image_size: int,
                      region_values=None, progress=False):
    """Every slice of ``case_ids`` in model space: ``window.to_model`` then ``fit_slice(.., image_size, -1)``.

    Returns images (N, channels, S, S) float32 in [-1, 1], label maps (N, S, S) int64 and a list of
    (case_id, slice_index, SliceFit) to put generated slices back (``restore_slice``). With ``region_values``
    the pixels outside those classes are set to -1 (Diff-Lung §3.2; off unless the user names the region).
    """
    images, label_maps, provenance = [], [], []
    for labelled in iter_slices(dataset, case_ids, progress=progress):
        image, label_map, fit = fit_slice(window.to_model(labelled.image), labelled.label_map, image_size,
                                          image_pad_value=MODEL_MINIMUM)
        images.append(image)
        label_maps.append(label_map)
        provenance.append((labelled.case_id, labelled.slice_index, fit))
    if not images:
        raise NnsynthError(f"{dataset.name}: the cases {list(case_ids)[:5]} hold no slices")
    images = np.stack(images).astype(np.float32)
    label_maps = np.stack(label_maps).astype(np.int64)
    if region_values is not None:
        images = mask_outside_region(images, label_maps, region_values)
    return images, label_maps, provenance
