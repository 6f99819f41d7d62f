"""Soft-tissue sarcoma CT (STS_xxx/{CT,GTV}.nii.gz) -> nnU-Net raw dataset with one channel, CT in Hounsfield units.

Labels: 0 background (muscle, fat, bone, air: no host class), 1 tumour (the gross tumour volume). Volumes keep the
source's geometry (0.98 x 0.98 x 3.27 mm) and pixel type (float32 HU). ``downsample`` > 1 averages blocks of that
many voxels in-plane (x and y; the 3.27 mm slices are kept, SimpleITK's ``BinShrink``): the label is the block's
tumour fraction >= 0.5, so image and label keep identical geometry. 22 patients: nnU-Net's own 5-fold split.

Every source file is checked (present, image and mask on one grid, mask values 0 and 1) before anything is
written; the cases are written into a temporary folder beside the dataset folder, which is renamed into place at
the end, so an interrupted conversion leaves no half-written dataset (``dataset_target.converted_dataset``, shared
by every converter: an existing dataset of that id is refused unless ``--overwrite``).
"""
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_synth.dataset.writing import write_dataset_json_atomic, write_volume
from nnunet_synth.dataset_tools.check_dataset import print_summary
from nnunet_synth.dataset_tools.convert_covid19_ct_slices import add_output_arguments, output_root_from_args
from nnunet_synth.dataset_tools.dataset_target import check_target, converted_dataset
from nnunet_synth.errors import CommandParser, NnsynthError, command_entry_point

IMAGE_NAME, MASK_NAME = "CT.nii.gz", "GTV.nii.gz"
LABELS = {"background": 0, "tumour": 1}
STS_ABOUT = {
    "description": "Soft-tissue sarcoma CT of the extremities (Hounsfield units, cropped 5 cm around the tumour), "
                   "gross tumour volume; IBSI validation data set from the TCIA Soft-tissue-Sarcoma collection",
    "reference": "Vallieres et al., Phys Med Biol 2015 60(14):5471; TCIA doi 10.7937/K9/TCIA.2015.7GO2GSKS",
    "license": "CC BY 3.0",
}


def case_id_of(patient_folder: Path) -> str:
    return "sts_" + patient_folder.name.removeprefix("STS_")


def select_patients(source_folder, case_ids=None, max_cases=None) -> list:
    """The patient folders to convert, in name order: only those of ``case_ids`` (``sts_004`` or ``STS_004``;
    default all), then the first ``max_cases`` (default all)."""
    source_folder = Path(source_folder)
    if not source_folder.is_dir():
        raise NnsynthError(f"{source_folder}: not a folder: point at the sts_ct_3d folder")
    patients = sorted(p for p in source_folder.glob("STS_*") if p.is_dir())
    if not patients:
        raise NnsynthError(f"{source_folder}: no STS_xxx folders: point at the sts_ct_3d folder")
    if case_ids is not None:
        wanted = {case_id.lower() for case_id in case_ids}
        known = {case_id_of(patient) for patient in patients}
        unknown = sorted(wanted - known)
        if unknown:
            raise NnsynthError(f"{source_folder}: no case {', '.join(unknown)}: pick from {', '.join(sorted(known))}")
        patients = [patient for patient in patients if case_id_of(patient) in wanted]
    if max_cases is not None:
        if max_cases < 1:
            raise NnsynthError(f"--max-cases {max_cases}: must be at least 1")
        patients = patients[:max_cases]
    return patients


def _header(path: Path) -> sitk.ImageFileReader:
    if not path.is_file():
        raise NnsynthError(f"{path} is missing: each STS_xxx folder needs {IMAGE_NAME} and {MASK_NAME}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise NnsynthError(f"{path}: not a readable NIfTI file: restore it from the source data") from None
    if reader.GetDimension() != 3:
        raise NnsynthError(f"{path}: {reader.GetDimension()}D image: expected a 3D volume")
    return reader


def _numbers(values) -> str:
    return "(" + ", ".join(f"{value:g}" for value in values) + ")"


def check_patient(patient: Path):
    """Refuse a patient whose files are missing, unreadable, on different grids, or whose mask holds other values
    than 0 and 1 (reads the mask, not the image)."""
    image, mask = _header(patient / IMAGE_NAME), _header(patient / MASK_NAME)
    for name in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        image_value, mask_value = getattr(image, name)(), getattr(mask, name)()
        if not np.allclose(image_value, mask_value, rtol=0, atol=1e-4):
            what = name.removeprefix("Get").lower()
            raise NnsynthError(f"{patient / MASK_NAME}: {what} {_numbers(mask_value)} differs from {IMAGE_NAME}'s "
                               f"{_numbers(image_value)}: the mask must share the CT's grid")
    values = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(patient / MASK_NAME))))
    if not set(values.tolist()) <= {0, 1}:
        raise NnsynthError(f"{patient / MASK_NAME}: values {values.tolist()}: the mask must hold 0 (background) and "
                           f"1 (tumour) only")


