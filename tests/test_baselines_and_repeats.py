"""Copy-paste synthetic cases (no generator), the baseline arms, repeats with intervals and held-out test
patients, on the real COVID data with the stock nnU-Net commands."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunet_synth.dataset import RawDataset
from nnunet_synth.masks.regions import find_regions

BIN = Path(sys.executable).parent
DOWNSTREAM_ID = 992


def environment():
    # one thread per nnU-Net run: the runs share a small machine (nnUNetv2_train would use every core)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "nnUNet_n_proc_DA": "0",
            "nnsynth_cpu_threads": "1"}


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.slow
def test_copy_paste_cases_hold_the_donors_real_pixels(covid_dataset_folder, nnunet_folders):
    """nnsynth_generate --image-source copy-paste on a copy of Dataset501: no generator; inside each shift-only paste
    (away from the blended edge) the image is the donor's pixels moved by the recorded offset; the label is the new
    map."""
    import shutil
    folder = nnunet_folders["nnUNet_raw"] / "Dataset993_Covid19CopyPaste"     # the session's Dataset501 stays real
    shutil.copytree(covid_dataset_folder, folder)
    description = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**description, "name": folder.name}))
    results_before = sorted(p.name for p in nnunet_folders["nnUNet_results"].glob("*/*"))
    result = subprocess.run([str(BIN / "nnsynth_generate"), str(folder), "--image-source", "copy-paste",
                             "-n", "12", "--p-rotate", "0", "--p-dilate", "0", "--seed", "3"],
                            capture_output=True, text=True, env=environment(), timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "fold 0: 12 synthetic cases" in result.stdout and "preview grid" in result.stdout
    assert sorted(p.name for p in nnunet_folders["nnUNet_results"].glob("*/*")) == results_before   # no generator
    dataset = RawDataset(folder)
    manifest = json.loads((dataset.folder / "synthetic.json").read_text())
    validation = {"case_00", "case_10", "case_14"}          # fold 0 of nnU-Net's seeded split
    assert set(manifest["folds"]["0"]["generator_training_cases"]) == set(dataset.case_ids) - validation
    volumes = {}
    checked = 0
    for case_id, entry in manifest["cases"].items():
        assert entry["image_source"] == "copy-paste" and entry["generator"] is None
        assert not set(entry["source_cases"]) & validation
        image = read(dataset.folder / entry["image"])[0].astype(np.int64)
        label = read(dataset.folder / entry["label"])[0]
        target = entry["source"]["target"]
        for case in {target["case_id"]} | {p["donor"]["case_id"] for p in entry["source"]["pastes"]}:
            volumes.setdefault(case, (read(dataset.cases[case]["images"][0]), read(dataset.cases[case]["label"])))
        target_image = volumes[target["case_id"]][0][target["slice_index"]].astype(np.int64)
        target_label = volumes[target["case_id"]][1][target["slice_index"]]
        changed = label != target_label
        assert np.array_equal(image[~ndimage.binary_dilation(changed, iterations=3)],
                              target_image[~ndimage.binary_dilation(changed, iterations=3)])   # the rest is the target
        footprints = []
        for paste in entry["source"]["pastes"]:
            donor = paste["donor"]
            donor_image = volumes[donor["case_id"]][0][donor["slice_index"]].astype(np.int64)
            donor_label = volumes[donor["case_id"]][1][donor["slice_index"]]
            region = next(r.region for r in find_regions(donor_label, donor["class"])
                          if r.component_index == donor["component_index"])
            offset = next((op["offset"] for op in paste["operations"] if op["op"] == "shift"), [0, 0])
            source = np.zeros(label.shape, dtype=bool)
            row, col = region.origin
            source[row:row + region.mask.shape[0], col:col + region.mask.shape[1]] = region.mask
            shifted = np.roll(np.roll(source, offset[0], 0), offset[1], 1)
            footprints.append((shifted, donor_image, offset))
        for index, (shifted, donor_image, offset) in enumerate(footprints):
            others = np.zeros(label.shape, dtype=bool)
            for other_index, (other, _, _) in enumerate(footprints):
                if other_index != index:
                    others |= other
            own = shifted & changed & ~others
            deep = ndimage.binary_erosion(own, iterations=3)
            if not deep.any():
                continue
            rows, cols = np.nonzero(deep)
            assert np.array_equal(image[rows, cols], donor_image[rows - offset[0], cols - offset[1]]), case_id
            checked += int(deep.sum())
    assert checked > 500          # donor pixels really were compared


@pytest.fixture(scope="module")
def downstream_run(nnunet_folders, tmp_path_factory):
    """real_only, oversample and copy_paste, 2 repeats each, 1 held-out test patient, 3 training patients, on the
    small real example (5 patients)."""
    from conftest import convert_example_subset
    dataset = RawDataset(convert_example_subset(nnunet_folders["nnUNet_raw"], DOWNSTREAM_ID, "BaselinesExample"))
    output = tmp_path_factory.mktemp("baselines") / "evaluation"
    command = [str(BIN / "nnsynth_evaluate"), "downstream", str(DOWNSTREAM_ID), "-o", str(output),
               "--arms", "real_only", "oversample", "copy_paste", "--repeats", "2", "--test-patients", "1",
               "--real-cases", "3", "--budget", "smoke", "--plans", "cpu", "--first-id", "730", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=1500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return dataset, output, result.stdout


@pytest.mark.slow
def test_held_out_patients_reach_nothing_and_every_arm_is_scored_on_them(downstream_run, nnunet_folders):
    dataset, output, _ = downstream_run
    patients = json.loads((output / "patients.json").read_text())["real3"]
    assert len(patients["test"]) == 1 and len(patients["training"]) == 3
    unseen = set(patients["test"])
    raw = nnunet_folders["nnUNet_raw"]
    copies = sorted(raw.glob("Dataset73[0-2]_*"))
    assert len(copies) == 3
    for copy in copies:
        assert set(RawDataset(copy).case_ids) == set(patients["training"]) | set(patients["validation"])
        split = json.loads((nnunet_folders["nnUNet_preprocessed"] / copy.name / "splits_final.json").read_text())
        assert split == [{"train": patients["training"], "val": patients["validation"]}]
    store = json.loads((next(raw.glob("Dataset732_*")) / "synthetic.json").read_text())
    assert store["cases"] and all(set(entry["source_cases"]) <= set(patients["training"])
                                  for entry in store["cases"].values())
    assert set(store["folds"]["0"]["generator_training_cases"]) == set(patients["training"])
    runs = sorted(output.glob("runs/real3/*/repeat*/dice.json"))
    assert len(runs) == 6
    for path in runs:
        run = json.loads(path.read_text())
        assert set(run["cases"]) == unseen and run["seed"] == run["repeat"]
        # the Dice of the run is nnU-Net's on its own stock prediction of the test patient
        prediction = read(path.parent / "predictions" / f"{patients['test'][0]}.nii.gz")
        reference = read(output / "test_set" / "labelsTs" / f"{patients['test'][0]}.nii.gz")
        for name, value in dataset.labels.items():
            if value:
                both = (prediction == value).sum() + (reference == value).sum()
                expected = None if both == 0 else 2 * ((prediction == value) & (reference == value)).sum() / both
                found = run["cases"][patients["test"][0]][name]
                assert found is None if expected is None else found == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_oversampling_and_copy_paste_reach_the_trainer(downstream_run, nnunet_folders):
    _, output, _ = downstream_run
    settings = {}
    for path in output.glob("runs/real3/*/repeat0/model/synthmix.json"):
        settings[path.parts[-4]] = json.loads(path.read_text())
    results = nnunet_folders["nnUNet_results"]
    for path in results.glob("Dataset73[0-2]_*/*/fold_0/synthmix.json"):       # the last repeat stays in place
        settings.setdefault(path.parts[-4].split("Evalreal3")[1] + "_last", json.loads(path.read_text()))
    real_only, oversample, copy_paste = settings["real_only"], settings["oversample"], settings["copy_paste_x1"]
    assert real_only["rare_oversampling"]["probability"] == 0 and real_only["settings"]["ratio"] == 0
    assert oversample["rare_oversampling"]["probability"] == 0.5 and oversample["rare_oversampling"]["class"] == 2
    assert oversample["settings"]["ratio"] == 0
    assert copy_paste["settings"]["ratio"] == 0.5 and copy_paste["synthetic_cases"]["used"] > 0
    assert copy_paste["provenance"]["dropped_for_leakage"] == 0
    assert {real_only["seed"], settings["realonly_last"]["seed"]} == {0, 1}


@pytest.mark.slow
def test_summary_is_recomputed_from_the_per_run_dice_files(downstream_run):
    _, output, stdout = downstream_run
    runs = [json.loads(p.read_text()) for p in output.glob("runs/*/*/repeat*/dice.json")]
    with open(output / "summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    assert len(summary) == 3 * 2          # arms x (lung, lesion)
    for row in summary:
        arm_runs = sorted((r for r in runs if r["label"] == row["label"]), key=lambda r: r["repeat"])
        reference = sorted((r for r in runs if r["label"] == "real_only"), key=lambda r: r["repeat"])
        cases = sorted(arm_runs[0]["cases"])
        values = np.array([[np.nan if r["cases"][c][row["class"]] is None else r["cases"][c][row["class"]]
                            for c in cases] for r in arm_runs])
        assert int(row["runs"]) == 2 and int(row["cases"]) == 1
        assert float(row["mean"]) == pytest.approx(np.nanmean(values), abs=1e-4)
        assert float(row["sd"]) == pytest.approx(np.std(np.nanmean(values, axis=1), ddof=1), abs=1e-4)
        assert float(row["ci_low"]) - 1e-4 <= float(row["mean"]) <= float(row["ci_high"]) + 1e-4
        assert float(row["ci_low"]) >= np.nanmin(values) - 1e-4 and float(row["ci_high"]) <= np.nanmax(values) + 1e-4
        if row["label"] != "real_only":
            ref = np.array([[np.nan if r["cases"][c][row["class"]] is None else r["cases"][c][row["class"]]
                             for c in cases] for r in reference])
            assert float(row["diff"]) == pytest.approx(np.nanmean(values - ref), abs=1e-4)
            assert float(row["diff_low"]) <= float(row["diff"]) + 1e-4 <= float(row["diff_high"]) + 2e-4
    assert "difference to real only" in (output / "summary.md").read_text() and "| real3 | oversample |" in stdout
    assert (output / "downstream.png").stat().st_size > 0 and "![downstream]" in (output / "report.md").read_text()


def test_bootstrap_interval_resamples_runs_and_cases():
    """The interval of a matrix whose runs differ widely is wider than that of runs that agree; seeded."""
    from nnunet_synth.evaluation.statistics import bootstrap_interval
    agree = np.array([[0.5, 0.6, 0.7], [0.5, 0.6, 0.7], [0.5, 0.6, 0.7]])
    spread = agree + np.array([[-0.3], [0.0], [0.3]])
    narrow = bootstrap_interval(agree, np.random.default_rng(0))
    wide = bootstrap_interval(spread, np.random.default_rng(0))
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0]) > 0
    assert bootstrap_interval(spread, np.random.default_rng(0)) == wide
    assert bootstrap_interval(np.full((3, 2), 0.4), np.random.default_rng(1)) == pytest.approx((0.4, 0.4))


def test_patient_split_keeps_test_patients_out_and_nests_the_sweep(covid_dataset_folder):
    from nnunet_synth.errors import NnsynthError
    from nnunet_synth.evaluation.patients import split_patients
    cases = RawDataset(covid_dataset_folder).case_ids
    four, eight, every = (split_patients(cases, 4, k, seed=0) for k in (4, 8, None))
    assert four.test == eight.test == every.test and len(four.test) == 4
    assert four.validation == eight.validation and len(every.training) == 15 - 4 - 1
    assert set(four.training) < set(eight.training) < set(every.training)
    assert not set(every.training) & (set(every.test) | set(every.validation))
    assert split_patients(cases, 4, 4, seed=1).test != four.test
    with pytest.raises(NnsynthError, match="--real-cases 11"):
        split_patients(cases, 4, 11)
