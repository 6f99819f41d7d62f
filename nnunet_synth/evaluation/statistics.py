"""Summary of repeated downstream runs: mean, spread and bootstrap intervals per arm, and paired differences
between arms.

Input: one ``dice.json`` per run (setting, arm, repeat, Dice per test case and class). For an arm of a setting the
runs form a matrix D[run, case] per class. The mean is the mean over all entries (NaN, a class absent from both
the reference and the prediction of a case, is left out); ``sd`` is the standard deviation over runs of each run's
mean. The 95 % interval is a percentile bootstrap that resamples runs and test cases, both with replacement
(2000 resamples, seeded). The difference of an arm to real-only is paired: run r of the arm with run r of
real-only (same seed), case c with case c, so D_arm - D_real is resampled the same way. The differences table
(``compare_arms``) does the same for any two arms of a setting (default: every synthetic arm against copy-paste,
and every arm against real-only); only repeats and test cases both arms have are paired.
"""
import json
import zlib
from pathlib import Path

import numpy as np

DICE_FILE = "dice.json"
REFERENCE_ARM = "real_only"
COMPARED_ARM = "copy_paste"         # the generator-free baseline every synthetic arm is compared with by default
REAL_ARMS = ("real_only", "oversample", "copy_paste_online")     # no synthetic cases
DIFFERENCE_COLUMNS = ["setting", "arm", "other", "class", "runs", "cases", "diff", "diff_low", "diff_high",
                      "reading"]
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
            rng = np.random.default_rng([seed, len(rows)])     # the arm's interval, then its difference's
            matrix, repeats, cases = dice_matrix(arm_runs, class_name)
            run_means = [_nanmean(row) for row in matrix]
            low, high = bootstrap_interval(matrix, rng, samples)
            row = {"setting": setting, "arm": arm_runs[0]["arm"], "label": label, "class": class_name,
                   "runs": len(repeats), "cases": len(cases), "mean": _nanmean(matrix),
                   "sd": float(np.std(run_means, ddof=1)) if len(run_means) > 1 else float("nan"),
                   "ci_low": low, "ci_high": high,
                   "diff": float("nan"), "diff_low": float("nan"), "diff_high": float("nan")}
            if reference is not None and label != REFERENCE_ARM:
                difference = paired_difference(arm_runs, reference, class_name, rng, samples)
                row.update({key: difference[key] for key in ("diff", "diff_low", "diff_high")})
            rows.append(row)
    return rows


def paired_difference(runs: list, other_runs: list, class_name: str, rng: np.random.Generator,
                      samples=BOOTSTRAP_SAMPLES) -> dict:
    """Mean of D_arm - D_other over the paired entries (run r with run r of the same repeat, i.e. the same seed;
    case c with case c) and its bootstrap interval; NaN when no repeat or case is shared."""
    cases = sorted(set(runs[0]["cases"]) & set(other_runs[0]["cases"]))
    result = {"runs": 0, "cases": len(cases), "diff": float("nan"), "diff_low": float("nan"),
              "diff_high": float("nan")}
    if not cases:
        return result
    matrix, repeats, _ = dice_matrix(runs, class_name, cases)
    other, other_repeats, _ = dice_matrix(other_runs, class_name, cases)
    shared = [r for r in repeats if r in other_repeats]
    if not shared:
        return result
    difference = matrix[[repeats.index(r) for r in shared]] - other[[other_repeats.index(r) for r in shared]]
    low, high = bootstrap_interval(difference, rng, samples)
    return {**result, "runs": len(shared), "diff": _nanmean(difference), "diff_low": low, "diff_high": high}


def _matches(run: dict, name: str) -> bool:
    return name in (run["arm"], run["label"])


def _amounts_pair(first: dict, second: dict, pair) -> bool:
    """Two labels of a pair of arm names are compared at the same amount (or one of them has no synthetic cases);
    a pair of labels is compared as named."""
    if first["label"] in pair and second["label"] in pair:
        return True
    return (first["amount"] == second["amount"] or first["arm"] in REAL_ARMS or second["arm"] in REAL_ARMS)


def default_pairs(runs: list) -> list:
    """Every synthetic arm against copy-paste (when it ran), then every arm against real-only."""
    arms = list(dict.fromkeys(run["arm"] for run in sorted(runs, key=arm_order)))
    pairs = [(arm, COMPARED_ARM) for arm in arms if arm not in REAL_ARMS and arm != COMPARED_ARM
             and COMPARED_ARM in arms]
    return pairs + [(arm, REFERENCE_ARM) for arm in arms if arm != REFERENCE_ARM and REFERENCE_ARM in arms]


def compare_arms(runs: list, summary: list, pairs=None, seed: int = 0, samples=BOOTSTRAP_SAMPLES) -> list:
    """One row per (setting, arm label, other arm label, class) of the ``pairs`` of arm names or labels (default:
    ``default_pairs``): the paired difference arm - other, its interval and its reading. A difference to real-only
    is the summary's own (one figure per pair); any other pair is resampled with a generator seeded by the pair, so
    that B - A is exactly the negation of A - B."""
    pairs = default_pairs(runs) if pairs is None else [tuple(pair) for pair in pairs]
    classes = list(dict.fromkeys(name for run in runs for name in run["mean"]))
    groups = {}
    for run in sorted(runs, key=lambda run: (run["setting"], arm_order(run), run["repeat"])):
        groups.setdefault((run["setting"], run["label"]), []).append(run)
    summary_rows = {(row["setting"], row["label"], row["class"]): row for row in summary}
    rows, done = [], set()
    for setting in dict.fromkeys(key[0] for key in groups):
        labels = [label for s, label in groups if s == setting]
        for pair in pairs:
            for label in labels:
                first = groups[(setting, label)][0]
                if not _matches(first, pair[0]):
                    continue
                for other_label in labels:
                    second = groups[(setting, other_label)][0]
                    if other_label == label or not _matches(second, pair[1]) or not _amounts_pair(first, second, pair):
                        continue
                    if (setting, label, other_label) in done:
                        continue
                    done.add((setting, label, other_label))
                    for class_name in classes:
                        rows.append(_difference_row(groups, summary_rows, setting, label, other_label, class_name,
                                                    seed, samples))
    return rows


