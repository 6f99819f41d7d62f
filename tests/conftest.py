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
MS_SOURCE = SHARED_DATA / "ms_lesions_3d"
STS_SOURCE = SHARED_DATA / "sts_ct_3d"
# The soft-tissue sarcoma CT of the tests: six patients with small crops (47-57 slices), tumours of 0.65-3.6 % of
# a volume, at half the in-plane resolution (about 70 x 70 x 50 voxels of 1.95 x 1.95 x 3.27 mm).
STS_CASES = ("STS_008", "STS_015", "STS_019", "STS_024", "STS_025", "STS_050")
# ... and one lesion-free case, as healthy scans are: the first 14 slices of STS_041's crop (its margin above the
# tumour, which starts at slice 16)
STS_HEALTHY, STS_HEALTHY_SLICES = "STS_041", 14
# The small real example of the tests: the five shortest patients of the COVID-19 slices, every k-th slice of a
# patient with k chosen so that at most 9 remain (every 2nd slice of case_10 and case_14, every 3rd of case_15,
# case_17 and case_18): 37 slices.
EXAMPLE_CASES = ("case_10", "case_14", "case_15", "case_17", "case_18")
EXAMPLE_MAX_SLICES_PER_CASE = 9


# The longest files, longest first (seconds each on the 2-core machine: `pytest -n 2 --durations=0`). With
# `-n 2 --dist loadfile` a worker takes the next file when it is free, in collection order; alphabetical order
# leaves the demo and the 3D volumes for the end, where one core waits on them while the other is idle.
LONGEST_FILES_FIRST = (
    "test_volumes.py",              # the 3D volumes: copy-paste, inpaint, 3d_fullres trainings and downstream
    "test_sts.py",                  # the sarcoma CT: copy-paste, inpaint, two 3d_fullres trainings
    "test_packaging.py",            # the demo's whole loop
    "test_gpu_kit.py",
    "test_five_folds.py",
    "test_baselines_and_repeats.py",
    "test_generate.py",
    "test_bad_input.py",
    "test_trainer_synthmix.py",
    "test_real_datasets.py",        # lesion-free cases, absent classes, any budget, label geometry: stock runs
    "test_resenc.py",               # the ResEnc M planning and two 2d trainings
    "test_any_dataset.py",
    "test_balancing_any_dataset.py",
    "test_evaluate.py",
    "test_benchmarks.py",
    "test_lesion_paste.py",
)


