"""COVID-19 CT slices (ct/, lungs/, covid/ PNGs + cases.csv) -> nnU-Net raw dataset, one 3D case per patient.

Labels: 0 background (outside the lungs), 1 lung (normal lung tissue), 2 lesion (infection, also where the
infection mask lies outside the lung mask). Intensities stay the source's 8-bit grey values (not HU).
"""
import csv
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
from skimage import io
from tqdm import tqdm

from nnunet_synth.dataset.raw_dataset import UNIT_KEY
from nnunet_synth.dataset.writing import write_dataset_json_atomic, write_volume
from nnunet_synth.dataset_tools.dataset_target import add_overwrite_argument, check_target, converted_dataset
from nnunet_synth.errors import CommandParser, NnsynthError, command_entry_point

LABELS = {"background": 0, "lung": 1, "lesion": 2}


def read_case_table(source_folder: Path) -> "OrderedDict[str, list]":
    """Map each case id to its slice files, in file order, from cases.csv."""
    table_file = source_folder / "cases.csv"
    if not table_file.is_file():
        raise NnsynthError(f"{table_file} is missing: the source folder must hold cases.csv, ct/, lungs/, covid/")
    cases = OrderedDict()
    with open(table_file, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"slice_file", "case_id"} <= set(reader.fieldnames):
            raise NnsynthError(f"{table_file} needs the columns slice_file,case_id")
        for row in reader:
            cases.setdefault(row["case_id"], []).append(row["slice_file"])
    for case_id in cases:
        cases[case_id].sort()
    return cases


def select_slices(source_folder: Path, case_ids=None, max_slices_per_case=None) -> "OrderedDict[str, list]":
    """Part of the case table of ``source_folder``: only ``case_ids`` (in the table's order; default all) and, per
    case, every k-th slice from its first, with k = ceil(slices / max_slices_per_case) (default: every slice)."""
    case_table = read_case_table(source_folder)
    if case_ids is not None:
        unknown = sorted(set(case_ids) - set(case_table))
        if unknown:
            raise NnsynthError(f"{source_folder / 'cases.csv'}: no case {', '.join(unknown)}: pick from "
                               f"{', '.join(case_table)}")
    if max_slices_per_case is not None and max_slices_per_case < 1:
        raise NnsynthError(f"the number of slices per case must be at least 1, got {max_slices_per_case}")
    selected = OrderedDict()
    for case_id, slice_files in case_table.items():
        if case_ids is None or case_id in case_ids:
            step = math.ceil(len(slice_files) / max_slices_per_case) if max_slices_per_case else 1
            selected[case_id] = slice_files[::step]
    return selected


def read_slice(source_folder: Path, slice_file: str):
    """Return (grey image uint8, label map uint8) of one slice."""
    arrays = {}
    for part in ("ct", "lungs", "covid"):
        path = source_folder / part / slice_file
        if not path.is_file():
            raise NnsynthError(f"{path} is missing: every slice in cases.csv needs ct/, lungs/ and covid/ files")
        arrays[part] = io.imread(path)
        if arrays[part].ndim != 2:
            raise NnsynthError(f"{path} is not a single-channel 2D image (shape {arrays[part].shape})")
    label_map = np.zeros(arrays["ct"].shape, dtype=np.uint8)
    label_map[arrays["lungs"] > 0] = LABELS["lung"]
    label_map[arrays["covid"] > 0] = LABELS["lesion"]
    return arrays["ct"].astype(np.uint8), label_map


COVID19_ABOUT = {
    "description": "COVID-19 CT slices (CLAHE 8-bit grey values, not HU), slices of a patient stacked in file "
                   "order; spacing unknown, set to 1.0",
    "reference": "Ma et al., Medical Physics 2021; resampled by dstaroff/COVID19-CT-Segmentation (MIT)",
    "license": "CC BY 4.0 (source dataset)",
}


def convert_covid19_ct_slices(source_folder, output_root, dataset_id=501, dataset_name="Covid19Lung", cases=None,
                              about=None, overwrite=False):
    """Write ``Dataset{id}_{name}`` under ``output_root``; return its folder. An existing dataset with that id is
    refused unless ``overwrite`` (then replaced as a whole: dataset_target.py).

    ``cases``: the case table to convert (default: all of cases.csv; see ``select_slices``). ``about``: the
    dataset.json description, reference and license (default: those of the COVID-19 CT slices).
    """
    source_folder = Path(source_folder)
    cases = read_case_table(source_folder) if cases is None else cases
    with converted_dataset(output_root, dataset_id, dataset_name, overwrite) as (staging, dataset_folder):
        for case_id, slice_files in tqdm(cases.items(), desc="converting COVID-19 slices", unit="case"):
            slices = [read_slice(source_folder, name) for name in slice_files]
            image = np.stack([s[0] for s in slices])
            label_map = np.stack([s[1] for s in slices])
            write_volume(image, staging / "imagesTr" / f"{case_id}_0000.nii.gz")
            write_volume(label_map, staging / "labelsTr" / f"{case_id}.nii.gz")
        write_dataset_json_atomic(
            staging, channel_names={0: "CT"}, labels=LABELS, num_training_cases=len(cases),
            file_ending=".nii.gz", dataset_name=dataset_folder.name,
            converted_by="nnunet-synth convert_covid19_ct_slices", **(COVID19_ABOUT if about is None else about),
            **{UNIT_KEY: "slice"})  # a case stacks a patient's slices, with gaps: copy-paste works slice by slice
    return dataset_folder


def add_output_arguments(parser, default_id, default_name):
    parser.add_argument("-o", "--output-root", default=None,
                        help="folder that receives the dataset (default: $nnUNet_raw)")
    parser.add_argument("-d", "--dataset-id", type=int, default=default_id)
    parser.add_argument("-n", "--dataset-name", default=default_name)
    add_overwrite_argument(parser)


def output_root_from_args(args) -> Path:
    from nnunet_synth.nnunet_paths import nnunet_folder
    root = args.output_root or nnunet_folder("nnUNet_raw")
    if not root:
        raise NnsynthError("no output folder: pass --output-root or export nnUNet_raw=/path/to/nnUNet_raw")
    return Path(root)


@command_entry_point
def main(argv=None):
    parser = CommandParser(description=__doc__)
    parser.add_argument("source_folder", help="folder with cases.csv, ct/, lungs/, covid/")
    add_output_arguments(parser, 501, "Covid19Lung")
    parser.add_argument("--cases", nargs="+", metavar="CASE_ID", help="convert only these cases (default: all)")
    parser.add_argument("--max-slices-per-case", type=int, metavar="N",
                        help="keep every k-th slice of a case, k chosen so that at most N remain (default: all)")
    args = parser.parse_args(argv)
    output_root = output_root_from_args(args)
    check_target(output_root, args.dataset_id, args.dataset_name, args.overwrite)
    cases = select_slices(Path(args.source_folder), args.cases, args.max_slices_per_case)
    folder = convert_covid19_ct_slices(args.source_folder, output_root, args.dataset_id, args.dataset_name, cases,
                                       overwrite=args.overwrite)
    from nnunet_synth.dataset_tools.check_dataset import print_summary
    print_summary(folder)


if __name__ == "__main__":
    main()
