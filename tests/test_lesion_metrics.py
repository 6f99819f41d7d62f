"""Per-lesion metrics (nnunet_synth.evaluation.lesions): hand-made 2D and 3D label maps with exact counts, a
prediction made from real COVID-19 labels, and the command's refusals."""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import convert_example_subset, run_entry_point
from scipy import ndimage

from nnunet_synth.evaluation.lesions import lesion_metrics, per_case_values

SLICE_STRUCTURE = np.ones((3, 3, 3))
SLICE_STRUCTURE[0] = SLICE_STRUCTURE[2] = 0      # the COVID files stack independent slices (nnsynth_unit slice)


def write(array, path, spacing):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def test_2d_missed_split_and_false_positives(tmp_path):
    reference, prediction = np.zeros((20, 20)), np.zeros((20, 20))
    reference[2, 2] = 1                       # small lesion (0.25 mm^2), missed
    reference[5:9, 5:9] = 1                   # 4 mm^2, predicted in two parts (row 7 left out)
    reference[14:17, 14:17] = 1               # 2.25 mm^2, found
    prediction[5:7, 5:9] = prediction[8, 5:9] = 1
    prediction[14:17, 14:17] = 1
    prediction[0:2, 17:19] = 1                # false positive
    prediction[18, 0] = prediction[19, 1] = 1     # false positive, one component under 8-connectivity
    for folder, array in (("labels", reference), ("predictions", prediction)):
        write(array, tmp_path / folder / "a.nii.gz", (0.5, 0.5))
        write(np.zeros((20, 20)), tmp_path / folder / "b.nii.gz", (0.5, 0.5))    # no lesion, none predicted
    result = lesion_metrics(tmp_path / "predictions", tmp_path / "labels", {"background": 0, "lesion": 1},
                            ".nii.gz", size_bins=[1, 3])
    lesion = result["classes"]["lesion"]
    assert result["unit"] == "mm^2" and result["cases"] == 2
    assert (lesion["reference_lesions"], lesion["detected"], lesion["predicted_components"],
            lesion["false_positives"]) == (3, 2, 5, 2)
    assert lesion["fp_per_case"] == 1.0
    assert lesion["precision"] == pytest.approx(0.6) and lesion["recall"] == pytest.approx(2 / 3)
    assert lesion["f1"] == pytest.approx(2 * 0.6 * (2 / 3) / (0.6 + 2 / 3))
    assert {name: (cell["lesions"], cell["detected"]) for name, cell in lesion["sensitivity_per_bin"].items()} == \
        {"< 1": (1, 0), "1-3": (1, 1), ">= 3": (1, 1)}
    assert sorted(result["per_case"]["a"]["lesion"]["sizes"]) == [0.25, 2.25, 4.0]
    values = per_case_values(result)
    assert values["a"]["lesion: sensitivity < 1"] == 0.0 and values["a"]["lesion: FP"] == 2.0
    assert values["b"]["lesion: lesion F1"] is None and values["b"]["lesion: sensitivity < 1"] is None


