"""Remove the synthetic cases of a dataset (imagesSynth/, labelsSynth/, synthetic.json and the previews), or
only those made for one fold (--fold). Real files are never touched."""

from nnunet_synth.dataset import RawDataset
from nnunet_synth.dataset.splits import fold_training_cases
from nnunet_synth.dataset.validation import check_writable
from nnunet_synth.errors import CommandParser, command_entry_point
from nnunet_synth.writer import SyntheticStore


@command_entry_point
def main(argv=None):
    parser = CommandParser(description=__doc__)
    parser.add_argument("dataset", help="dataset folder, name or id")
    parser.add_argument("-f", "--fold", help="remove only the cases made for this fold (0-4 or all)")
    args = parser.parse_args(argv)
    dataset = RawDataset.from_name(args.dataset)
    store = SyntheticStore(dataset)
    if args.fold is not None and not any(str(entry.get("fold")) == args.fold for entry in store.cases.values()):
        fold_training_cases(dataset, args.fold)       # a fold without cases must at least exist
    check_writable(dataset.folder, "(remove) synthetic cases")
    with store.exclusive_writer():
        removed = store.remove_all() if args.fold is None else store.remove_fold(args.fold)
    which = "" if args.fold is None else f" of fold {args.fold}"
    print(f"removed {removed} synthetic cases{which} from {dataset.folder}")


if __name__ == "__main__":
    main()