def shrink(image: sitk.Image, mask: sitk.Image, downsample: int):
    """(CT, tumour mask) averaged over blocks of ``downsample`` x ``downsample`` voxels in-plane."""
    if downsample == 1:
        return image, sitk.Cast(mask > 0, sitk.sitkUInt8)
    factors = [downsample, downsample, 1]
    fraction = sitk.BinShrink(sitk.Cast(mask > 0, sitk.sitkFloat32), factors)
    return sitk.BinShrink(image, factors), sitk.Cast(fraction >= 0.5, sitk.sitkUInt8)


def _write(image: sitk.Image, path: Path):
    """Write atomically, the file read back before it takes its name (``write_volume``)."""
    write_volume(sitk.GetArrayFromImage(image), path, image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def convert_sts_ct(source_folder, raw_root, dataset_id: int = 508, name: str = "STSCT", case_ids=None,
                   max_cases=None, downsample: int = 1, overwrite=False) -> Path:
    """Write ``Dataset<id>_<name>`` under ``raw_root``; return the dataset folder. The source is only read. An
    existing dataset with that id is refused unless ``overwrite`` (then replaced as a whole: dataset_target.py)."""
    if downsample < 1:
        raise NnsynthError(f"--downsample {downsample}: must be at least 1")
    check_target(raw_root, dataset_id, name, overwrite)
    patients = select_patients(source_folder, case_ids, max_cases)
    for patient in patients:
        check_patient(patient)
    with converted_dataset(raw_root, dataset_id, name, overwrite) as (temporary, folder):
        for patient in patients:
            case_id = case_id_of(patient)
            image, mask = shrink(sitk.ReadImage(str(patient / IMAGE_NAME)), sitk.ReadImage(str(patient / MASK_NAME)),
                                 downsample)
            _write(image, temporary / "imagesTr" / f"{case_id}_0000.nii.gz")
            _write(mask, temporary / "labelsTr" / f"{case_id}.nii.gz")
        in_plane = f", {downsample}x{downsample} in-plane blocks averaged" if downsample > 1 else ""
        write_dataset_json_atomic(temporary, channel_names={0: "CT"}, labels=LABELS,
                                  num_training_cases=len(patients), file_ending=".nii.gz", dataset_name=folder.name,
                                  converted_by=f"nnunet-synth convert_sts_ct{in_plane}", **STS_ABOUT)
    return folder


def tumour_voxel_counts(folder) -> dict:
    """Tumour voxels per case of a converted dataset (for reports and tests)."""
    return {path.name.removesuffix(".nii.gz"): int(np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))))
            for path in sorted(Path(folder, "labelsTr").glob("*.nii.gz"))}


@command_entry_point
def main(argv=None):
    parser = CommandParser(description="Convert the soft-tissue sarcoma CT volumes (HU, tumour masks) into "
                                                 "an nnU-Net raw dataset (one channel CT, labels background / tumour)")
    parser.add_argument("source_folder", help="folder with STS_xxx/{CT,GTV}.nii.gz")
    add_output_arguments(parser, 508, "STSCT")
    parser.add_argument("--cases", nargs="+", metavar="CASE_ID",
                        help="convert only these patients (sts_004 or STS_004; default: all)")
    parser.add_argument("--max-cases", type=int, metavar="N", help="convert the first N patients (default: all)")
    parser.add_argument("--downsample", type=int, default=1,
                        help="average blocks of N x N voxels in-plane, slices kept (default 1)")
    args = parser.parse_args(argv)
    folder = convert_sts_ct(args.source_folder, output_root_from_args(args), args.dataset_id, args.dataset_name,
                            args.cases, args.max_cases, args.downsample, overwrite=args.overwrite)
    print(f"tumour voxels per case: {tumour_voxel_counts(folder)}")
    print_summary(folder)


if __name__ == "__main__":
    main()
