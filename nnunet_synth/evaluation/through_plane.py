"""Through-plane consistency of whole synthetic volumes: do the edited regions change from slice to slice as real
lesions do?

The figure, per image channel: the mean absolute difference between a voxel and its neighbour in the next slice,
over the pairs of neighbours (along the slice axis) that both lie inside a region. On the written synthetic
volumes the region is the edited voxels (where the label differs from the target's: the new lesion voxels, pasted or
inpainted); on
the real volumes of the fold's training cases it is their real lesion voxels (the pathology classes of the fold's
label-map report). A process that fills each slice without its neighbours raises the synthetic figure above the
real one; 3D components moved as a block keep it close.

    python -m nnunet_synth.evaluation.through_plane Dataset515_MSLesionsSmall --fold 0
"""
import argparse

import numpy as np

from nnunet_synth.dataset import RawDataset
from nnunet_synth.errors import NnsynthError, command_entry_point
from nnunet_synth.provenance import GENERATOR_TRAINING_CASES
from nnunet_synth.writer.synthetic_store import SyntheticStore


def adjacent_slice_difference(image: np.ndarray, region: np.ndarray):
    """(sum of |image[z + 1] - image[z]|, number of pairs) over the neighbours along axis 0 that are both in
    ``region``; ``image`` and ``region`` are (D, H, W)."""
    image = np.asarray(image, dtype=np.float64)
    both = region[1:] & region[:-1]
    return float(np.abs(image[1:] - image[:-1])[both].sum()), int(both.sum())


class _Accumulator:
    def __init__(self, num_channels: int):
        self.sums, self.pairs = np.zeros(num_channels), 0

    def add(self, image: np.ndarray, region: np.ndarray):
        for channel, channel_image in enumerate(image):
            total, pairs = adjacent_slice_difference(channel_image, region)
            self.sums[channel] += total
        self.pairs += pairs

    def means(self):
        return [float(s / self.pairs) if self.pairs else None for s in self.sums]


def through_plane_consistency(dataset: RawDataset, fold="0") -> dict:
    """The figure on the synthetic volumes made for ``fold`` (edited voxels) and on the real lesions of the fold's
    training cases, per channel, with their ratio (synthetic / real; 1 = as consistent as real lesions)."""
    store = SyntheticStore(dataset)
    fold = str(fold)
    fold_record = store.manifest["folds"].get(fold, {})
    volumes = fold_record.get("settings", {}).get("unit") == "volume"      # copy-paste or inpaint volumes
    case_ids = store.complete_case_ids(fold) if volumes else []
    if not case_ids:
        raise NnsynthError(f"{store.manifest_file} holds no whole synthetic volumes of fold {fold}: run "
                           f"nnsynth_generate {dataset.name} --fold {fold} --image-source copy-paste (or inpaint) "
                           f"--unit volume")
    pathology = fold_record["label_map_report"]["pathology_classes"]
    reader = dataset.reader_writer()
    synthetic, real = _Accumulator(dataset.num_channels), _Accumulator(dataset.num_channels)
    for case_id in case_ids:
        image = reader.read_images([str(path) for path in store.image_files(case_id)])[0]
        label_map = reader.read_seg(str(store.label_file(case_id)))[0][0]
        _, target_map, _ = dataset.read_case(store.cases[case_id]["source"]["target"]["case_id"])
        synthetic.add(image, label_map != target_map)
    for case_id in fold_record[GENERATOR_TRAINING_CASES]:
        image, label_map, _ = dataset.read_case(case_id)
        real.add(image, np.isin(label_map, pathology))
    channels = []
    for name, synthetic_mean, real_mean in zip(dataset.channel_list, synthetic.means(), real.means()):
        ratio = synthetic_mean / real_mean if synthetic_mean is not None and real_mean else None
        channels.append({"channel": name, "synthetic_edited": synthetic_mean, "real_lesions": real_mean,
                         "ratio": ratio})
    return {"fold": fold, "synthetic_volumes": len(case_ids), "synthetic_pairs": synthetic.pairs,
            "real_volumes": len(fold_record[GENERATOR_TRAINING_CASES]), "real_pairs": real.pairs,
            "channels": channels}


def format_through_plane(report: dict) -> str:
    lines = [f"through-plane consistency, fold {report['fold']}: mean |difference| between adjacent slices inside "
             f"the region ({report['synthetic_volumes']} synthetic volumes, {report['synthetic_pairs']} edited "
             f"voxel pairs; {report['real_volumes']} real volumes, {report['real_pairs']} lesion voxel pairs)"]
    for entry in report["channels"]:
        figures = [f"{value:.4g}" if value is not None else "n/a"
                   for value in (entry["synthetic_edited"], entry["real_lesions"], entry["ratio"])]
        lines.append(f"  {entry['channel']:<10} synthetic edited {figures[0]:>10}   real lesions {figures[1]:>10}   "
                     f"ratio {figures[2]}")
    return "\n".join(lines)


@command_entry_point
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="dataset folder, name or id")
    parser.add_argument("-f", "--fold", default="0")
    args = parser.parse_args(argv)
    print(format_through_plane(through_plane_consistency(RawDataset.from_name(args.dataset), args.fold)))


if __name__ == "__main__":
    main()
