"""Peak memory and time of one whole synthetic CT volume of 512 x 512 x 300 voxels (copy-paste, unit "volume").

The real Hounsfield-unit CT of ``../shared/data/real_hu_ct`` (``example_ct_sm.nii.gz``, 30 x 101 x 122 voxels of
3 mm, with its TotalSegmentator labels remapped to liver, spleen, kidney and stomach) is resampled (linear for
the image, nearest for the labels) to 300 x 512 x 512 voxels and written as a two-case nnU-Net dataset in a
temporary folder (the second case is the first mirrored left-right). Then, in a fresh process,
``generate_copy_paste_cases`` makes one whole volume for fold "all" from scratch (the store of real slices, body masks,
balanced label maps, the paste, the quality score, the write, the preview). Printed: the time and the process's peak
RSS, and as baselines measured in the same process before it, the time of reading the case with nnU-Net's reader and the
size of its float32 image.

Target: peak RSS <= 4 GB.

    python benchmarks/volume_generation.py [--shape 300 512 512] [--json volume_generation.json]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REAL_HU = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_hu_ct"
DATASET_NAME = "Dataset970_VolumeBenchmark"
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "stomach": 4}
TOTALSEGMENTATOR_IDS = {1: (5,), 2: (1,), 3: (2, 3), 4: (6,)}     # as nnsynth_convert_real_hu maps them


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def resampled(image: sitk.Image, shape_zyx, interpolator) -> sitk.Image:
    """``image`` resampled onto a grid of ``shape_zyx`` voxels covering the same physical box."""
    size = [int(n) for n in reversed(shape_zyx)]
    spacing = [old_spacing * old_size / new_size
               for old_spacing, old_size, new_size in zip(image.GetSpacing(), image.GetSize(), size)]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), spacing,
                         image.GetDirection(), -1024 if interpolator == sitk.sitkLinear else 0, image.GetPixelID())


def build_dataset(raw_root: Path, shape_zyx) -> Path:
    """The two-case dataset of the resampled real CT (int16 HU, its labels as uint8)."""
    from nnunet_synth.dataset.writing import write_dataset_json_atomic
    image = sitk.ReadImage(str(REAL_HU / "example_ct_sm.nii.gz"))
    totalseg = sitk.GetArrayFromImage(sitk.ReadImage(str(REAL_HU / "example_seg.nii.gz")))
    labels = np.zeros(totalseg.shape, dtype=np.uint8)
    for value, source_ids in TOTALSEGMENTATOR_IDS.items():
        labels[np.isin(totalseg, source_ids)] = value
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    folder = raw_root / DATASET_NAME
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    image, label_image = resampled(image, shape_zyx, sitk.sitkLinear), resampled(label_image, shape_zyx,
                                                                                 sitk.sitkNearestNeighbor)
    # a second case, the first mirrored left-right: where a class may be pasted is learnt from more than one map
    for case_id, flip in (("hu_a", False), ("hu_b", True)):
        sitk.WriteImage(sitk.Flip(image, [flip, False, False]), str(folder / "imagesTr" / f"{case_id}_0000.nii.gz"),
                        True)
        sitk.WriteImage(sitk.Flip(label_image, [flip, False, False]), str(folder / "labelsTr" / f"{case_id}.nii.gz"),
                        True)
    write_dataset_json_atomic(folder, channel_names={0: "CT"}, labels=LABELS, num_training_cases=2,
                              file_ending=".nii.gz", dataset_name=DATASET_NAME)
    return folder


def child(folder: str) -> dict:
    """In this fresh process: the reading baseline, then one whole volume from scratch."""
    from nnunet_synth.dataset import RawDataset
    from nnunet_synth.image_sources import CopyPasteSettings, generate_copy_paste_cases
    dataset = RawDataset(folder)
    started = time.perf_counter()
    image, _, _ = dataset.read_case("hu_a")
    read_s = time.perf_counter() - started
    result = {"shape": list(image.shape[1:]), "image_float32_gib": image.nbytes / 1024 ** 3, "read_s": read_s,
              "peak_rss_after_read_gib": peak_rss_gib()}
    del image
    started = time.perf_counter()
    summary = generate_copy_paste_cases(dataset, CopyPasteSettings(num_cases=1, seed=0), fold="all")
    result.update(generate_s=time.perf_counter() - started, peak_rss_gib=peak_rss_gib(), written=summary["written"],
                  unit=summary["unit"], pasted_voxels=sum(
                      entry["source"]["pasted_pixels"] for entry in json.loads(
                          (Path(folder) / "synthetic.json").read_text())["cases"].values()))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return {}
    with tempfile.TemporaryDirectory(prefix="nnsynth_volume_benchmark_") as workdir:
        environment = dict(os.environ)
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            (Path(workdir) / name).mkdir()
            environment[name] = str(Path(workdir) / name)
        started = time.perf_counter()
        folder = build_dataset(Path(workdir) / "nnUNet_raw", args.shape)
        print(f"dataset of two {'x'.join(map(str, args.shape))} CT volumes built in "
              f"{time.perf_counter() - started:.0f} s")
        process = subprocess.run([sys.executable, __file__, "--child", str(folder)], env=environment,
                                 stdout=subprocess.PIPE, text=True, check=True)
        result = json.loads(process.stdout.strip().splitlines()[-1])
    print(f"one whole synthetic volume {'x'.join(map(str, result['shape']))} (copy-paste, unit {result['unit']}, "
          f"{result['pasted_voxels']} voxels pasted):")
    print(f"  time {result['generate_s']:.1f} s from scratch; reading the case with nnU-Net's reader "
          f"{result['read_s']:.1f} s (ratio {result['generate_s'] / result['read_s']:.1f}x)")
    print(f"  peak RSS {result['peak_rss_gib']:.2f} GiB (target <= 4 GB); the case's float32 image "
          f"{result['image_float32_gib']:.2f} GiB (ratio {result['peak_rss_gib'] / result['image_float32_gib']:.1f}x); "
          f"peak after reading it alone {result['peak_rss_after_read_gib']:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
