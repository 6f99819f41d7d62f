"""Write nnU-Net raw files atomically: images and label maps through SimpleITK or skimage, dataset.json
through nnU-Net's own ``generate_dataset_json``."""
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

from nnunet_synth.atomic import atomic_path

NATURAL_IMAGE_ENDINGS = (".png", ".bmp", ".tif")


def write_volume(array: np.ndarray, path, spacing_xyz=(1.0, 1.0, 1.0), origin=None, direction=None):
    """Write a (Z, Y, X) or (Y, X) array as a medical image (ending decides the format) atomically."""
    path = Path(path)
    if path.name.endswith(NATURAL_IMAGE_ENDINGS):
        from skimage import io
        plane = array[0] if array.ndim == 3 else array
        with atomic_path(path) as temp_name:
            io.imsave(temp_name, plane, check_contrast=False)
        return
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing_xyz][:image.GetDimension()])
    if origin is not None:
        image.SetOrigin([float(o) for o in origin])
    if direction is not None:
        image.SetDirection([float(d) for d in direction])
    with atomic_path(path) as temp_name:
        sitk.WriteImage(image, temp_name, True)


def write_dataset_json_atomic(dataset_folder, **generate_dataset_json_kwargs):
    """Call nnU-Net's ``generate_dataset_json`` in a scratch folder and move the result into place."""
    dataset_folder = Path(dataset_folder)
    dataset_folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dataset_folder, prefix=".nnsynth_json_") as scratch:
        generate_dataset_json(scratch, **generate_dataset_json_kwargs)
        with atomic_path(dataset_folder / "dataset.json") as temp_name:
            Path(scratch, "dataset.json").replace(temp_name)
