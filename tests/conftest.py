"""Shared fixtures: the real data in ../shared/data, converted once per test session into a private
nnUNet_raw / nnUNet_preprocessed / nnUNet_results tree."""
import os
import sys
from pathlib import Path

import pytest

# the Dataset981 fixtures, registered here once for every module (a fixture imported into several test modules
# would be a separate session fixture in each, i.e. built once per module)
from synthetic_fixtures import planned_dataset, synthetic_example_dataset  # noqa: E402, F401

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
COVID_SOURCE = SHARED_DATA / "covid19_ct_slices"
REAL_HU_SOURCE = SHARED_DATA / "real_hu_ct"


def pytest_configure(config):
    if not COVID_SOURCE.is_dir() or not REAL_HU_SOURCE.is_dir():
        raise pytest.UsageError(f"the real test data is missing: expected {SHARED_DATA} beside the repository")
    # console scripts (ours and nnU-Net's) live beside the interpreter that runs the tests
    scripts_folder = os.path.dirname(sys.executable)
    if scripts_folder not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts_folder + os.pathsep + os.environ.get("PATH", "")
    # single-process nnU-Net on the 2-core CI machine
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("nnUNet_compile", "f")


@pytest.fixture(scope="session")
def nnunet_folders(tmp_path_factory):
    """A private nnU-Net folder tree, exported through the environment for this session."""
    root = tmp_path_factory.mktemp("nnunet")
    folders = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    previous = {name: os.environ.get(name) for name in folders}
    for name, folder in folders.items():
        folder.mkdir()
        os.environ[name] = str(folder)
    yield folders
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def covid_dataset_folder(nnunet_folders):
    """The full COVID-19 slice data converted to Dataset501_Covid19Lung (15 cases)."""
    from nnunet_synth.dataset_tools.convert_covid19_ct_slices import convert_covid19_ct_slices
    return convert_covid19_ct_slices(COVID_SOURCE, nnunet_folders["nnUNet_raw"])


@pytest.fixture(scope="session")
def real_hu_dataset_folder(nnunet_folders):
    """The real Hounsfield-unit CT converted to Dataset502_RealHUCT (5 cases of 6 slices)."""
    from nnunet_synth.dataset_tools.convert_real_hu_ct import convert_real_hu_ct
    return convert_real_hu_ct(REAL_HU_SOURCE, nnunet_folders["nnUNet_raw"])


@pytest.fixture(scope="session")
def example_dataset_folder(nnunet_folders):
    """The embedded example (5 patients, 37 slices) converted to Dataset990_Covid19Example."""
    from nnunet_synth.dataset_tools.convert_covid19_ct_slices import convert_covid19_ct_slices
    from nnunet_synth.example import example_source_folder
    return convert_covid19_ct_slices(example_source_folder(), nnunet_folders["nnUNet_raw"], 990, "Covid19Example")


@pytest.fixture(scope="session")
def covid_lesion_types_dataset_folder(nnunet_folders, covid_dataset_folder):
    """A 3-class 2D dataset without a host class, built from the real COVID slices: the lung label is merged
    into background and each lesion pixel is labelled by its density, like ground glass vs consolidation:
    1 ``ground_glass`` (5x5 mean grey value below the 75th percentile of all lesion pixels), 2 ``dense``
    (at or above it). Dataset503_Covid19LesionTypes, 15 cases."""
    import numpy as np
    from scipy import ndimage
    from nnunet_synth.dataset import RawDataset
    from nnunet_synth.dataset.writing import write_dataset_json_atomic, write_volume
    source = RawDataset(covid_dataset_folder)
    folder = nnunet_folders["nnUNet_raw"] / "Dataset503_Covid19LesionTypes"
    cases = {case_id: source.read_case(case_id)[:2] for case_id in source.case_ids}
    smoothed = {case_id: ndimage.uniform_filter(image[0], (1, 5, 5)) for case_id, (image, _) in cases.items()}
    threshold = np.percentile(np.concatenate([smoothed[c][label == 2] for c, (_, label) in cases.items()]), 75)
    for case_id, (image, label) in cases.items():
        lesion_types = np.zeros(label.shape, dtype=np.uint8)
        lesion_types[label == 2] = 1
        lesion_types[(label == 2) & (smoothed[case_id] >= threshold)] = 2
        write_volume(image[0].astype(np.uint8), folder / "imagesTr" / f"{case_id}_0000.nii.gz")
        write_volume(lesion_types, folder / "labelsTr" / f"{case_id}.nii.gz")
    write_dataset_json_atomic(folder, channel_names={0: "CT"}, labels={"background": 0, "ground_glass": 1, "dense": 2},
                              num_training_cases=len(cases), file_ending=".nii.gz", dataset_name=folder.name)
    return folder
