"""Real CT in Hounsfield units (TotalSegmentator test volume + anatomy labels) -> small 3D nnU-Net dataset.

The 30-slice volume is cut along z into cases of ``slices_per_case`` slices; a handful of TotalSegmentator
labels are remapped to consecutive values. A fast fixture for the Hounsfield-unit path.
"""
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_synth.dataset.writing import write_dataset_json_atomic, write_volume
from nnunet_synth.dataset_tools.convert_covid19_ct_slices import add_output_arguments, output_root_from_args
from nnunet_synth.dataset_tools.dataset_target import check_target, converted_dataset
from nnunet_synth.errors import CommandParser, NnsynthError, command_entry_point

# our label -> TotalSegmentator ids (1 spleen, 2/3 kidneys, 5 liver, 6 stomach; the same in TS v1 and v2)
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "stomach": 4}
TOTALSEGMENTATOR_IDS = {1: (5,), 2: (1,), 3: (2, 3), 4: (6,)}


def convert_real_hu_ct(source_folder, output_root, dataset_id=502, dataset_name="RealHUCT", slices_per_case=6,
                       image_name="example_ct_sm.nii.gz", label_name="example_seg.nii.gz", overwrite=False):
    """Write ``Dataset{id}_{name}`` under ``output_root``; return its folder. An existing dataset with that id is
    refused unless ``overwrite`` (then replaced as a whole: dataset_target.py)."""
    source_folder = Path(source_folder)
    check_target(output_root, dataset_id, dataset_name, overwrite)
    image_file, label_file = source_folder / image_name, source_folder / label_name
    for path in (image_file, label_file):
        if not path.is_file():
            raise NnsynthError(f"{path} is missing: pass the real_hu_ct folder that holds {image_name} and "
                               f"{label_name}")
    image = sitk.ReadImage(str(image_file))
    image_array = sitk.GetArrayFromImage(image)
    totalseg_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
    if image_array.shape != totalseg_labels.shape:
        raise NnsynthError(f"{label_file} has shape {totalseg_labels.shape} but {image_file} has {image_array.shape}")
    if not 1 <= slices_per_case <= image_array.shape[0]:
        raise NnsynthError(f"--slices-per-case {slices_per_case}: {image_file} has {image_array.shape[0]} slices: "
                           f"give a number of slices per case in 1 .. {image_array.shape[0]}")
    label_map = np.zeros(totalseg_labels.shape, dtype=np.uint8)
    for our_value, source_ids in TOTALSEGMENTATOR_IDS.items():
        label_map[np.isin(totalseg_labels, source_ids)] = our_value

    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    num_cases = image_array.shape[0] // slices_per_case
    with converted_dataset(output_root, dataset_id, dataset_name, overwrite) as (staging, dataset_folder):
        for case_index in range(num_cases):
            first = case_index * slices_per_case
            chunk = slice(first, first + slices_per_case)
            # origin of the chunk = origin of the volume moved ``first`` slices along the z direction
            origin = np.array(image.GetOrigin()) + direction @ np.array([0.0, 0.0, first * spacing[2]])
            case_id = "hu_%02d" % case_index
            geometry = dict(spacing_xyz=spacing, origin=origin, direction=image.GetDirection())
            write_volume(image_array[chunk], staging / "imagesTr" / f"{case_id}_0000.nii.gz", **geometry)
            write_volume(label_map[chunk], staging / "labelsTr" / f"{case_id}.nii.gz", **geometry)
        write_dataset_json_atomic(
            staging, channel_names={0: "CT"}, labels=LABELS, num_training_cases=num_cases,
            file_ending=".nii.gz", dataset_name=dataset_folder.name,
            description=f"TotalSegmentator test CT (HU) cut into {num_cases} cases of {slices_per_case} slices",
            reference="TotalSegmentator repository test files", license="Apache-2.0",
            converted_by="nnunet-synth convert_real_hu_ct")
    return dataset_folder


@command_entry_point
def main(argv=None):
    parser = CommandParser(description=__doc__)
    parser.add_argument("source_folder", help="folder with example_ct_sm.nii.gz and example_seg.nii.gz")
    add_output_arguments(parser, 502, "RealHUCT")
    parser.add_argument("--slices-per-case", type=int, default=6)
    args = parser.parse_args(argv)
    folder = convert_real_hu_ct(args.source_folder, output_root_from_args(args), args.dataset_id,
                                args.dataset_name, args.slices_per_case, overwrite=args.overwrite)
    from nnunet_synth.dataset_tools.check_dataset import print_summary
    print_summary(folder)


if __name__ == "__main__":
    main()