def _difference_row(groups, summary_rows, setting, label, other_label, class_name, seed, samples) -> dict:
    runs, other_runs = groups[(setting, label)], groups[(setting, other_label)]
    row = {"setting": setting, "arm": label, "other": other_label, "class": class_name}
    shared = sorted({run["repeat"] for run in runs} & {run["repeat"] for run in other_runs})
    cases = set(runs[0]["cases"]) & set(other_runs[0]["cases"])
    if REFERENCE_ARM in (label, other_label) and (setting, label, class_name) in summary_rows \
            and (setting, other_label, class_name) in summary_rows:
        arm = other_label if label == REFERENCE_ARM else label
        reference = summary_rows[(setting, arm, class_name)]
        difference = {key: reference[key] for key in ("diff", "diff_low", "diff_high")}
        if label == REFERENCE_ARM:
            difference = _negated(difference)
        difference.update(runs=len(shared), cases=len(cases))
    else:
        ordered = sorted((label, other_label))
        key = zlib.crc32("\0".join([setting, *ordered, class_name]).encode())
        rng = np.random.default_rng([seed, key])
        if [label, other_label] == ordered:
            difference = paired_difference(runs, other_runs, class_name, rng, samples)
        else:                                   # the resamples of other - arm, negated
            difference = _negated(paired_difference(other_runs, runs, class_name, rng, samples))
    row.update({key: difference[key] for key in ("runs", "cases", "diff", "diff_low", "diff_high")})
    row["reading"] = verdict(row)
    return row


def _negated(difference: dict) -> dict:
    return {**difference, "diff": -difference["diff"], "diff_low": -difference["diff_high"],
            "diff_high": -difference["diff_low"]}


ARM_ORDER = ("real_only", "oversample", "copy_paste_online", "copy_paste", "mat", "cbmat", "inpaint")


def arm_order(run: dict):
    arm = run["arm"]
    return (ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER), run["label"])


def verdict(row: dict) -> str:
    """'higher' / 'lower' when the difference's interval excludes 0, else 'not different'."""
    if np.isnan(row["diff_low"]):
        return ""
    if row["diff_low"] > 0:
        return "higher"
    if row["diff_high"] < 0:
        return "lower"
    return "not different"


def markdown_summary(rows: list, value_name: str = "mean Dice") -> str:
    header = ["setting", "arm", "class", "runs x cases", value_name, "sd (runs)", "95 % interval",
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


def _difference_text(row: dict) -> str:
    return "" if np.isnan(row["diff"]) else f"{row['diff']:+.3f} [{row['diff_low']:+.3f}, {row['diff_high']:+.3f}]"


def markdown_differences(rows: list) -> str:
    """The paired differences (``compare_arms``) as a markdown table under its heading."""
    header = ["setting", "arm", "compared with", "class", "paired runs x cases", "difference [95 % interval]",
              "reading"]
    lines = ["### Paired differences between arms", "",
             "arm - compared with: run r with run r (same seed), test case c with case c; 95 % bootstrap interval "
             "over the paired runs and cases; higher / lower when the interval excludes 0.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([row["setting"], row["arm"], row["other"], row["class"],
                                        f"{row['runs']} x {row['cases']}", _difference_text(row),
                                        row["reading"]]) + " |")
    if not rows:
        lines.append("| " + " | ".join(["no pair of arms ran"] + [""] * (len(header) - 1)) + " |")
    return "\n".join(lines)


def _loads_text(per_map_load) -> str:
    """Per pathology class: the real lesion-bearing maps' and the new maps' load (share of the region), p50 / p90."""
    def quantiles(q):
        return "-" if not q else f"{100 * q['p50']:.1f} / {100 * q['p90']:.1f} %"
    return "; ".join(f"class {value}: real {quantiles(loads['real'])}, new {quantiles(loads['new'])}"
                     for value, loads in (per_map_load or {}).items())


def markdown_pass_rates(records: list) -> str:
    """Each synthetic arm's model-free gate pass rate and its maps' per-map loads (records of
    ``downstream.write_pass_rate``)."""
    lines = ["### Model-free gate and per-map loads", "", "Share of each synthetic arm's cases that pass the "
             "model-free gate (docs/quality.md), from the arm's synthetic store; the arms train on every case, passed "
             "or not. Per-map load: a pathology class's share of the map's region (p50 / p90) over the real maps "
             "holding it and over the arm's new maps (docs/label-maps.md).", "",
             "| setting | arm | synthetic cases | scored | passed | pass rate | per-map load |",
             "|---|---|---|---|---|---|---|"]
    for record in sorted(records, key=lambda record: (record["setting"], arm_order(record))):
        rate = record["model_free"]
        share = f"{rate['passed'] / rate['scored']:.1%}" if rate["scored"] else ""
        lines.append(f"| {record['setting']} | {record['label']} | {rate['cases']} | {rate['scored']} | "
                     f"{rate['passed']} | {share} | {_loads_text(record.get('per_map_load'))} |")
    if not records:
        lines.append("| no synthetic arm ran | | | | | | |")
    return "\n".join(lines)
