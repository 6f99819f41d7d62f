"""Validate an nnU-Net raw dataset for nnunet-synth and print its summary (cases, slices, class shares, window)
and, when it has synthetic cases, how many of them each nnU-Net fold may use."""

from nnunet_synth.dataset import RawDataset, class_pixel_frequencies, dataset_intensity_window
from nnunet_synth.dataset.splits import fold_validation_cases, real_crossval_split
from nnunet_synth.dataset.validation import scan_dataset
from nnunet_synth.errors import CommandParser, NnsynthError, command_entry_point
from nnunet_synth.provenance import select_for_fold
from nnunet_synth.writer.synthetic_store import SyntheticStore


def dataset_summary(dataset: RawDataset) -> dict:
    """Read every case (this validates them) and return counts, class pixel shares and the intensity window."""
    num_slices = sum(dataset.read_case(case_id)[1].shape[0] for case_id in dataset.case_ids)
    frequencies = class_pixel_frequencies(dataset)
    return {
        "dataset": dataset.name,
        "cases": len(dataset.case_ids),
        "slices": num_slices,
        "class_pixel_share": {name: float(f) for name, f in zip(dataset.class_names, frequencies)},
        "intensity_window": dataset_intensity_window(dataset).to_dict(),
    }


def check_fold_recipes(dataset: RawDataset):
    """Refuse a store where a fold's cases disagree with the fold's recorded recipe (two runs mixed in one fold)."""
    from nnunet_synth.writer.synthetic_store import recipe_differences
    store = SyntheticStore(dataset)
    for fold in sorted(store.manifest["folds"]):
        mismatched = store.recipe_mismatches(fold)
        if mismatched:
            recorded = store.manifest["folds"][fold].get("settings")
            changed = recipe_differences(recorded, store.cases[mismatched[0]]["recipe"])
            raise NnsynthError(f"{store.manifest_file}: {len(mismatched)} of fold {fold}'s "
                               f"{len(store.complete_case_ids(fold))} synthetic cases were made with other settings "
                               f"than the fold's recorded recipe ({', '.join(changed)}; e.g. {mismatched[0]}): remove "
                               f"them with nnsynth_clean {dataset.name} --fold {fold} and generate again")


def synthetic_usability(dataset: RawDataset) -> dict:
    """Per fold (0..n-1 of nnU-Net's split, and "all"): the synthetic cases it may use and those it may not."""
    store = SyntheticStore(dataset)
    case_ids = store.complete_case_ids()
    if not case_ids:
        return {}
    folds = [str(index) for index in range(len(real_crossval_split(dataset)[0]))] + ["all"]
    return {fold: select_for_fold(store.manifest, case_ids, fold, fold_validation_cases(dataset, fold)).counts()
            for fold in folds}


def print_summary(dataset_folder):
    dataset = RawDataset(dataset_folder)
    scan = scan_dataset(dataset)   # every case: truncation, NaN/Inf, geometry, labels, constant images
    check_fold_recipes(dataset)
    summary = dataset_summary(dataset)
    annotated = set(dataset.annotated_labels) - {0}
    summary["lesion_free_cases"] = sorted(case_id for case_id, values in scan.classes.items()
                                          if not annotated & set(values))
    shares = ", ".join(f"{name} {100 * share:.1f} %" for name, share in summary["class_pixel_share"].items())
    windows = "; ".join(f"{name} [{window['lower']:g}, {window['upper']:g}] ({window['source']})"
                        for name, window in zip(dataset.channel_list, summary["intensity_window"]))
    print(f"{summary['dataset']} at {dataset_folder}: {summary['cases']} cases, {summary['slices']} slices "
          f"({len(summary['lesion_free_cases'])} cases without any annotated class); "
          f"class pixel shares: {shares}; intensity window per channel: {windows}")
    summary["synthetic_cases_per_fold"] = synthetic_usability(dataset)
    for fold, counts in summary["synthetic_cases_per_fold"].items():
        dropped = counts["dropped_for_leakage"] + counts["not_made_for_fold_all"]
        print(f"fold {fold}: may use {counts['allowed']} synthetic cases, not {dropped} (they depend on its "
              f"validation cases or were made for other folds)")
    return summary


@command_entry_point
def main(argv=None):
    parser = CommandParser(description=__doc__)
    parser.add_argument("dataset", help="dataset folder, name (Dataset501_Covid19Lung), short name or id")
    args = parser.parse_args(argv)
    print_summary(RawDataset.from_name(args.dataset).folder)


if __name__ == "__main__":
    main()