def test_3d_per_class_split_and_terciles(tmp_path):
    reference, prediction = np.zeros((10, 10, 10)), np.zeros((10, 10, 10))
    reference[0:2, 0:2, 0:2] = 1              # 8 voxels of 2 mm^3: found by a single voxel
    reference[5:8, 5:8, 5:8] = 1              # 54 mm^3: predicted as two slabs
    reference[9, 0, 9] = 2                    # class 2, predicted as class 1: missed, and a class-1 FP
    prediction[1, 1, 1] = 1
    prediction[5, 5:8, 5:8] = prediction[7, 5:8, 5:8] = 1
    prediction[9, 0, 9] = 1
    prediction[0, 9, 9] = prediction[1, 8, 8] = 2     # corner neighbours: one component under 26-connectivity
    write(reference, tmp_path / "labels" / "v.nii.gz", (1.0, 1.0, 2.0))
    write(prediction, tmp_path / "predictions" / "v.nii.gz", (1.0, 1.0, 2.0))
    result = lesion_metrics(tmp_path / "predictions", tmp_path / "labels", {"a": 1, "b": 2}, ".nii.gz")
    a, b = result["classes"]["a"], result["classes"]["b"]
    assert result["unit"] == "mm^3"
    assert (a["reference_lesions"], a["detected"], a["predicted_components"], a["false_positives"]) == (2, 2, 4, 1)
    assert a["precision"] == pytest.approx(0.75) and a["recall"] == 1.0 and a["f1"] == pytest.approx(6 / 7)
    assert (b["reference_lesions"], b["detected"], b["predicted_components"], b["false_positives"]) == (1, 0, 1, 1)
    assert b["f1"] == 0.0
    assert result["size_bins"]["a"] == [round(16 + 38 / 3, 3), round(16 + 76 / 3, 3)]    # terciles of 16, 54
    cells = a["sensitivity_per_bin"]
    assert cells["< 28.667"]["detected"] == 1 and cells[">= 41.333"]["detected"] == 1
    assert math.isnan(cells["28.667-41.333"]["sensitivity"])
    per_slice = lesion_metrics(tmp_path / "predictions", tmp_path / "labels", {"a": 1, "b": 2}, ".nii.gz",
                               size_bins=[5], per_slice=True)
    a = per_slice["classes"]["a"]            # 2 + 3 slices of lesion; slice 6 of the second is missed
    assert per_slice["unit"] == "mm^2" and (a["reference_lesions"], a["detected"]) == (5, 3)
    assert {name: (cell["lesions"], cell["detected"]) for name, cell in a["sensitivity_per_bin"].items()} == \
        {"< 5": (2, 1), ">= 5": (3, 2)}                 # 4 mm^2 slices of the first lesion, 9 mm^2 of the second


def test_real_covid_labels_with_smallest_lesions_dropped(tmp_path, capsys):
    from nnunet_synth.dataset import RawDataset
    from nnunet_synth.dataset_tools.evaluate import main
    dataset = RawDataset(convert_example_subset(tmp_path / "raw", 601, "LesionMetrics"))
    lesion_class = max(dataset.labels, key=dataset.labels.get)
    value = dataset.labels[lesion_class]
    reader = dataset.reader_writer()
    predictions, total, dropped = tmp_path / "predictions", 0, 0
    predictions.mkdir()
    for case_id in dataset.case_ids:
        label_file = dataset.cases[case_id]["label"]
        segmentation, properties = reader.read_seg(str(label_file))
        components, count = ndimage.label(segmentation[0] == value, structure=SLICE_STRUCTURE)
        total += count
        if count >= 2:                       # the prediction misses the case's smallest lesion
            sizes = np.bincount(components.ravel())[1:]
            segmentation[0][components == 1 + int(np.argmin(sizes))] = 0
            dropped += 1
        reader.write_seg(segmentation[0], str(predictions / f"{case_id}{dataset.file_ending}"), properties)
    assert dropped > 0
    output = tmp_path / "lesions.json"
    code, out, _ = run_entry_point(main, ["lesions", predictions, dataset.folder / "labelsTr", "-d", dataset.folder,
                                          "-o", output], capsys)
    assert code == 0, out
    result = json.loads(output.read_text())
    metrics = result["classes"][lesion_class]
    assert result["unit"] == "mm^2" and result["connectivity"].endswith("per slice")
    assert metrics["reference_lesions"] == total and metrics["detected"] == total - dropped
    assert metrics["false_positives"] == 0 and metrics["precision"] == 1.0
    cells = list(metrics["sensitivity_per_bin"].values())
    assert cells[0]["sensitivity"] < cells[-1]["sensitivity"] == 1.0     # the dropped lesions are the small ones
    assert f"| {lesion_class} | {total} | {total - dropped} |" in out

    bad = tmp_path / "bad.json"
    for argv, message in ((["--bins", "200", "20"], "strictly increasing"),
                          (["--bins", "-1"], "positive"),
                          (["--bins", "x"], "must be numbers")):
        code, out, err = run_entry_point(main, ["lesions", predictions, dataset.folder / "labelsTr", "-d",
                                                dataset.folder, "-o", bad, *argv], capsys)
        assert code != 0 and message in err and not bad.exists()
        assert err.startswith("nnsynth: error:") and len(err.strip().splitlines()) == 1
    code, _, err = run_entry_point(main, ["lesions", tmp_path / "none", dataset.folder / "labelsTr", "-d",
                                          dataset.folder, "-o", bad], capsys)
    assert code != 0 and err.startswith("nnsynth: error:") and len(err.strip().splitlines()) == 1
    assert not bad.exists()


