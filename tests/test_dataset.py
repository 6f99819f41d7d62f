"""Stage 1 on the real data: converters, nnU-Net's integrity check, slices, intensity window, geometry."""
import json
import os
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REAL_HU_SOURCE
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from nnunet_synth.dataset import (
    ImageWindows,
    IntensityWindow,
    RawDataset,
    class_pixel_frequencies,
    dataset_intensity_window,
    fit_slice,
    iter_slices,
    restore_slice,
)


def test_covid_conversion_gives_15_cases_with_source_class_shares(covid_dataset_folder):
    dataset = RawDataset(covid_dataset_folder)
    assert len(dataset.case_ids) == 15
    assert dataset.labels == {"background": 0, "lung": 1, "lesion": 2}
    assert dataset.channel_list == ["CT"] and dataset.num_channels == 1
    assert dataset.ignore_label is None and dataset.regions is None
    shares = class_pixel_frequencies(dataset)
    # SOURCE.md: non-lung ~84.5 %, normal lung ~13.7 %, infection ~1.8 %
    np.testing.assert_allclose(100 * shares, [84.5, 13.7, 1.8], atol=0.3)
    image, label_map, properties = dataset.read_case("case_00")
    assert image.shape == (1, 159, 256, 256) and label_map.shape == image.shape[1:]
    assert set(np.unique(label_map)) == {0, 1, 2}
    assert tuple(properties["spacing"]) == (1.0, 1.0, 1.0)
    assert dataset.source_dtype("case_00") == np.uint8


def test_covid_lesion_outside_lung_mask_counts_as_lesion(covid_dataset_folder):
    from conftest import COVID_SOURCE
    from skimage import io
    dataset = RawDataset(covid_dataset_folder)
    _, label_map, _ = dataset.read_case("case_00")
    infection = io.imread(COVID_SOURCE / "covid" / "0000.png") > 0
    lungs = io.imread(COVID_SOURCE / "lungs" / "0000.png") > 0
    assert np.all(label_map[0][infection] == 2)
    assert np.all(label_map[0][lungs & ~infection] == 1)
    assert np.all(label_map[0][~lungs & ~infection] == 0)


@pytest.mark.parametrize("fixture_name", ["covid_dataset_folder", "real_hu_dataset_folder"])
def test_nnunet_integrity_check_accepts_converted_datasets(fixture_name, request):
    folder = request.getfixturevalue(fixture_name)
    verify_dataset_integrity(str(folder), num_processes=1)   # raises on any problem


@pytest.mark.slow
def test_stock_plan_and_preprocess_verifies_the_hu_dataset(real_hu_dataset_folder, nnunet_folders):
    environment = dict(os.environ, **{name: str(path) for name, path in nnunet_folders.items()})
    environment["nnUNet_n_proc_DA"] = "1"     # 0 (single-threaded training) breaks torch.set_num_threads here
    result = subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", "502", "-c", "2d", "--verify_dataset_integrity",
                             "-np", "1", "-npfp", "1"], env=environment, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (nnunet_folders["nnUNet_preprocessed"] / real_hu_dataset_folder.name / "nnUNetPlans.json").is_file()


def test_hu_window_round_trip_is_within_one_hu_inside_the_window(real_hu_dataset_folder):
    dataset = RawDataset(real_hu_dataset_folder)
    windows = dataset_intensity_window(dataset)
    assert windows.num_channels == 1
    window = windows.channels[0]
    assert (window.lower, window.upper, window.source) == (-1000.0, 1000.0, "hounsfield")
    for volume_file in ("example_ct_sm.nii.gz", "example_ct.nii.gz"):
        volume = sitk.GetArrayFromImage(sitk.ReadImage(str(REAL_HU_SOURCE / volume_file)))
        restored = window.from_model(window.to_model(volume), volume.dtype)
        assert restored.dtype == volume.dtype
        inside = (volume >= window.lower) & (volume <= window.upper)
        assert inside.mean() > 0.5
        assert np.abs(restored[inside].astype(np.int64) - volume[inside]).max() <= 1
        assert np.all(restored[volume < window.lower] == window.lower)
    scaled = window.to_model(np.array([-1000.0, 0.0, 1000.0, 3000.0]))
    np.testing.assert_allclose(scaled, [-1.0, 0.0, 1.0, 1.0])