def pytest_collection_modifyitems(config, items):
    """Run the longest files first (a stable sort: the order inside a file, and of the other files, is kept)."""
    rank = {name: position for position, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_configure(config):
    if not all(source.is_dir() for source in (COVID_SOURCE, REAL_HU_SOURCE, MS_SOURCE, STS_SOURCE)):
        raise pytest.UsageError(f"the real test data is missing: expected {SHARED_DATA} beside the repository")
    # console scripts (ours and nnU-Net's) live beside the interpreter that runs the tests
    scripts_folder = os.path.dirname(sys.executable)
    if scripts_folder not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts_folder + os.pathsep + os.environ.get("PATH", "")
    # single-process nnU-Net on the 2-core CI machine
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("nnUNet_compile", "f")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # one core per worker: two workers that each run torch on every core (nnUNetv2_train and nnUNetv2_predict
        # call torch.set_num_threads(cpu_count) on a CPU) stall each other
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("nnsynth_cpu_threads", "1")
        import torch
        torch.set_num_threads(1)


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


def run_entry_point(main, argv, capsys):
    """A command's entry point (what its console script calls) in this process, without an interpreter start-up:
    (exit status, stdout, stderr). For one-line refusals; the console scripts themselves run in subprocesses
    elsewhere."""
    capsys.readouterr()
    try:
        main([str(argument) for argument in argv])
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def convert_example_subset(output_root, dataset_id, dataset_name) -> Path:
    """Convert the small real example (EXAMPLE_CASES, 37 slices) into ``Dataset{id}_{name}`` under ``output_root``."""
    from nnunet_synth.dataset_tools.convert_covid19_ct_slices import convert_covid19_ct_slices, select_slices
    cases = select_slices(COVID_SOURCE, EXAMPLE_CASES, EXAMPLE_MAX_SLICES_PER_CASE)
    return convert_covid19_ct_slices(COVID_SOURCE, output_root, dataset_id, dataset_name, cases=cases)


@pytest.fixture(scope="session")
def example_dataset_folder(nnunet_folders):
    """The small real example (5 patients, 37 slices) converted to Dataset990_Covid19Example."""
    return convert_example_subset(nnunet_folders["nnUNet_raw"], 990, "Covid19Example")


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


def write_covid_variant(source_folder, folder, labels: dict, relabel, slice_step: int = 1):
    """A dataset made from the converted COVID slices: every ``slice_step``-th slice of each case, its label map
    replaced by ``relabel(image, label)`` (lung 1, lesion 2 in; the new values of ``labels`` out)."""
    import numpy as np

    from nnunet_synth.dataset import RawDataset
    from nnunet_synth.dataset.writing import write_dataset_json_atomic, write_volume
    source = RawDataset(source_folder)
    for case_id in source.case_ids:
        image, label, _ = source.read_case(case_id)
        image, label = image[0, ::slice_step], label[::slice_step]
        write_volume(image.astype(np.uint8), folder / "imagesTr" / f"{case_id}_0000.nii.gz")
        write_volume(relabel(image, label).astype(np.uint8), folder / "labelsTr" / f"{case_id}.nii.gz")
    write_dataset_json_atomic(folder, channel_names={0: "CT"}, labels=labels, num_training_cases=len(source.case_ids),
                              file_ending=".nii.gz", dataset_name=folder.name)
    return folder


def lesion_density_thresholds(source_folder, quantiles):
    """Grey-value thresholds (5x5 mean) of the COVID lesion pixels at ``quantiles`` (over every case)."""
    import numpy as np
    from scipy import ndimage

    from nnunet_synth.dataset import RawDataset
    source = RawDataset(source_folder)
    values = []
    for case_id in source.case_ids:
        image, label, _ = source.read_case(case_id)
        values.append(ndimage.uniform_filter(image[0].astype(np.float32), (1, 5, 5))[label == 2])
    return list(np.quantile(np.concatenate(values), quantiles))


def split_lesions_by_density(image, label, thresholds, first_value):
    """Lesion pixels labelled ``first_value``, ``first_value + 1``, ... by their 5x5 mean grey value."""
    import numpy as np
    from scipy import ndimage
    smoothed = ndimage.uniform_filter(image.astype(np.float32), (1, 5, 5))
    lesion_types = np.zeros(label.shape, dtype=np.uint8)
    lesion_types[label == 2] = first_value + np.searchsorted(thresholds, smoothed[label == 2], side="right")
    return lesion_types


@pytest.fixture(scope="session")
def covid_binary_lesion_dataset_folder(nnunet_folders, covid_dataset_folder):
    """The most common nnU-Net lesion dataset: background + lesion (the lung merged into background), every 8th
    real COVID slice. Dataset504_Covid19BinaryLesion, 15 cases."""
    folder = nnunet_folders["nnUNet_raw"] / "Dataset504_Covid19BinaryLesion"
    return write_covid_variant(covid_dataset_folder, folder, {"background": 0, "lesion": 1},
                               lambda image, label: label == 2, slice_step=8)


@pytest.fixture(scope="session")
def covid_two_lesion_types_dataset_folder(nnunet_folders, covid_dataset_folder):
    """Two pathology classes of similar frequency without a host class: lung merged into background, lesion
    pixels split at the median density into ``lighter`` / ``denser``, every 8th slice. Dataset506, 15 cases."""
    folder = nnunet_folders["nnUNet_raw"] / "Dataset506_Covid19TwoLesionTypes"
    thresholds = lesion_density_thresholds(covid_dataset_folder, [0.5])
    return write_covid_variant(covid_dataset_folder, folder, {"background": 0, "lighter": 1, "denser": 2},
                               lambda image, label: split_lesions_by_density(image, label, thresholds, 1),
                               slice_step=8)


@pytest.fixture(scope="session")
def covid_three_lesion_types_dataset_folder(nnunet_folders, covid_dataset_folder):
    """Three pathology classes in a host class: normal lung kept, lesion pixels split by density at the 50th and
    85th percentiles into ``faint`` / ``medium`` / ``dense``, every 8th slice. Dataset507, 15 cases."""
    folder = nnunet_folders["nnUNet_raw"] / "Dataset507_Covid19ThreeLesionTypes"
    thresholds = lesion_density_thresholds(covid_dataset_folder, [0.5, 0.85])

    def relabel(image, label):
        relabelled = split_lesions_by_density(image, label, thresholds, 2)
        relabelled[label == 1] = 1
        return relabelled

    return write_covid_variant(covid_dataset_folder, folder,
                               {"background": 0, "lung": 1, "faint": 2, "medium": 3, "dense": 4}, relabel, slice_step=8)


@pytest.fixture(scope="session")
def ms_lesions_dataset_folder(nnunet_folders):
    """The real MS volumes (4 MR channels, lesion masks) averaged over 2x2x2 blocks: Dataset505_MSLesions, 3 cases,
    one fold per patient in splits_final.json. Most slices carry no lesion."""
    from nnunet_synth.dataset_tools.convert_ms_lesions import convert_ms_lesions
    return convert_ms_lesions(MS_SOURCE, nnunet_folders["nnUNet_raw"], 505, "MSLesions", downsample=2,
                              preprocessed_root=nnunet_folders["nnUNet_preprocessed"])


@pytest.fixture(scope="session")
def sts_dataset_folder(nnunet_folders):
    """The real sarcoma CT of STS_CASES (HU, tumour masks) averaged over 2x2 in-plane blocks, and STS_HEALTHY cut to
    its tumour-free first slices (a lesion-free case): Dataset550_STSCT, 7 cases, nnU-Net's 5-fold split."""
    import SimpleITK as sitk

    from nnunet_synth.dataset_tools.convert_sts_ct import convert_sts_ct
    folder = convert_sts_ct(STS_SOURCE, nnunet_folders["nnUNet_raw"], 550, "STSCT",
                            case_ids=(*STS_CASES, STS_HEALTHY), downsample=2)
    case_id = "sts_" + STS_HEALTHY.removeprefix("STS_")
    for path in (folder / "imagesTr" / f"{case_id}_0000.nii.gz", folder / "labelsTr" / f"{case_id}.nii.gz"):
        sitk.WriteImage(sitk.ReadImage(str(path))[:, :, :STS_HEALTHY_SLICES], str(path), True)
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{case_id}.nii.gz"))).any()
    return folder
