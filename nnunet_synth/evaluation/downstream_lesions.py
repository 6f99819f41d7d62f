"""Per-lesion metrics of the downstream runs (``lesions.py``): one ``lesions.json`` beside each run's
``dice.json``, from the run's kept predictions, with size bins fixed once per experiment (``lesion_bins.json``,
terciles of the real lesions of every case of the dataset); per arm and paired between arms with the bootstrap of
``statistics.py`` (``lesion_summary.csv``, ``lesion_differences.csv``, a section of ``summary.md``)."""
import json
from pathlib import Path

import numpy as np

from nnunet_synth.atomic import write_json_atomic
from nnunet_synth.evaluation.lesions import (
    CONNECTIVITY,
    DETECTION_RULE,
    LESIONS_FILE,
    dataset_lesion_metrics,
    dataset_size_bins,
    per_case_values,
)
from nnunet_synth.evaluation.statistics import (
    DICE_FILE,
    DIFFERENCE_COLUMNS,
    compare_arms,
    markdown_differences,
    markdown_summary,
    summarize_runs,
)

BINS_FILE = "lesion_bins.json"
LESION_SUMMARY_CSV, LESION_DIFFERENCES_CSV = "lesion_summary.csv", "lesion_differences.csv"
RUN_KEYS = ("setting", "arm", "label", "amount", "repeat", "seed", "dataset", "fold", "evaluated_on")


def experiment_size_bins(dataset, output_folder: Path) -> dict:
    """The experiment's size bins: read from ``lesion_bins.json``, or fixed now from the dataset's real lesions."""
    path = Path(output_folder) / BINS_FILE
    if path.is_file():
        return json.loads(path.read_text())["size_bins"]
    bins = dataset_size_bins(dataset)
    write_json_atomic({"size_bins": bins, "from": f"terciles of the lesion sizes of every case of {dataset.name}",
                       "rule": DETECTION_RULE, "connectivity": CONNECTIVITY}, path)
    return bins


def write_run_lesions(dataset, run_folder: Path, label_folder: Path, output_folder: Path):
    """``lesions.json`` of a run whose predictions are kept and that has none yet (a rerun of a stored experiment
    computes it without retraining)."""
    run_folder = Path(run_folder)
    predictions = run_folder / "predictions"
    if (run_folder / LESIONS_FILE).is_file() or not (run_folder / DICE_FILE).is_file() or not predictions.is_dir():
        return
    run = json.loads((run_folder / DICE_FILE).read_text())
    result = dataset_lesion_metrics(predictions, label_folder, dataset, experiment_size_bins(dataset, output_folder))
    cases = per_case_values(result)
    metrics = list(dict.fromkeys(key for row in cases.values() for key in row))
    with np.errstate(invalid="ignore"):
        means = {key: _nanmean([row[key] for row in cases.values()]) for key in metrics}
    write_json_atomic({key: run[key] for key in RUN_KEYS if key in run}
                      | {"mean": means, "cases": cases, "pooled": result["classes"], "size_bins": result["size_bins"],
                         "unit": result["unit"], "rule": result["rule"], "connectivity": result["connectivity"]},
                      run_folder / LESIONS_FILE)


def _nanmean(values):
    values = [value for value in values if value is not None]
    return float(np.mean(values)) if values else None


def write_lesion_outputs(output_folder: Path, compare, write_rows_csv) -> str:
    """``lesion_summary.csv`` and ``lesion_differences.csv`` from the runs' ``lesions.json``; returns the markdown
    section of ``summary.md`` ('' when no run has one)."""
    output_folder = Path(output_folder)
    runs = [json.loads(path.read_text()) for path in sorted((output_folder / "runs").rglob(LESIONS_FILE))]
    if not runs:
        return ""
    for run in runs:       # the summary reads a missing mean (no case with a lesion of that bin) as NaN
        run["mean"] = {key: (float("nan") if value is None else value) for key, value in run["mean"].items()}
    summary = summarize_runs(runs)
    rounded = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in summary]
    write_rows_csv(rounded, output_folder / LESION_SUMMARY_CSV)
    differences = compare_arms(runs, summary, compare)
    write_rows_csv([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in differences],
                   output_folder / LESION_DIFFERENCES_CSV, DIFFERENCE_COLUMNS)
    bins = runs[0]["size_bins"]
    text = ["### Per-lesion metrics", "",
            f"{runs[0]['rule']}; connectivity {runs[0]['connectivity']}. Per test case: sensitivity in each size "
            f"bin ({runs[0]['unit']}; edges " + "; ".join(f"{name}: {', '.join(f'{e:g}' for e in edges) or 'none'}"
                                                          for name, edges in bins.items())
            + f", from {BINS_FILE}), false-positive components (FP) and lesion-wise F1; mean over runs and cases "
            "(cases without a lesion of a bin left out), intervals and differences as for Dice.", "",
            markdown_summary(summary, value_name="mean"), "", markdown_differences(differences)]
    return "\n".join(text)
