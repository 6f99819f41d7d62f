"""Stage 1: read an nnU-Net raw dataset and turn it into model-ready 2D slices (and back)."""
from nnunet_synth.dataset.geometry import SliceFit, fit_slice, restore_slice
from nnunet_synth.dataset.intensity import ImageWindows, IntensityWindow, choose_intensity_window
from nnunet_synth.dataset.raw_dataset import RawDataset, resolve_dataset_folder
from nnunet_synth.dataset.slices import LabelledSlice, class_pixel_frequencies, dataset_intensity_window, iter_slices

__all__ = [
    "RawDataset", "resolve_dataset_folder", "ImageWindows", "IntensityWindow", "choose_intensity_window",
    "SliceFit", "fit_slice", "restore_slice", "LabelledSlice", "iter_slices", "class_pixel_frequencies",
    "dataset_intensity_window",
]
