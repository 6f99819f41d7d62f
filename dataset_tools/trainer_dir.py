"""nnsynth_trainer_dir: print the directory to put in nnU-Net's ``nnUNet_extTrainer``.

    export nnUNet_extTrainer=$(nnsynth_trainer_dir)
    nnUNetv2_train DatasetXXX 2d 0 -tr nnUNetTrainerSynthMix_r25

nnU-Net (>= 2.8) looks up a trainer name in its own package first and then in each directory of
``nnUNet_extTrainer`` (os.pathsep-separated), for training, ``--c``, ``--val`` and ``nnUNetv2_predict`` alike.
"""
import os

from nnunet_synth.errors import CommandParser, command_entry_point
from nnunet_synth.trainers.discovery import ext_trainer_value, trainer_directory


@command_entry_point
def main(argv=None):
    parser = CommandParser(
        prog="nnsynth_trainer_dir",
        description="Print the directory that makes the nnunet-synth trainers visible to nnU-Net: "
                    "export nnUNet_extTrainer=$(nnsynth_trainer_dir)")
    parser.add_argument("--append", action="store_true",
                        help="print the current $nnUNet_extTrainer with this directory appended (keeps other "
                             "external trainer directories): export nnUNet_extTrainer=$(nnsynth_trainer_dir --append)")
    args = parser.parse_args(argv)
    print(ext_trainer_value(os.environ.get("nnUNet_extTrainer")) if args.append else trainer_directory())


if __name__ == "__main__":
    main()
