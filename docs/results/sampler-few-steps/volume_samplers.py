"""One synthetic MS volume per sampler (the same label map in each store): the speckle of its edit region beside the
real target's on the same voxels (``evaluation.lesion_fidelity.speckle_fraction`` per edited slice, model space),
and a figure, FLAIR zoomed on the largest new lesion, axial and coronal, one column per store.

    python volume_samplers.py ID [ID ...] -o figure.png --table volumes.md
"""
import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from nnunet_synth.dataset import ImageWindows  # noqa: E402
from nnunet_synth.evaluation.lesion_fidelity import speckle_fraction  # noqa: E402
from nnunet_synth.generator.checkpoints import read_generator_config, resolve_generator_folder  # noqa: E402
from nnunet_synth.writer.synthetic_store import SyntheticStore  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ms-inpaint-volumes"))
from make_figure import synthetic_volume, zoom  # noqa: E402


def volume_speckle(image, edit, window) -> float:
    """Speckle share of the edit voxels, slice by slice in model space, weighted by each slice's edit voxels."""
    pixels = [(speckle_fraction(window.to_model(image[:, z]), edit[z]), edit[z].sum()) for z in range(len(edit))
              if edit[z].any()]
    return float(sum(f * n for f, n in pixels) / max(1, sum(n for _, n in pixels)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("ids", nargs="+")
    parser.add_argument("--case", default="synth_f0_00000")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--table", required=True)
    args = parser.parse_args()
    columns = []
    lines = ["| store | sampler | edit voxels | speckle % | real target's speckle % |", "|---|---|---|---|---|"]
    for dataset_id in args.ids:
        dataset, target_id, image, label = synthetic_volume(dataset_id, args.case)
        store = SyntheticStore(dataset)
        settings = store.manifest["folds"]["0"]["settings"]
        config = read_generator_config(resolve_generator_folder(settings["generator"]))
        window = ImageWindows.from_dict(config.window)
        real, real_label, _ = dataset.read_case(target_id)
        edit = image != real
        edit = edit.any(axis=0)
        name = f"{settings['sampler']} {settings['num_inference_steps']}"
        drawn, original = volume_speckle(image, edit, window), volume_speckle(real, edit, window)
        lines.append(f"| {dataset.name} | {name} | {int(edit.sum())} | {100 * drawn:.2f} | {100 * original:.2f} |")
        columns.append((name, image, label, real, real_label))
    name, _, label, real, real_label = columns[0]
    new = label != real_label
    parts, count = ndimage.label(new)
    largest = 1 + int(np.argmax(ndimage.sum_labels(new, parts, range(1, count + 1))))
    z, y, x = (int(round(c)) for c in ndimage.center_of_mass(parts == largest))
    z = int(np.argmax((parts == largest).reshape(len(new), -1).sum(axis=1)))
    low, high = np.percentile(real[0][real[0] > 0], [0.5, 99.5])
    shown = [("real target", real)] + [(c[0], c[1]) for c in columns]
    figure, axes = plt.subplots(2, len(shown), figsize=(2.5 * len(shown), 5.4), squeeze=False)
    for column, (title, volume) in enumerate(shown):
        for row, (plane, mask, centre) in enumerate(((volume[0][z], new[z], (y, x)),
                                                     (volume[0][:, y], new[:, y], (z, x)))):
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
                axis.set_ylabel(f"axial z={z}" if row == 0 else f"coronal y={y}", fontsize=9)
    figure.suptitle(f"one MS volume, one label map ({args.case}); FLAIR; orange: new lesions", fontsize=9)
    figure.tight_layout()
    figure.savefig(args.output, dpi=100)
    Path(args.table).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
