"""MS lesion MRI (patientNN/{FLAIR,T1,T1POST,T2,lesions}.nii.gz) -> nnU-Net raw dataset with four channels.

Labels: 0 background (brain and outside), 1 lesion (white-matter lesion). Volumes keep their geometry (1 mm,
MNI space); ``downsample`` > 1 averages blocks of that many voxels per axis (SimpleITK's ``BinShrink``; the label
is the block's lesion fraction >= 0.5), so image and label keep identical geometry. Three patients are too few
for nnU-Net's default 5-fold split: a ``splits_final.json`` with one fold per patient (that patient held out)
is written into ``$nnUNet_preprocessed/<dataset>/`` unless one exists there.
"""
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_synth.atomic import atomic_path
from nnunet_synth.dataset.writing import write_dataset_json_atomic
from nnunet_synth.dataset_tools.check_dataset import print_summary
from nnunet_synth.dataset_tools.convert_covid19_ct_slices import add_output_arguments, output_root_from_args
from nnunet_synth.dataset_tools.dataset_target import converted_dataset
from nnunet_synth.errors import CommandParser, NnsynthError, command_entry_point
from nnunet_synth.nnunet_paths import nnunet_folder

CHANNELS = ("FLAIR", "T1", "T1POST", "T2")
LABELS = {"background": 0, "lesion": 1}


def _read(path: Path) -> sitk.Image:
    if not path.is_file():
        raise NnsynthError(f"{path} is missing: each patient folder needs {', '.join(CHANNELS)} and lesions .nii.gz")
    return sitk.ReadImage(str(path))


def _write(image: sitk.Image, path: Path):
    with atomic_path(path) as temp_name:
        sitk.WriteImage(image, temp_name, True)


def convert_ms_lesions(source_folder, raw_root, dataset_id: int = 505, name: str = "MSLesions", downsample: int = 1,
                       preprocessed_root=None, overwrite=False) -> Path:
    """Write ``Dataset<id>_<name>`` under ``raw_root`` (and its splits file); return the dataset folder. An
    existing dataset with that id is refused unless ``overwrite`` (then replaced as a whole: dataset_target.py)."""
    source_folder = Path(source_folder)
    patients = sorted(p for p in source_folder.glob("patient*") if p.is_dir())
    if not patients:
        raise NnsynthError(f"{source_folder}: no patientNN folders: point at the ms_lesions_3d folder")
    if downsample < 1:
        raise NnsynthError(f"downsample={downsample}: must be at least 1")
    case_ids = []
    with converted_dataset(raw_root, dataset_id, name, overwrite) as (staging, folder):
        for patient in patients:
            case_id = f"ms_{patient.name.removeprefix('patient')}"
            for channel, channel_name in enumerate(CHANNELS):
                image = sitk.Cast(_read(patient / f"{channel_name}.nii.gz"), sitk.sitkFloat32)
                if downsample > 1:
                    image = sitk.BinShrink(image, [downsample] * 3)
                _write(image, staging / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz")
            label = _read(patient / "lesions.nii.gz")
            if downsample > 1:
                fraction = sitk.BinShrink(sitk.Cast(label > 0, sitk.sitkFloat32), [downsample] * 3)
                label = sitk.Cast(fraction >= 0.5, sitk.sitkUInt8)
            else:
                label = sitk.Cast(label > 0, sitk.sitkUInt8)
            _write(label, staging / "labelsTr" / f"{case_id}.nii.gz")
            case_ids.append(case_id)
        write_dataset_json_atomic(staging, channel_names={i: c for i, c in enumerate(CHANNELS)}, labels=LABELS,
                                  num_training_cases=len(case_ids), file_ending=".nii.gz", dataset_name=folder.name,
                                  reference="Lesjak et al., Neuroinformatics 2017 (CC BY)")
    preprocessed_root = preprocessed_root or nnunet_folder("nnUNet_preprocessed")
    if preprocessed_root:
        splits_file = Path(preprocessed_root) / folder.name / "splits_final.json"
        if not splits_file.is_file():
            splits = [{"train": [c for c in case_ids if c != held_out], "val": [held_out]} for held_out in case_ids]
            splits_file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(splits_file) as temp_name, open(temp_name, "w") as handle:
                json.dump(splits, handle, indent=2)
    return folder


def lesion_voxel_counts(folder) -> dict:
    """Lesion voxels per case of a converted dataset (for reports and tests)."""
    return {path.name.removesuffix(".nii.gz"): int(np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))))
            for path in sorted(Path(folder, "labelsTr").glob("*.nii.gz"))}


@command_entry_point
def main(argv=None):
    parser = CommandParser(description="Convert the MS lesion MRI volumes into an nnU-Net raw dataset "
                                                 "(4 channels, one fold per patient in splits_final.json)")
    parser.add_argument("source_folder", help="folder with patientNN/{FLAIR,T1,T1POST,T2,lesions}.nii.gz")
    add_output_arguments(parser, 505, "MSLesions")
    parser.add_argument("--downsample", type=int, default=1, help="average blocks of N voxels per axis (default 1)")
    args = parser.parse_args(argv)
    folder = convert_ms_lesions(args.source_folder, output_root_from_args(args), args.dataset_id, args.dataset_name,
                                args.downsample, overwrite=args.overwrite)
    print(f"lesion voxels per case: {lesion_voxel_counts(folder)}")
    print_summary(folder)


if __name__ == "__main__":
    main()
