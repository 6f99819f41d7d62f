"""Per-lesion metrics of a prediction folder against its labels (2D and 3D), the view of small lesions that Dice
hides (FreeTumor, Nat Commun 2025; DiffTumor, CVPR 2024 report their gains as small-tumour sensitivity).

Per class, lesions are the connected components of the class's voxels with full connectivity (8 neighbours in
2D, 26 in 3D; ``scipy.ndimage.label``). Rule, fixed: a reference lesion is *detected* when at least one voxel of it
is predicted as the same class (any overlap with a predicted component). A predicted component that overlaps no
reference lesion of its class is a *false positive*. A reference lesion split into several predicted parts is one
detection and no false positive; a predicted component that spans two reference lesions detects both.

Sizes are physical (mm^2 for 2D cases, mm^3 for 3D), from the spacing nnU-Net's reader of the dataset's file ending
returns. Sensitivity is given per size bin: edges fixed once (``size_bins``, default the terciles of the reference
lesion sizes of the labels given to ``reference_size_bins``) and recorded in the output. Lesion-wise precision =
true-positive predicted components / predicted components, recall = detected / reference lesions, F1 their
harmonic mean; false positives per case = false-positive components / cases.
"""
from pathlib import Path

import numpy as np
from scipy import ndimage

from nnunet_synth.errors import NnsynthError

DETECTION_RULE = ("a reference lesion is detected when a predicted component of the same class overlaps it by at "
                  "least one voxel; a predicted component overlapping no reference lesion is a false positive")
CONNECTIVITY = "full (8 neighbours in 2D, 26 in 3D)"
LESIONS_FILE = "lesions.json"


def _reader(file_ending: str, example_file):
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending
    return determine_reader_writer_from_file_ending(file_ending, str(example_file), allow_nonmatching_filename=True,
                                                    verbose=False)()


def read_label_map(path, reader, per_slice: bool = False):
    """(integer label array without nnU-Net's channel axis, size of one pixel/voxel, unit). nnU-Net reads a 2D
    file as one slice (shape 1 x Y x X); its area is the product of the in-plane spacing. ``per_slice``: the file
    is a stack of independent slices (``nnsynth_unit`` "slice"), kept 3D and measured in mm^2."""
    segmentation, properties = reader.read_seg(str(path))
    array = np.asarray(segmentation[0]).astype(np.int64)
    spacing = [float(s) for s in properties["spacing"]]
    if array.shape[0] == 1:
        return array[0], float(np.prod(spacing[-2:])), "mm^2"
    if per_slice:
        return array, float(np.prod(spacing[-2:])), "mm^2"
    return array, float(np.prod(spacing)), "mm^3"


def _components(mask: np.ndarray, per_slice: bool = False):
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    if per_slice and mask.ndim == 3:        # no neighbours across the stacked slices
        structure[0] = structure[2] = False
    return ndimage.label(mask, structure=structure)


def case_lesions(reference: np.ndarray, prediction: np.ndarray, class_value: int, voxel_size: float,
                 per_slice: bool = False) -> dict:
    """One class of one case: reference lesion sizes, which are detected, predicted components, false positives."""
    if reference.shape != prediction.shape:
        raise NnsynthError(f"prediction shape {prediction.shape} differs from its label's {reference.shape}: "
                           f"predict the same cases the labels describe")
    reference_components, references = _components(reference == class_value, per_slice)
    predicted_components, predicted = _components(prediction == class_value, per_slice)
    sizes = np.bincount(reference_components.ravel(), minlength=references + 1)[1:]
    hit = reference_components[predicted_components > 0]
    detected = np.isin(np.arange(1, references + 1), hit)
    overlapping = np.unique(predicted_components[(predicted_components > 0) & (reference_components > 0)])
    return {"sizes": [float(size) * voxel_size for size in sizes],
            "detected": [bool(d) for d in detected], "predicted": int(predicted),
            "false_positives": int(predicted - overlapping.size)}


def bin_names(edges) -> list:
    edges = list(edges)
    if not edges:
        return ["all"]
    return [f"< {edges[0]:g}"] + [f"{low:g}-{high:g}" for low, high in zip(edges, edges[1:])] + [f">= {edges[-1]:g}"]


