"""Figure of run_experiment.sh: one synthetic MS volume made three ways from the same label map, FLAIR, zoomed on
its edited region. Top: the axial slice with the most new lesion voxels (the plane the generator draws); bottom:
a coronal reformat through the same region, where slices drawn without their neighbours would show as stripes.
Orange contour: the new lesions of the label map.

    python make_figure.py ALIGNED_ID PER_SLICE_ID COPY_PASTE_ID -o figure.png   (run_experiment.sh)
"""
import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from nnunet_synth.dataset import RawDataset  # noqa: E402
from nnunet_synth.writer.synthetic_store import SyntheticStore  # noqa: E402

HALF = 24           # half side of the zoomed window, voxels


def synthetic_volume(dataset_id: str, case_id: str):
    dataset = RawDataset.from_name(dataset_id)
    store = SyntheticStore(dataset)
    reader = dataset.reader_writer()
    image = reader.read_images([str(path) for path in store.image_files(case_id)])[0]
    label = reader.read_seg(str(store.label_file(case_id)))[0][0]
    return dataset, store.cases[case_id]["source"]["target"]["case_id"], image, label


def store_sampler(dataset_id: str) -> str:
    settings = SyntheticStore(RawDataset.from_name(dataset_id)).manifest["folds"]["0"]["settings"]
    return f"{settings['sampler']} {settings['num_inference_steps']} steps"


def zoom(plane: np.ndarray, centre) -> np.ndarray:
    padded = np.pad(plane, HALF, mode="constant")
    row, col = int(centre[0]) + HALF, int(centre[1]) + HALF
    return padded[row - HALF:row + HALF, col - HALF:col + HALF]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("aligned")
    parser.add_argument("per_slice")
    parser.add_argument("copy_paste")
    parser.add_argument("--case", default="synth_f0_00000")
    parser.add_argument("-o", "--output", default="figure.png")
    args = parser.parse_args()
    dataset, target_id, aligned, label = synthetic_volume(args.aligned, args.case)
    _, _, per_slice, _ = synthetic_volume(args.per_slice, args.case)
    _, _, pasted, pasted_label = synthetic_volume(args.copy_paste, args.case)
    real, real_label, _ = dataset.read_case(target_id)
    assert np.array_equal(label, pasted_label), "the three volumes must share their label map"
    new = label != real_label
    parts, count = ndimage.label(new)
    largest = 1 + int(np.argmax(ndimage.sum_labels(new, parts, range(1, count + 1))))
    z, y, x = (int(round(c)) for c in ndimage.center_of_mass(parts == largest))
    z = int(np.argmax((parts == largest).reshape(len(new), -1).sum(axis=1)))
    flair = [real[0], pasted[0], aligned[0], per_slice[0]]
    brain = real[0][real[0] > 0]
    low, high = np.percentile(brain, [0.5, 99.5])
    titles = ["real target", "copy-paste", "inpaint, aligned noise", "inpaint, per-slice noise"]
    figure, axes = plt.subplots(2, 4, figsize=(10, 5.4))
    for column, (volume, title) in enumerate(zip(flair, titles)):
        for row, (plane, mask, centre, name) in enumerate(((volume[z], new[z], (y, x), f"axial z={z}"),
                                                          (volume[:, y], new[:, y], (z, x), f"coronal y={y}"))):
            axis = axes[row, column]
            axis.imshow(zoom(plane, centre), cmap="gray", vmin=low, vmax=high, origin="lower" if row else "upper")
            if column:
                axis.contour(zoom(mask.astype(float), centre), levels=[0.5], colors="orange", linewidths=0.7,
                             origin="lower" if row else "upper")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(title, fontsize=9)
            if column == 0:
                axis.set_ylabel(name, fontsize=9)
    sampler = store_sampler(args.aligned)
    figure.suptitle(f"one MS volume, one label map ({args.case}, target {target_id}); inpaint: {sampler}; FLAIR; "
                    f"orange: new lesions", fontsize=9)
    figure.tight_layout()
    figure.savefig(args.output, dpi=100)
    print(f"figure: {args.output}")


if __name__ == "__main__":
    main()
