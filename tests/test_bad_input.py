"""Bad input gets one line that names the file and the fix, a non-zero exit, and no traceback."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk


def run_check(target, nnunet_raw):
    environment = dict(os.environ, nnUNet_raw=str(nnunet_raw))
    return subprocess.run(["nnsynth_check_dataset", str(target)], capture_output=True, text=True, timeout=900,
                          env=environment)


def assert_one_line_error(result, *expected_fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nnsynth: error: ")
    for fragment in expected_fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def broken_copy(real_hu_dataset_folder, tmp_path):
    """A writable copy of the real HU dataset, to be broken by each test."""
    raw = tmp_path / "raw"
    copy = raw / "Dataset777_Broken"
    shutil.copytree(real_hu_dataset_folder, copy)
    return copy


def rewrite_volume(path, change):
    image = sitk.ReadImage(str(path))
    array = change(sitk.GetArrayFromImage(image))
    new_image = sitk.GetImageFromArray(array, isVector=False)
    if new_image.GetDimension() == image.GetDimension():
        new_image.CopyInformation(image) if new_image.GetSize() == image.GetSize() else None
    sitk.WriteImage(new_image, str(path))


def test_intact_copy_passes(broken_copy):
    result = run_check(broken_copy, broken_copy.parent)
    assert result.returncode == 0, result.stderr
    assert "5 cases, 30 slices" in result.stdout


def test_missing_dataset_json(broken_copy):
    (broken_copy / "dataset.json").unlink()
    assert_one_line_error(run_check(broken_copy, broken_copy.parent), "dataset.json", "generate_dataset_json")


def test_malformed_dataset_json(broken_copy):
    (broken_copy / "dataset.json").write_text('{"labels": {"background": 0,, }')
    assert_one_line_error(run_check(broken_copy, broken_copy.parent), "dataset.json", "not valid JSON")


def test_dataset_json_without_required_keys(broken_copy):
    dataset_json = json.loads((broken_copy / "dataset.json").read_text())
    del dataset_json["file_ending"]
    (broken_copy / "dataset.json").write_text(json.dumps(dataset_json))
    assert_one_line_error(run_check(broken_copy, broken_copy.parent), "dataset.json", "file_ending")


def test_unknown_dataset(broken_copy):
    assert_one_line_error(run_check("Dataset778", broken_copy.parent), "unknown dataset", "Dataset778")
    assert_one_line_error(run_check("not-a-dataset", broken_copy.parent), "not-a-dataset")


def test_dataset_by_short_name_and_id(broken_copy):
    for name in ("Dataset777", "777", "Dataset777_Broken"):
        assert run_check(name, broken_copy.parent).returncode == 0


def test_undeclared_label_value(broken_copy):
    label_file = broken_copy / "labelsTr" / "hu_01.nii.gz"
    rewrite_volume(label_file, lambda a: np.where(a == 1, 9, a).astype(a.dtype))
    assert_one_line_error(run_check(broken_copy, broken_copy.parent), "hu_01.nii.gz", "[9]", "declare")


def test_image_label_shape_mismatch(broken_copy):
    label_file = broken_copy / "labelsTr" / "hu_02.nii.gz"
    rewrite_volume(label_file, lambda a: a[:, :50])
    assert_one_line_error(run_check(broken_copy, broken_copy.parent), "hu_02.nii.gz", "same grid")


def test_nan_in_image(broken_copy):
    # SimpleITK's NIfTI reader turns NaN into 0, so NaN reaches a reader only through formats such as .mha:
    # store the copy as .mha (nnU-Net reads it with SimpleITKIO as well) and put a NaN into one image.
    for path in list(broken_copy.rglob("*.nii.gz")):
        array_image = sitk.ReadImage(str(path))
        if path.name == "hu_03_0000.nii.gz":
            array = sitk.GetArrayFromImage(array_image).astype(np.float32)
            array[0, 10, 10] = np.nan
            new_image = sitk.GetImageFromArray(array)
            new_image.CopyInformation(array_image)
            array_image = new_image
        sitk.WriteImage(array_image, str(path).replace(".nii.gz", ".mha"))
        path.unlink()
    dataset_json = json.loads((broken_copy / "dataset.json").read_text())
    dataset_json["file_ending"] = ".mha"
    (broken_copy / "dataset.json").write_text(json.dumps(dataset_json))
    assert_one_line_error(run_check(broken_copy, broken_copy.parent), "hu_03_0000.mha", "NaN")


def test_empty_label_map(broken_copy):
    label_file = broken_copy / "labelsTr" / "hu_04.nii.gz"
    rewrite_volume(label_file, lambda a: np.zeros_like(a))
    assert_one_line_error(run_check(broken_copy, broken_copy.parent), "hu_04.nii.gz", "empty")


def test_wrong_dimensionality(broken_copy):
    image_file = broken_copy / "imagesTr" / "hu_00_0000.nii.gz"
    rewrite_volume(image_file, lambda a: np.stack([a, a]))      # a 4D file: two volumes in one image
    assert_one_line_error(run_check(broken_copy, broken_copy.parent), "hu_00_0000.nii.gz", "channel")


def test_a_declared_channel_without_its_files_is_named(broken_copy):
    dataset_json = json.loads((broken_copy / "dataset.json").read_text())
    dataset_json["channel_names"] = {"0": "CT", "1": "PET"}
    (broken_copy / "dataset.json").write_text(json.dumps(dataset_json))
    assert_one_line_error(run_check(broken_copy, broken_copy.parent), "dataset.json", "hu_00_0001.nii.gz",
                          "2 channels")


def test_num_training_mismatch(broken_copy):
    dataset_json = json.loads((broken_copy / "dataset.json").read_text())
    dataset_json["numTraining"] = 9
    (broken_copy / "dataset.json").write_text(json.dumps(dataset_json))
    assert_one_line_error(run_check(broken_copy, broken_copy.parent), "numTraining")