def test_window_for_8bit_ct_uses_percentiles_and_can_be_overridden(covid_dataset_folder):
    dataset = RawDataset(covid_dataset_folder)
    windows = dataset_intensity_window(dataset, case_ids=dataset.case_ids[:3])
    assert ImageWindows.from_dict(json.loads(json.dumps(windows.to_dict()))) == windows
    window = windows.channels[0]
    assert window.source == "percentile_0.5_99.5"
    assert 0 <= window.lower < 30 and 220 < window.upper <= 255
    override = dataset_intensity_window(dataset, override=(0, 255))
    assert override == ImageWindows((IntensityWindow(0.0, 255.0, "user"),))
    assert IntensityWindow.from_dict(json.loads(json.dumps(window.to_dict()))) == window
    # uint8 round trip is exact inside the window
    values = np.arange(int(np.ceil(window.lower)), int(window.upper) + 1, dtype=np.uint8)
    np.testing.assert_array_equal(window.from_model(window.to_model(values), np.uint8), values)


def test_slices_carry_case_index_and_spacing(real_hu_dataset_folder):
    dataset = RawDataset(real_hu_dataset_folder)
    slices = list(iter_slices(dataset))
    assert len(slices) == 30
    assert [s.slice_index for s in slices[:6]] == list(range(6))
    assert slices[0].case_id == "hu_00" and slices[-1].case_id == "hu_04"
    assert slices[0].image.shape == (1, 101, 122) and slices[0].label_map.shape == (101, 122)
    assert slices[0].spacing == (3.0, 3.0)
    assert slices[0].image.min() < -900       # Hounsfield units, not rescaled


def test_fit_and_restore_slice(real_hu_dataset_folder):
    dataset = RawDataset(real_hu_dataset_folder)
    labelled_slice = next(iter_slices(dataset))
    image, label_map = labelled_slice.image, labelled_slice.label_map
    # padding only (model size = longest side): the round trip is exact
    fitted_image, fitted_label, fit = fit_slice(image, label_map, 122, image_pad_value=-1024)
    assert fitted_image.shape == (1, 122, 122) and fit.pad == (10, 11, 0, 0)
    assert np.all(fitted_label[:10] == 0) and np.all(fitted_image[:, :10] == -1024)
    restored_image, restored_label = restore_slice(fitted_image, fitted_label, fit)
    np.testing.assert_array_equal(restored_image, image)
    np.testing.assert_array_equal(restored_label, label_map)
    # resizing: shapes are restored exactly, labels stay label values, most pixels keep their label
    fitted_image, fitted_label, fit = fit_slice(image, label_map, 64)
    assert fitted_image.shape == (1, 64, 64) and set(np.unique(fitted_label)) <= set(np.unique(label_map))
    restored_image, restored_label = restore_slice(fitted_image, fitted_label, fit)
    assert restored_image.shape == image.shape and restored_label.shape == label_map.shape
    assert (restored_label == label_map).mean() > 0.95


def test_real_files_are_not_touched_by_reading(covid_dataset_folder):
    dataset = RawDataset(covid_dataset_folder)
    before = {p: os.stat(p).st_mtime_ns for p in covid_dataset_folder.rglob("*") if p.is_file()}
    list(iter_slices(dataset, dataset.case_ids[:2]))
    after = {p: os.stat(p).st_mtime_ns for p in covid_dataset_folder.rglob("*") if p.is_file()}
    assert before == after


def test_nnunet_folders_are_read_at_each_call(covid_dataset_folder, nnunet_folders, monkeypatch, tmp_path):
    """nnU-Net's folders are read when asked, not at import (the tree above is exported after import); an unset
    or empty one stops where it is needed with the variable to export."""
    from nnunet_synth.errors import NnsynthError
    from nnunet_synth.nnunet_paths import nnunet_folder, require_nnunet_folder
    assert RawDataset.from_name("501").folder == covid_dataset_folder.resolve()
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    assert nnunet_folder("nnUNet_results") == tmp_path
    for value in ("", None):
        if value is None:
            monkeypatch.delenv("nnUNet_raw")
        else:
            monkeypatch.setenv("nnUNet_raw", value)
        assert nnunet_folder("nnUNet_raw") is None
        with pytest.raises(NnsynthError, match="nnUNet_raw is not set.*export nnUNet_raw="):
            RawDataset.from_name("501")
    assert require_nnunet_folder("nnUNet_preprocessed", "test") == nnunet_folders["nnUNet_preprocessed"]
