"""The generated chest-CT example (nnunet_synth.example.phantom), and the small real example the tests convert
from the COVID-19 CT slices."""
import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import COVID_SOURCE, EXAMPLE_CASES, EXAMPLE_MAX_SLICES_PER_CASE
from skimage import io

from nnunet_synth.dataset_tools.convert_covid19_ct_slices import (
    convert_covid19_ct_slices,
    read_case_table,
    select_slices,
)
from nnunet_synth.example.phantom import PHANTOM_ABOUT, PhantomSettings, write_chest_phantom

BIN = Path(sys.executable).parent
SMALL = PhantomSettings(num_patients=2, slices_per_patient=4, lesion_slices=1)


def file_contents(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_phantom(folder: Path):
    """(case ids per slice, images, lung masks, lesion masks) of a folder in the COVID-19 layout."""
    with open(folder / "cases.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    images = np.stack([io.imread(folder / "ct" / row["slice_file"]) for row in rows])
    lungs = np.stack([io.imread(folder / "lungs" / row["slice_file"]) for row in rows])
    lesions = np.stack([io.imread(folder / "covid" / row["slice_file"]) for row in rows])
    return [row["case_id"] for row in rows], images, lungs, lesions


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory):
    return write_chest_phantom(tmp_path_factory.mktemp("phantom") / "chest_phantom")


def test_the_same_seed_gives_identical_files_and_another_seed_other_images(tmp_path):
    first = file_contents(write_chest_phantom(tmp_path / "first", SMALL))
    second = file_contents(write_chest_phantom(tmp_path / "second", SMALL))
    assert len(first) == 1 + 1 + 3 * 8                       # cases.csv, phantom.json, 8 slices of ct/lungs/covid
    assert first == second
    other = file_contents(write_chest_phantom(tmp_path / "other", replace(SMALL, seed=1)))
    assert other.keys() == first.keys()
    assert all(other[name] != first[name] for name in first if name.startswith("ct/"))


def test_the_example_has_the_layout_and_pixel_type_of_the_real_slices_and_its_labels_in_proportion(phantom_folder):
    case_ids, images, lungs, lesions = read_phantom(phantom_folder)
    real = io.imread(COVID_SOURCE / "ct" / "0000.png")
    assert images.dtype == real.dtype == np.uint8 and images.shape[1:] == real.shape == (256, 256)
    assert sorted(set(case_ids)) == [f"phantom_{index:02d}" for index in range(5)] and len(case_ids) == 40
    assert set(np.unique(lungs)) == {0, 255} and set(np.unique(lesions)) == {0, 255}
    lungs, lesions = lungs > 0, lesions > 0
    assert not (lesions & ~lungs).any()                                # lesions lie inside the lungs
    assert 0.10 < lungs.mean() < 0.20                                  # the real slices: 15.5 % lung
    assert 0.01 < lesions.sum() / lungs.sum() < 0.03                   # rare: 1-3 % of the lung
    for case_id in sorted(set(case_ids)):
        slices_with_lesion = lesions[np.array(case_ids) == case_id].any(axis=(1, 2))
        assert 0 < slices_with_lesion.sum() < len(slices_with_lesion) / 2    # in a minority of the slices
    # the intensities tell the classes apart as in CT: dark lung, brighter ground glass, bright body
    normal_lung, body = images[lungs & ~lesions], images[~lungs & (images > 90)]
    assert np.median(normal_lung) < 80 and images[lesions].mean() > normal_lung.mean() + 25
    assert (images > 90).mean() > 0.3 and np.median(body) > 140
    # neighbouring slices of a patient look alike, slices of different patients less so
    differences = np.abs(np.diff(images.astype(float), axis=0)).mean(axis=(1, 2))
    same_patient = np.array(case_ids[1:]) == np.array(case_ids[:-1])
    assert differences[same_patient].mean() < differences[~same_patient].mean()


def test_the_example_converts_and_passes_the_dataset_check(phantom_folder, nnunet_folders):
    folder = convert_covid19_ct_slices(phantom_folder, nnunet_folders["nnUNet_raw"], 989, "PhantomCheck",
                                       about=PHANTOM_ABOUT)
    result = subprocess.run([str(BIN / "nnsynth_check_dataset"), "989"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Dataset989_PhantomCheck" in result.stdout and "5 cases, 40 slices" in result.stdout
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "lung": 1, "lesion": 2}
    assert "Generated" in dataset_json["description"] and "CC BY" not in json.dumps(dataset_json)


def test_a_complete_example_is_kept_and_an_interrupted_one_is_written_again(tmp_path):
    folder = write_chest_phantom(tmp_path / "phantom", SMALL)
    expected = file_contents(folder)
    written = {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")}
    write_chest_phantom(folder, SMALL)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")} == written
    # interrupted: cases.csv (written last) is missing and a slice is half-written
    (folder / "cases.csv").unlink()
    (folder / "ct" / "0003.png").write_bytes(b"\x89PNG")
    write_chest_phantom(folder, SMALL)
    assert file_contents(folder) == expected
    assert not list(folder.rglob(".nnsynth_tmp_*"))


def test_the_small_real_example_is_every_kth_slice_of_the_five_shortest_patients():
    case_table = read_case_table(COVID_SOURCE)
    assert sorted(EXAMPLE_CASES) == sorted(sorted(case_table, key=lambda case: len(case_table[case]))[:5])
    cases = select_slices(COVID_SOURCE, EXAMPLE_CASES, EXAMPLE_MAX_SLICES_PER_CASE)
    # every 2nd slice of case_10 and case_14, every 3rd of the others
    assert {case: (files[0], files[-1], len(files)) for case, files in cases.items()} == {
        "case_10": ("1247.png", "1257.png", 6), "case_14": ("1475.png", "1485.png", 6),
        "case_15": ("1486.png", "1507.png", 8), "case_17": ("1565.png", "1586.png", 8),
        "case_18": ("1587.png", "1611.png", 9)}
    assert cases["case_15"] == case_table["case_15"][::3]


def test_converting_an_unknown_case_exits_with_one_line(tmp_path):
    result = subprocess.run([str(BIN / "nnsynth_convert_covid19"), str(COVID_SOURCE), "-o", str(tmp_path),
                             "--cases", "case_10", "case_99"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("nnsynth: error: ") and "no case case_99" in result.stderr
    assert not any(tmp_path.iterdir())
