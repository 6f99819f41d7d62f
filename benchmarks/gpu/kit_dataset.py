"""The GPU kit's dataset: Dataset501_Covid19Lung (all real COVID-19 CT slices) resampled to 128 x 128.

    python benchmarks/gpu/kit_dataset.py ../shared/data/covid19_ct_slices .gpu_kit/nnUNet_raw [--size 128]

Converts with the project's own command (``nnsynth_convert_covid19``) into a temporary folder, then resizes every
slice in-plane (images: linear, uint8 kept; labels: nearest) and writes ``Dataset501_Covid19Lung`` with the
same cases and labels under the output folder. The spacing stays the source's (unknown, 1.0): a larger in-plane
than through-plane spacing would make nnU-Net's 2d configuration slice the volumes along another axis.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from skimage.transform import resize

from nnunet_synth.dataset.writing import write_volume

DATASET_NAME = "Dataset501_Covid19Lung"


def resize_volume(array: np.ndarray, size: int, order: int) -> np.ndarray:
    """(Z, Y, X) -> (Z, size, size); order 1 for images, 0 for label maps (values kept)."""
    resized = resize(array, (array.shape[0], size, size), order=order, preserve_range=True, anti_aliasing=order > 0,
                     mode="edge")
    return np.rint(resized).astype(array.dtype)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source_folder", help="the COVID-19 CT slices (cases.csv, ct/, lungs/, covid/)")
    parser.add_argument("output_root", help="nnUNet_raw folder that receives " + DATASET_NAME)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--max-cases", type=int, help="only the first N cases (for the CPU rehearsal)")
    parser.add_argument("--slice-step", type=int, default=1, help="keep every K-th slice of each case (size)")
    args = parser.parse_args(argv)

    output = Path(args.output_root) / DATASET_NAME
    if (output / "dataset.json").is_file():
        print(f"{output} exists: kept")
        return
    convert = Path(sys.executable).parent / "nnsynth_convert_covid19"
    with tempfile.TemporaryDirectory() as workdir:
        subprocess.run([str(convert), args.source_folder, "-o", workdir], check=True, stdout=subprocess.DEVNULL)
        source = Path(workdir) / DATASET_NAME
        dataset_json = json.loads((source / "dataset.json").read_text())
        cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (source / "imagesTr").glob("*_0000.nii.gz"))
        if args.max_cases:
            cases = cases[:args.max_cases]
        temp_output = Path(workdir) / "resized" / DATASET_NAME
        for case in cases:
            image = sitk.ReadImage(str(source / "imagesTr" / f"{case}_0000.nii.gz"))
            label = sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz"))
            image_array = sitk.GetArrayFromImage(image)[::args.slice_step]
            label_array = sitk.GetArrayFromImage(label)[::args.slice_step]
            spacing = image.GetSpacing()
            write_volume(resize_volume(image_array, args.size, 1), temp_output / "imagesTr" / f"{case}_0000.nii.gz",
                         spacing)
            write_volume(resize_volume(label_array, args.size, 0), temp_output / "labelsTr" / f"{case}.nii.gz",
                         spacing)
        dataset_json["numTraining"] = len(cases)
        dataset_json["description"] += (f"; resized in-plane to {args.size} x {args.size}"
                                        + (f", every {args.slice_step}th slice" if args.slice_step > 1 else "")
                                        + " for the GPU kit")
        (temp_output / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(output, ignore_errors=True)
        shutil.move(str(temp_output), str(output))  # dataset.json inside: the folder counts only once complete
    print(f"{output}: {len(cases)} cases at {args.size} x {args.size}")


if __name__ == "__main__":
    main()
