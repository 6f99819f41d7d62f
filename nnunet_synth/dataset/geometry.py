"""Fit a 2D slice to the model's square size (centre-pad, then resize) and restore it exactly.

Padding is undone by cropping; resizing by resizing back to the padded shape. When the padded slice already
has the model size (256x256 data at the 256 preset) the round trip is the identity.
"""
from dataclasses import asdict, dataclass

import numpy as np
from skimage.transform import resize


@dataclass(frozen=True)
class SliceFit:
    """How one slice of ``original_shape`` was padded (``pad`` = top, bottom, left, right) and resized."""

    original_shape: tuple
    pad: tuple
    model_size: int

    @property
    def padded_shape(self):
        height, width = self.original_shape
        top, bottom, left, right = self.pad
        return (height + top + bottom, width + left + right)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SliceFit":
        return cls(tuple(data["original_shape"]), tuple(data["pad"]), int(data["model_size"]))


def plan_fit(shape, model_size: int) -> SliceFit:
    height, width = shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return SliceFit((int(height), int(width)), (top, side - height - top, left, side - width - left), int(model_size))


def _resize(array, shape, is_label):
    if tuple(array.shape) == tuple(shape):
        return array.copy()
    downsampling = any(new < old for new, old in zip(shape, array.shape))
    return resize(array, shape, order=0 if is_label else 1, preserve_range=True,
                  anti_aliasing=(downsampling and not is_label), mode="edge").astype(array.dtype)


def fit_slice(image: np.ndarray, label: np.ndarray, model_size: int, image_pad_value: float = -1.0):
    """Pad ``image`` (C, H, W) and ``label`` (H, W) to a centred square, then resize to ``model_size``; return
    both and the fit. Every channel is fitted the same way."""
    fit = plan_fit(label.shape, model_size)
    top, bottom, left, right = fit.pad
    padded_image = np.pad(image, ((0, 0), (top, bottom), (left, right)), constant_values=image_pad_value)
    padded_label = np.pad(label, ((top, bottom), (left, right)), constant_values=0)
    size = (model_size, model_size)
    fitted_image = np.stack([_resize(channel, size, False) for channel in padded_image])
    return fitted_image, _resize(padded_label, size, True), fit


def restore_slice(image: np.ndarray, label, fit: SliceFit):
    """Inverse of ``fit_slice``: ``image`` (C, S, S) and ``label`` (S, S, may be None) back to
    ``fit.original_shape``."""
    top, bottom, left, right = fit.pad
    height, width = fit.original_shape

    def restore(array, is_label):
        padded = _resize(array, fit.padded_shape, is_label)
        return padded[top:top + height, left:left + width]

    restored_image = np.stack([restore(channel, False) for channel in image])
    return restored_image, (None if label is None else restore(label, True))
