"""Summary of repeated downstream runs: mean, spread and bootstrap intervals per arm and per difference to real-only.

Input: one ``dice.json`` per run (setting, arm, repeat, Dice per test case and class). For an arm of a setting the
runs form a matrix D[run, case] per class. The mean is the mean over all entries (NaN, a class absent from both
the reference and the prediction of a case, is left out); ``sd`` is the standard deviation over runs of each run's
mean. The 95 % interval is a percentile bootstrap that resamples runs and test cases, both with replacement
(2000 resamples, seeded). The difference of an arm to real-only is paired: run r of the arm with run r of
real-only (same seed), case c with case c, so D_arm - D_real is resampled the same way.
"""
import json
from pathlib import Path

import numpy as np

DICE_FILE = "dice.json"
REFERENCE_ARM = "real_only"
BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95


def load_runs(runs_folder) -> list:
    """Every ``dice.json`` under ``runs_folder`` (sorted by path)."""
    return [json.loads(path.read_text()) for path in sorted(Path(runs_folder).rglob(DICE_FILE))]


def dice_matrix(runs: list, class_name: str, cases=None):
    """(matrix [run, case], repeats, cases) of one arm's runs, runs ordered by repeat."""
    runs = sorted(runs, key=lambda run: run["repeat"])
    cases = sorted(runs[0]["cases"]) if cases is None else cases
    matrix = np.array([[run["cases"][case][class_name] if run["cases"][case][class_name] is not None else np.nan
                        for case in cases] for run in runs], dtype=float)
    return matrix, [run["repeat"] for run in runs], cases


def bootstrap_interval(matrix: np.ndarray, rng: np.random.Generator, samples=BOOTSTRAP_SAMPLES,
                       confidence=CONFIDENCE):
    """Percentile interval of the mean of ``matrix`` [run, case], resampling runs and cases with replacement."""
    runs, cases = matrix.shape
    rows = rng.integers(runs, size=(samples, runs))
    columns = rng.integers(cases, size=(samples, cases))
    resampled = matrix[rows[:, :, None], columns[:, None, :]]
    with np.errstate(invalid="ignore"), _ignore_empty_mean():
        means = np.nanmean(resampled.reshape(samples, -1), axis=1)
    means = means[~np.isnan(means)]
    if means.size == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


class _ignore_empty_mean:
    def __enter__(self):
        import warnings
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


def _nanmean(values) -> float:
    with _ignore_empty_mean():
        return float(np.nanmean(values))


def summarize_runs(runs: list, seed: int = 0, samples=BOOTSTRAP_SAMPLES) -> list:
    """One row per (setting, arm label, class): runs, cases, mean, sd, interval, and the paired difference to the
    setting's real-only arm with its interval. Deterministic for a seed."""
    classes = list(dict.fromkeys(name for run in runs for name in run["mean"]))     # label order
    groups = {}
    for run in runs:
        groups.setdefault((run["setting"], run["label"]), []).append(run)
    rows = []
    for (setting, label), arm_runs in sorted(groups.items(), key=lambda item: (item[0][0], arm_order(item[1][0]))):
        reference = groups.get((setting, REFERENCE_ARM))
        for class_name in classes:
            rng = np.random.default_rng([seed, len(rows)])
            matrix, repeats, cases = dice_matrix(arm_runs, class_name)
            run_means = [_nanmean(row) for row in matrix]
            low, high = bootstrap_interval(matrix, rng, samples)
            row = {"setting": setting, "arm": arm_runs[0]["arm"], "label": label, "class": class_name,
                   "runs": len(repeats), "cases": len(cases), "mean": _nanmean(matrix),
                   "sd": float(np.std(run_means, ddof=1)) if len(run_means) > 1 else float("nan"),
                   "ci_low": low, "ci_high": high,
                   "diff": float("nan"), "diff_low": float("nan"), "diff_high": float("nan")}
            if reference is not None and label != REFERENCE_ARM:
                ref_matrix, ref_repeats, _ = dice_matrix(reference, class_name, cases)
                paired = [ref_repeats.index(r) for r in repeats if r in ref_repeats]
                mine = [repeats.index(r) for r in repeats if r in ref_repeats]
                if paired:
                    difference = matrix[mine] - ref_matrix[paired]
                    row["diff"] = _nanmean(difference)
                    row["diff_low"], row["diff_high"] = bootstrap_interval(difference, rng, samples)
            rows.append(row)
    return rows


ARM_ORDER = ("real_only", "oversample", "copy_paste_online", "copy_paste", "mat", "cbmat")


def arm_order(run: dict):
    arm = run["arm"]
    return (ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER), run["label"])


def verdict(row: dict) -> str:
    """'higher' / 'lower' when the difference's interval excludes 0, else 'no difference shown'."""
    if np.isnan(row["diff_low"]):
        return ""
    if row["diff_low"] > 0:
        return "higher"
    if row["diff_high"] < 0:
        return "lower"
    return "not different"


def markdown_summary(rows: list) -> str:
    header = ["setting", "arm", "class", "runs x cases", "mean Dice", "sd (runs)", "95 % interval",
              "difference to real only [95 % interval]", "beyond the interval?"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        difference = "" if np.isnan(row["diff"]) else \
            f"{row['diff']:+.3f} [{row['diff_low']:+.3f}, {row['diff_high']:+.3f}]"
        sd = "" if np.isnan(row["sd"]) else f"{row['sd']:.3f}"
        lines.append("| " + " | ".join([row["setting"], row["label"], row["class"], f"{row['runs']} x {row['cases']}",
                                        f"{row['mean']:.3f}", sd, f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]",
                                        difference, verdict(row)]) + " |")
    return "\n".join(lines)
