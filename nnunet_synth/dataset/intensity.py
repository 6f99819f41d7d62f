"""Intensity window: clip a dataset's intensities to a window, scale to [-1, 1], and map back exactly."""
from dataclasses import asdict, dataclass

import numpy as np

HOUNSFIELD_WINDOW = (-1000.0, 1000.0)
PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class IntensityWindow:
    """Window [lower, upper] in the dataset's own units; ``source`` says how it was chosen."""

    lower: float
    upper: float
    source: str

    def __post_init__(self):
        if not self.upper > self.lower:
            raise ValueError(f"intensity window needs upper > lower, got [{self.lower}, {self.upper}]")

    def to_model(self, image: np.ndarray) -> np.ndarray:
        """Clip to the window and scale linearly to [-1, 1] (float32)."""
        clipped = np.clip(image.astype(np.float64), self.lower, self.upper)
        return (2.0 * (clipped - self.lower) / (self.upper - self.lower) - 1.0).astype(np.float32)

    def from_model(self, scaled: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Inverse of ``to_model`` into the dataset's units and pixel type (rounded for integer types)."""
        values = (np.clip(scaled.astype(np.float64), -1.0, 1.0) + 1.0) / 2.0 * (self.upper - self.lower) + self.lower
        dtype = np.dtype(dtype)
        if np.issubdtype(dtype, np.integer):
            limits = np.iinfo(dtype)
            values = np.clip(np.rint(values), limits.min, limits.max)
        return values.astype(dtype)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "IntensityWindow":
        return cls(float(data["lower"]), float(data["upper"]), str(data["source"]))


def looks_like_hounsfield(intensities: np.ndarray) -> bool:
    """CT in Hounsfield units has air near -1000; 8-bit or normalised CT does not go below -500."""
    return float(np.percentile(intensities, PERCENTILES[0])) < -500.0


def choose_intensity_window(intensities: np.ndarray, channel_name: str, override=None) -> IntensityWindow:
    """Pick the window: ``override`` if given, HU [-1000, 1000] for CT in Hounsfield units, else the
    0.5-99.5 percentiles of ``intensities`` (a sample of the training images)."""
    if override is not None:
        return IntensityWindow(float(override[0]), float(override[1]), "user")
    if channel_name.strip().lower() == "ct" and looks_like_hounsfield(intensities):
        return IntensityWindow(*HOUNSFIELD_WINDOW, "hounsfield")
    lower, upper = np.percentile(intensities, PERCENTILES)
    if upper <= lower:
        upper = lower + 1.0
    return IntensityWindow(float(lower), float(upper), "percentile_0.5_99.5")


@dataclass(frozen=True)
class ImageWindows:
    """One ``IntensityWindow`` per input channel (nnU-Net's ``_0000``, ``_0001``, ... files): images are (C, ...)
    arrays, each channel clipped and scaled with its own window and mapped back exactly."""

    channels: tuple

    def __post_init__(self):
        if not self.channels:
            raise ValueError("ImageWindows needs at least one channel window")

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    def to_model(self, image: np.ndarray) -> np.ndarray:
        """(C, ...) dataset units -> (C, ...) float32 in [-1, 1]."""
        if image.shape[0] != self.num_channels:
            raise ValueError(f"image has {image.shape[0]} channels, the windows {self.num_channels}")
        return np.stack([window.to_model(channel) for window, channel in zip(self.channels, image)])

    def from_model(self, scaled: np.ndarray, dtypes) -> list:
        """(C, ...) model space -> one array per channel in the dataset's units and that channel's pixel type."""
        return [window.from_model(channel, dtype) for window, channel, dtype in zip(self.channels, scaled, dtypes)]

    def to_dict(self) -> list:
        return [window.to_dict() for window in self.channels]

    @classmethod
    def from_dict(cls, data) -> "ImageWindows":
        """From ``to_dict``; a single window's dict (generators made before multi-channel support) is one channel."""
        if isinstance(data, dict):
            data = [data]
        return cls(tuple(IntensityWindow.from_dict(item) for item in data))