def test_downstream_runs_get_lesions_and_paired_differences(tmp_path):
    """Two stored arms (predictions kept, no lesions.json, as after a rerun of a finished experiment): each run gets
    its lesions.json with the experiment's bins, and the summary its per-lesion table and paired differences."""
    import csv

    from nnunet_synth.dataset import RawDataset
    from nnunet_synth.evaluation.downstream import SUMMARY_MD, write_outputs
    from nnunet_synth.evaluation.downstream_lesions import (
        BINS_FILE,
        LESION_DIFFERENCES_CSV,
        LESION_SUMMARY_CSV,
        write_run_lesions,
    )
    dataset = RawDataset(convert_example_subset(tmp_path / "raw", 602, "LesionRuns"))
    value = max(dataset.labels.values())
    lesion_class = max(dataset.labels, key=dataset.labels.get)
    reader = dataset.reader_writer()
    output = tmp_path / "evaluation"
    for arm, drop in (("real_only", True), ("copy_paste", False)):
        for repeat in (0, 1):
            folder = output / "runs" / "all" / (arm if arm == "real_only" else f"{arm}_x1") / f"repeat{repeat}"
            (folder / "predictions").mkdir(parents=True)
            cases = {}
            for case_id in dataset.case_ids:
                segmentation, properties = reader.read_seg(str(dataset.cases[case_id]["label"]))
                reference = segmentation[0] == value
                components, count = ndimage.label(reference, structure=SLICE_STRUCTURE)
                if drop and count >= 2:
                    smallest = 1 + int(np.argmin(np.bincount(components.ravel())[1:]))
                    segmentation[0][components == smallest] = 0
                predicted = segmentation[0] == value
                cases[case_id] = {lesion_class: 2 * float((reference & predicted).sum()) /
                                  max(1.0, float(reference.sum() + predicted.sum()))}
                reader.write_seg(segmentation[0], str(folder / "predictions" / f"{case_id}{dataset.file_ending}"),
                                 properties)
            run = {"setting": "all", "arm": arm, "label": folder.parent.name, "amount": 0.0 if drop else 1.0,
                   "ratio": 0.0 if drop else 0.5, "rare_oversampling": 0.0, "repeat": repeat, "seed": repeat,
                   "dataset": dataset.name, "fold": 0, "evaluated_on": "every case",
                   "mean": {lesion_class: float(np.mean([c[lesion_class] for c in cases.values()]))}, "cases": cases}
            (folder / "dice.json").write_text(json.dumps(run))
            write_run_lesions(dataset, folder, dataset.folder / "labelsTr", output)
    bins = json.loads((output / BINS_FILE).read_text())["size_bins"][lesion_class]
    assert len(bins) == 2 and bins[0] < bins[1]
    stored = output / "runs" / "all" / "real_only" / "repeat0" / "lesions.json"
    first = json.loads(stored.read_text())
    assert first["size_bins"][lesion_class] == bins and first["pooled"][lesion_class]["false_positives"] == 0
    stored.unlink()                           # a stored run without lesions.json gets it again, the same
    write_run_lesions(dataset, stored.parent, dataset.folder / "labelsTr", output)
    assert json.loads(stored.read_text()) == first
    write_outputs(output)
    with open(output / LESION_SUMMARY_CSV) as handle:
        summary = {(row["label"], row["class"]): row for row in csv.DictReader(handle)}
    small = f"{lesion_class}: sensitivity < {bins[0]:g}"
    assert float(summary[("copy_paste_x1", small)]["mean"]) == 1.0
    assert float(summary[("real_only", small)]["mean"]) < 1.0
    assert float(summary[("real_only", f"{lesion_class}: FP")]["mean"]) == 0.0
    with open(output / LESION_DIFFERENCES_CSV) as handle:
        differences = {(row["arm"], row["other"], row["class"]): row for row in csv.DictReader(handle)}
    assert float(differences[("copy_paste_x1", "real_only", small)]["diff"]) > 0
    assert float(differences[("copy_paste_x1", "real_only", f"{lesion_class}: FP")]["diff"]) == 0
    text = (output / SUMMARY_MD).read_text()
    assert "### Per-lesion metrics" in text and text.index("mean Dice") < text.index("### Per-lesion metrics")
    assert f"| all | copy_paste_x1 | {small} | 2 x " in text
