"""Write nnU-Net raw files atomically: images and label maps through SimpleITK or skimage, dataset.json
through nnU-Net's own ``generate_dataset_json``."""
import errno
import gzip
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

from nnunet_synth.atomic import IncompleteWrite, atomic_path

NATURAL_IMAGE_ENDINGS = (".png", ".bmp", ".tif")


def write_volume(array: np.ndarray, path, spacing_xyz=(1.0, 1.0, 1.0), origin=None, direction=None):
    """Write a (Z, Y, X) or (Y, X) array as a medical image (ending decides the format) atomically."""
    path = Path(path)
    if path.name.endswith(NATURAL_IMAGE_ENDINGS):
        from skimage import io
        plane = array[0] if array.ndim == 3 else array
        with atomic_path(path, verify=lambda temp_name: _check_read_back(io.imread(temp_name), plane)) as temp_name:
            io.imsave(temp_name, plane, check_contrast=False)
        return
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing_xyz][:image.GetDimension()])
    if origin is not None:
        image.SetOrigin([float(o) for o in origin])
    if direction is not None:
        image.SetDirection([float(d) for d in direction])
    with atomic_path(path, verify=lambda temp_name: _verify_medical_image(temp_name, array)) as temp_name:
        try:
            sitk.WriteImage(image, temp_name, True)
        except RuntimeError as error:
            raise IncompleteWrite(_write_errno(temp_name), str(error).strip().splitlines()[-1]) from None


def _write_errno(path) -> int:
    """ENOSPC when the disk is (nearly) full, else a generic I/O error."""
    return errno.ENOSPC if shutil.disk_usage(Path(path).parent).free < 1024 * 1024 else errno.EIO


def _check_read_back(read_back: np.ndarray, written: np.ndarray):
    if read_back.shape != written.shape or not np.array_equal(read_back, written, equal_nan=True):
        raise IncompleteWrite(None, "the file read back differs from what was written")


def _verify_medical_image(path, written: np.ndarray):
    """SimpleITK writes a short file on a full disk without raising (and reads one back padded with zeros): the
    compressed stream must be complete and the pixels read back equal to those written."""
    try:
        if str(path).endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                while stream.read(1 << 22):
                    pass
        read_back = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except (OSError, EOFError, RuntimeError) as error:
        raise IncompleteWrite(_write_errno(path), f"unreadable after writing ({error})") from None
    try:
        _check_read_back(read_back, written)
    except IncompleteWrite:
        raise IncompleteWrite(_write_errno(path), "the file read back differs from what was written") from None


def write_dataset_json_atomic(dataset_folder, **generate_dataset_json_kwargs):
    """Call nnU-Net's ``generate_dataset_json`` in a scratch folder and move the result into place."""
    dataset_folder = Path(dataset_folder)
    dataset_folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dataset_folder, prefix=".nnsynth_json_") as scratch:
        generate_dataset_json(scratch, **generate_dataset_json_kwargs)
        with atomic_path(dataset_folder / "dataset.json") as temp_name:
            Path(scratch, "dataset.json").replace(temp_name)
