"""Validate an nnU-Net raw dataset for nnunet-synth and print its summary (cases, slices, class shares, window)."""
import argparse

from nnunet_synth.dataset import RawDataset, class_pixel_frequencies, dataset_intensity_window
from nnunet_synth.errors import command_entry_point


def dataset_summary(dataset: RawDataset) -> dict:
    """Read every case (this validates them) and return counts, class pixel shares and the intensity window."""
    num_slices = sum(dataset.read_case(case_id)[0].shape[0] for case_id in dataset.case_ids)
    frequencies = class_pixel_frequencies(dataset)
    return {
        "dataset": dataset.name,
        "cases": len(dataset.case_ids),
        "slices": num_slices,
        "class_pixel_share": {name: float(f) for name, f in zip(dataset.class_names, frequencies)},
        "intensity_window": dataset_intensity_window(dataset).to_dict(),
    }


def print_summary(dataset_folder):
    summary = dataset_summary(RawDataset(dataset_folder))
    shares = ", ".join(f"{name} {100 * share:.1f} %" for name, share in summary["class_pixel_share"].items())
    window = summary["intensity_window"]
    print(f"{summary['dataset']} at {dataset_folder}: {summary['cases']} cases, {summary['slices']} slices; "
          f"class pixel shares: {shares}; intensity window [{window['lower']:g}, {window['upper']:g}] "
          f"({window['source']})")
    return summary


@command_entry_point
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", help="dataset folder, name (Dataset501_Covid19Lung), short name or id")
    args = parser.parse_args(argv)
    print_summary(RawDataset.from_name(args.dataset).folder)


if __name__ == "__main__":
    main()