def check_size_bins(edges, option="--bins"):
    """Edges (numbers or their text) must be positive and strictly increasing."""
    try:
        edges = [float(edge) for edge in edges]
    except (TypeError, ValueError):
        raise NnsynthError(f"{option} {' '.join(map(str, edges))}: size-bin edges must be numbers (mm^2 / mm^3), "
                           f"e.g. {option} 20 200") from None
    if any(not np.isfinite(edge) or edge <= 0 for edge in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise NnsynthError(f"{option} {' '.join(f'{e:g}' for e in edges)}: size-bin edges must be positive and "
                           f"strictly increasing (mm^2 / mm^3), e.g. {option} 20 200")
    return edges


def _bin_index(size: float, edges) -> int:
    return int(np.searchsorted(edges, size, side="right"))


def _f1(precision, recall) -> float:
    if np.isnan(precision) or np.isnan(recall) or precision + recall == 0:
        return float("nan") if np.isnan(precision) and np.isnan(recall) else 0.0
    return 2 * precision * recall / (precision + recall)


def _ratio(numerator, denominator) -> float:
    return numerator / denominator if denominator else float("nan")


def class_summary(records: list, edges, cases: int) -> dict:
    """Pooled metrics of one class over ``records`` (outputs of ``case_lesions``)."""
    sizes = [size for record in records for size in record["sizes"]]
    detected = [flag for record in records for flag in record["detected"]]
    predicted = sum(record["predicted"] for record in records)
    false_positives = sum(record["false_positives"] for record in records)
    per_bin = {}
    for index, name in enumerate(bin_names(edges)):
        flags = [flag for size, flag in zip(sizes, detected) if _bin_index(size, edges) == index]
        per_bin[name] = {"lesions": len(flags), "detected": int(sum(flags)),
                         "sensitivity": _ratio(sum(flags), len(flags))}
    precision, recall = _ratio(predicted - false_positives, predicted), _ratio(sum(detected), len(detected))
    return {"reference_lesions": len(sizes), "detected": int(sum(detected)), "predicted_components": predicted,
            "false_positives": false_positives, "fp_per_case": _ratio(false_positives, cases),
            "precision": precision, "recall": recall, "f1": _f1(precision, recall), "sensitivity_per_bin": per_bin}


def reference_size_bins(label_files, reader, class_values: dict, quantiles=(1 / 3, 2 / 3),
                        per_slice: bool = False) -> dict:
    """Per class: the bin edges at ``quantiles`` (default terciles) of the reference lesion sizes in
    ``label_files``; a class with no lesion gets no edges (one bin)."""
    sizes = {name: [] for name in class_values}
    for path in label_files:
        array, voxel_size, _ = read_label_map(path, reader, per_slice)
        for name, value in class_values.items():
            components, count = _components(array == value, per_slice)
            if count:
                sizes[name] += list(np.bincount(components.ravel())[1:] * voxel_size)
    return {name: sorted({round(float(edge), 3) for edge in np.quantile(values, quantiles)}) if values else []
            for name, values in sizes.items()}


def _paired_files(prediction_folder: Path, label_folder: Path, file_ending: str) -> list:
    if not prediction_folder.is_dir():
        raise NnsynthError(f"{prediction_folder}: no such prediction folder: pass the folder of predicted label maps")
    if not label_folder.is_dir():
        raise NnsynthError(f"{label_folder}: no such label folder: pass the folder of reference label maps")
    predictions = sorted(prediction_folder.glob("*" + file_ending))
    if not predictions:
        raise NnsynthError(f"{prediction_folder}: holds no prediction ending in {file_ending}: pass the folder "
                           f"nnUNetv2_predict wrote, or the dataset whose file ending it uses")
    missing = [p.name for p in predictions if not (label_folder / p.name).is_file()]
    if missing:
        raise NnsynthError(f"{label_folder / missing[0]}: no reference label for prediction {missing[0]}: pass the "
                           f"label folder of the predicted cases")
    return [(p.name[:-len(file_ending)], p, label_folder / p.name) for p in predictions]


def lesion_metrics(prediction_folder, label_folder, labels: dict, file_ending: str, size_bins=None,
                   per_slice: bool = False) -> dict:
    """Per-lesion metrics of every prediction in ``prediction_folder`` against the same-named file in
    ``label_folder``. ``labels``: class name -> label value (background left out); ``size_bins``: one list of
    edges for every class, or class name -> edges; None = terciles of these reference lesions (recorded);
    ``per_slice``: 3D files are stacks of independent 2D slices (components and sizes per slice)."""
    prediction_folder, label_folder = Path(prediction_folder), Path(label_folder)
    classes = {name: int(value) for name, value in labels.items() if int(value) != 0}
    if isinstance(size_bins, dict):
        edges = {name: check_size_bins(size_bins.get(name, []), "size_bins") for name in classes}
    elif size_bins is not None:
        edges = {name: check_size_bins(size_bins, "size_bins") for name in classes}
    files = _paired_files(prediction_folder, label_folder, file_ending)
    reader = _reader(file_ending, files[0][2])
    if size_bins is None:
        edges = reference_size_bins([label for _, _, label in files], reader, classes, per_slice=per_slice)
    per_case, records, unit = {}, {name: [] for name in classes}, None
    for case_id, prediction_file, label_file in files:
        reference, voxel_size, unit = read_label_map(label_file, reader, per_slice)
        prediction, _, _ = read_label_map(prediction_file, reader, per_slice)
        per_case[case_id] = {}
        for name, value in classes.items():
            record = case_lesions(reference, prediction, value, voxel_size, per_slice)
            records[name].append(record)
            per_case[case_id][name] = {**class_summary([record], edges[name], 1), "sizes": record["sizes"]}
    return {"rule": DETECTION_RULE, "connectivity": CONNECTIVITY + (", per slice" if per_slice else ""),
            "unit": unit, "size_bins": edges,
            "cases": len(files), "classes": {name: class_summary(records[name], edges[name], len(files))
                                              for name in classes},
            "per_case": per_case}


def dataset_lesion_metrics(prediction_folder, label_folder, dataset, size_bins=None) -> dict:
    """``lesion_metrics`` with the labels and file ending of a ``RawDataset``; a dataset of stacked slices
    (``nnsynth_unit`` "slice") is measured per slice."""
    labels = {name: value for name, value in dataset.labels.items()
              if value != 0 and value != dataset.ignore_label}
    return lesion_metrics(prediction_folder, label_folder, labels, dataset.file_ending, size_bins,
                          per_slice=dataset.declared_unit == "slice")


def dataset_size_bins(dataset, case_ids=None) -> dict:
    """Per class: tercile edges of the real lesions of ``case_ids`` (default every case) of a ``RawDataset``."""
    case_ids = dataset.case_ids if case_ids is None else case_ids
    files = [Path(dataset.cases[case_id]["label"]) for case_id in case_ids]
    labels = {name: value for name, value in dataset.labels.items()
              if value != 0 and value != dataset.ignore_label}
    return reference_size_bins(files, _reader(dataset.file_ending, files[0]), labels,
                               per_slice=dataset.declared_unit == "slice")


def per_case_values(result: dict) -> dict:
    """Case -> {metric: value} for the bootstrap of ``statistics.py``: per class, sensitivity in each size bin
    (NaN where the case has no lesion of that bin), false-positive components and lesion F1 (NaN where the case
    has neither reference nor predicted lesions)."""
    values = {}
    for case_id, classes in result["per_case"].items():
        row = {}
        for name, metrics in classes.items():
            for bin_name, cell in metrics["sensitivity_per_bin"].items():
                row[f"{name}: sensitivity {bin_name}"] = cell["sensitivity"]
            row[f"{name}: FP"] = float(metrics["false_positives"])
            row[f"{name}: lesion F1"] = metrics["f1"]
        values[case_id] = {key: (None if np.isnan(value) else value) for key, value in row.items()}
    return values


def format_lesion_table(result: dict) -> str:
    """The pooled metrics of ``lesion_metrics`` as a markdown table, one row per class."""
    lines = [f"Rule: {result['rule']}; connectivity {result['connectivity']}; sizes in {result['unit']}; "
             f"{result['cases']} cases.", "",
             "| class | reference lesions | detected | sensitivity per size bin | FP components | FP per case | "
             "precision | recall | lesion F1 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, metrics in result["classes"].items():
        bins = "; ".join(f"{bin_name}: {cell['detected']}/{cell['lesions']}"
                         for bin_name, cell in metrics["sensitivity_per_bin"].items())
        lines.append(f"| {name} | {metrics['reference_lesions']} | {metrics['detected']} | {bins} | "
                     f"{metrics['false_positives']} | {metrics['fp_per_case']:.2f} | {metrics['precision']:.3f} | "
                     f"{metrics['recall']:.3f} | {metrics['f1']:.3f} |")
    return "\n".join(lines)
