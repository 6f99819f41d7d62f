"""The main job on the embedded example: convert the shipped COVID-19 subset into an nnU-Net raw dataset
inside a demo folder (its own nnUNet_raw / nnUNet_preprocessed / nnUNet_results) and summarise it."""
import argparse
import os
from pathlib import Path

from nnunet_synth.dataset_tools.check_dataset import print_summary
from nnunet_synth.dataset_tools.convert_covid19_ct_slices import convert_covid19_ct_slices
from nnunet_synth.errors import command_entry_point
from nnunet_synth.example import example_source_folder

DEMO_DATASET_ID = 990
DEMO_DATASET_NAME = "Covid19Example"


def prepare_demo_environment(work_folder: Path) -> dict:
    """Point nnU-Net's three folders into ``work_folder`` (this process and its children)."""
    folders = {name: work_folder / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder)
    return folders


@command_entry_point
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-o", "--work-folder", default="nnsynth_demo", help="where the demo writes everything")
    parser.add_argument("--stop-after", choices=["convert"], default=None,
                        help="end the demo after this step")
    args = parser.parse_args(argv)
    work_folder = Path(args.work_folder).resolve()
    folders = prepare_demo_environment(work_folder)
    dataset_folder = convert_covid19_ct_slices(example_source_folder(), folders["nnUNet_raw"],
                                               DEMO_DATASET_ID, DEMO_DATASET_NAME)
    print_summary(dataset_folder)
    print(f"demo dataset written to {dataset_folder}")


if __name__ == "__main__":
    main()
