"""Remove the synthetic cases of a dataset (imagesSynth/, labelsSynth/, synthetic.json and the preview).
Real files are never touched."""
import argparse

from nnunet_synth.dataset import RawDataset
from nnunet_synth.errors import command_entry_point
from nnunet_synth.writer import SyntheticStore
from nnunet_synth.writer.synthetic_store import PREVIEW_NAME


@command_entry_point
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", help="dataset folder, name or id")
    args = parser.parse_args(argv)
    dataset = RawDataset.from_name(args.dataset)
    removed = SyntheticStore(dataset).remove_all()
    (dataset.folder / PREVIEW_NAME).unlink(missing_ok=True)
    print(f"removed {removed} synthetic cases from {dataset.folder}")


if __name__ == "__main__":
    main()
