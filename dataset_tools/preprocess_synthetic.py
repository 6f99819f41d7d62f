"""nnsynth_preprocess_synthetic: preprocess the synthetic cases of a dataset with its own nnU-Net plans.

    nnsynth_preprocess_synthetic DatasetXXX -c 2d [-p nnUNetPlans]

Writes the synthetic pool ``$nnUNet_preprocessed/<Dataset>/<data_identifier>_synth/`` beside nnU-Net's real
preprocessed folder (never into it), so plans, fingerprint and splits stay those of a real-only run. Only
cases that are new or changed since the last run are preprocessed; a changed preprocessing part of the plans
rebuilds the pool. nnUNetTrainerSynthMix does the same automatically when training starts, so running this
command is optional (useful to pay the cost once before starting several folds).
"""
import argparse

from nnunet_synth.dataset.raw_dataset import resolve_dataset_folder
from nnunet_synth.errors import CommandParser, command_entry_point
from nnunet_synth.trainers.synthetic_pool import update_pool_for_preprocessed_dataset


@command_entry_point
def main(argv=None):
    parser = CommandParser(prog="nnsynth_preprocess_synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="dataset name (Dataset501_Covid19Lung), short name or id")
    parser.add_argument("-c", "--configuration", default="2d", help="nnU-Net configuration (default: 2d)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    args = parser.parse_args(argv)
    dataset_name = resolve_dataset_folder(args.dataset).name
    report = update_pool_for_preprocessed_dataset(dataset_name, args.configuration, args.plans)
    print(report.summary())


if __name__ == "__main__":
    main()
