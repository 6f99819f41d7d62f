"""The segmentation gate (DiffAug §3.3, eq. 14): score synthetic pairs with an nnU-Net model trained on real data.

Each synthetic case made for fold k is segmented by the model's fold k, which was trained on fold k's training
cases only: a model of another fold saw fold k's validation cases, and filtering fold k's training data on its
scores would carry them in. The per-class Dice and IoU between the prediction and the label map the image was
generated from go into the manifest under ``quality.segmentation``::

    {"mean_dice": mean Dice over foreground classes present in label or prediction,
     "mean_iou": ..., "dice": {class name: Dice or null}, "iou": {...},
     "pathology_iou": {pathology class name: IoU or null}, "min_pathology_iou": the lowest of them,
     "threshold": 0.7, "passed": min_pathology_iou > threshold, "model": ..., "model_fold": "k", "checkpoint": ...}

The gate is the IoU between the intended *abnormality* mask and the prediction, per pathology class, keep if
> 0.7. The mean Dice over all classes is kept for reference, but it is not the gate: a dominant healthy class hides
a missed lesion. ``calibrate_on_real_validation`` reports the same per-class IoU on the real validation slices
of the model's fold, so that a threshold can be chosen against what the model achieves on real data. The store
is passed in (``writer.SyntheticStore``): this stage reads and updates it but does not import the writer.
"""
from pathlib import Path

import numpy as np

from nnunet_synth.atomic import write_json_atomic
from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.dataset.splits import fold_training_cases
from nnunet_synth.errors import NnsynthError

DEFAULT_IOU_THRESHOLD = 0.7   # DiffAug (§3.3)


def overlap_scores(prediction: np.ndarray, label_map: np.ndarray, labels: dict, pathology_names=(),
                   threshold: float = DEFAULT_IOU_THRESHOLD, ignore_label=None) -> dict:
    """Per-class Dice and IoU of ``prediction`` against ``label_map`` for the foreground ``labels`` (name->value),
    and the gate on the IoU of the pathology classes ``pathology_names``. Pixels of ``ignore_label`` are not
    annotated: they are left out, as nnU-Net's own evaluation does."""
    dice, iou = {}, {}
    annotated = np.ones(label_map.shape, dtype=bool) if ignore_label is None else label_map != ignore_label
    for name, value in labels.items():
        if value == 0 or value == ignore_label:
            continue
        predicted, reference = (prediction == value) & annotated, label_map == value
        tp = int(np.count_nonzero(predicted & reference))
        fp = int(np.count_nonzero(predicted & ~reference))
        fn = int(np.count_nonzero(~predicted & reference))
        if tp + fp + fn == 0:
            dice[name] = iou[name] = None
        else:
            dice[name] = 2 * tp / (2 * tp + fp + fn)
            iou[name] = tp / (tp + fp + fn)
    defined = [value for value in dice.values() if value is not None]
    defined_iou = [value for value in iou.values() if value is not None]
    pathology_iou = {name: iou[name] for name in pathology_names}
    defined_pathology = [value for value in pathology_iou.values() if value is not None]
    min_pathology_iou = float(min(defined_pathology)) if defined_pathology else None
    return {"mean_dice": float(np.mean(defined)) if defined else None,
            "mean_iou": float(np.mean(defined_iou)) if defined_iou else None,
            "dice": dice, "iou": iou, "pathology_iou": pathology_iou, "min_pathology_iou": min_pathology_iou,
            "threshold": float(threshold),
            "passed": None if min_pathology_iou is None else bool(min_pathology_iou > threshold)}


def pathology_class_names(dataset: RawDataset, store, names=None, fold=None) -> list:
    """Pathology classes to gate on: ``names``, else those of fold ``fold``'s label-map report (of any fold's when
    ``fold`` is None), else every foreground class."""
    if names:
        unknown = [name for name in names
                   if name not in dataset.labels or dataset.labels[name] in (0, dataset.ignore_label)]
        if unknown:
            raise NnsynthError(f"{dataset.json_file}: --pathology-classes {unknown} are not foreground labels "
                               f"(labels: {list(dataset.labels)})")
        return list(names)
    folds = store.manifest["folds"]
    records = [folds.get(str(fold), {})] if fold is not None else list(folds.values())
    reported = [value for record in records
                for value in (record.get("label_map_report") or {}).get("pathology_classes") or []]
    values = sorted(set(reported)) if reported else None
    if values is None:
        values = [value for value in dataset.annotated_labels if value != 0]
    return [name for name, value in dataset.labels.items() if value in values]


def _make_predictor(model_folder: Path, folds, checkpoint: str):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), folds, checkpoint_name=checkpoint)
    if not predictor.list_of_parameters:
        raise NnsynthError(f"no fold of {model_folder} has {checkpoint}: train the model first or give -f/-chk")
    return predictor


def _check_model_folder(model_folder: Path):
    if not (model_folder / "plans.json").is_file() or not (model_folder / "dataset.json").is_file():
        raise NnsynthError(f"{model_folder} is not an nnU-Net model folder (plans.json/dataset.json missing): give "
                           f"$nnUNet_results/<Dataset>/<Trainer>__<Plans>__<configuration>")


def score_synthetic_cases(store, model_folder, folds=None, checkpoint: str = "checkpoint_final.pth",
                          log=print, threshold: float = DEFAULT_IOU_THRESHOLD, pathology_names=None) -> dict:
    """Predict the complete synthetic cases of ``store`` (a ``writer.SyntheticStore``; of ``folds``, default all)
    with the model's fold of each case, write quality.segmentation; return the scores per case."""
    dataset = store.dataset
    model_folder = Path(model_folder)
    _check_model_folder(model_folder)
    if model_folder.name.startswith("nnUNetTrainerSynthMix") and "_r0__" not in model_folder.name:
        log(f"warning: {model_folder.name} was trained with synthetic cases; scores from a real-only model are "
            f"the intended quality gate")
    wanted_folds = None if folds is None else {str(fold) for fold in folds}
    case_ids = [case_id for case_id in store.complete_case_ids()
                if wanted_folds is None or str(store.cases[case_id].get("fold")) in wanted_folds]
    if not case_ids:
        raise NnsynthError(f"{dataset.name} has no synthetic case to score ({store.manifest_file}"
                           f"{'' if wanted_folds is None else ', folds ' + ' '.join(sorted(wanted_folds))}): "
                           f"generate first")
    by_fold = {}
    for case_id in case_ids:
        by_fold.setdefault(str(store.cases[case_id].get("fold")), []).append(case_id)

    results, missing_folds = {}, []
    for fold, fold_case_ids in sorted(by_fold.items()):
        if not (model_folder / f"fold_{fold}" / checkpoint).is_file():
            missing_folds.append(fold)
            log(f"not scoring the {len(fold_case_ids)} cases of fold {fold}: {model_folder / f'fold_{fold}'} has no "
                f"{checkpoint}; train it on the real data (e.g. nnUNetv2_train {dataset.name} 2d {fold} -tr "
                f"nnUNetTrainerSynthMix_r0)")
            continue
        predictor = _make_predictor(model_folder, [fold if fold == "all" else int(fold)], checkpoint)
        model_labels = {name: value for name, value in predictor.dataset_json["labels"].items()}
        if model_labels != dataset.dataset_json["labels"]:
            raise NnsynthError(f"the model's labels {model_labels} differ from {dataset.name}'s "
                               f"{dataset.dataset_json['labels']}: "
                               f"score with a model trained on this dataset")
        reader = predictor.plans_manager.image_reader_writer_class()
        names = pathology_class_names(dataset, store, pathology_names, fold)
        for index, case_id in enumerate(fold_case_ids):
            image, properties = reader.read_images([str(path) for path in store.image_files(case_id)])
            label_map, _ = reader.read_seg(str(store.label_file(case_id)))
            prediction = predictor.predict_single_npy_array(image, properties)
            scores = overlap_scores(np.asarray(prediction), label_map[0], dataset.labels, names, threshold,
                                    dataset.ignore_label)
            scores.update(model=str(model_folder.resolve()), model_fold=fold, checkpoint=checkpoint)
            results[case_id] = scores
            if (index + 1) % 50 == 0 or index + 1 == len(fold_case_ids):
                log(f"fold {fold}: scored {index + 1}/{len(fold_case_ids)} synthetic cases")
    if not results:
        raise NnsynthError(f"{model_folder} has no fold matching the synthetic cases' folds "
                           f"({', '.join(missing_folds)}): train those folds on the real data, or generate cases for "
                           f"the folds the model has (nnsynth_generate {dataset.name} --fold k)")
    with store.exclusive_writer():
        updates = {}
        for case_id, scores in results.items():
            quality = dict(store.cases[case_id].get("quality") or {})
            quality["segmentation"] = scores
            updates[case_id] = {"quality": quality}
        store.update_entries(updates)
    return results


CALIBRATION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def calibrate_on_real_validation(store, model_folder, fold, checkpoint: str = "checkpoint_final.pth",
                                 pathology_names=None, log=print) -> dict:
    """Per pathology class, the IoU of the model on the real validation slices of ``fold`` (slices that hold
    the class): the scale on which the synthetic cases' pathology IoU and its threshold are read. Written to
    ``<model_folder>/nnsynth_calibration_fold<F>.json``; returned."""
    dataset = store.dataset
    model_folder = Path(model_folder)
    _check_model_folder(model_folder)
    if fold is None or str(fold) == "all":
        raise NnsynthError("--calibrate needs one fold (-f F): its validation cases are the real slices the model "
                           "never saw")
    names = pathology_class_names(dataset, store, pathology_names, fold)
    training = set(fold_training_cases(dataset, fold))
    validation = [case_id for case_id in dataset.case_ids if case_id not in training]
    predictor = _make_predictor(model_folder, [int(fold)], checkpoint)
    reader = predictor.plans_manager.image_reader_writer_class()
    ious = {name: [] for name in names}
    for case_id in validation:
        files = dataset.cases[case_id]
        image, properties = reader.read_images(files["images"])
        label_map = reader.read_seg(files["label"])[0][0]
        prediction = np.asarray(predictor.predict_single_npy_array(image, properties)).reshape(label_map.shape)
        for slice_index in range(label_map.shape[0]):
            scores = overlap_scores(prediction[slice_index], label_map[slice_index], dataset.labels, names,
                                    ignore_label=dataset.ignore_label)
            for name in names:
                if np.any(label_map[slice_index] == dataset.labels[name]):
                    ious[name].append(scores["iou"][name])
        log(f"calibration: predicted {case_id}")
    classes = {}
    for name, values in ious.items():
        values = np.asarray(values, dtype=np.float64)
        classes[name] = {"slices": int(values.size), "iou": [float(v) for v in values]}
        if values.size:
            classes[name].update(median=float(np.median(values)),
                                 quartiles=[float(q) for q in np.percentile(values, (25, 75))],
                                 share_above={str(t): float(np.mean(values > t)) for t in CALIBRATION_THRESHOLDS})
    result = {"model": str(model_folder.resolve()), "fold": str(fold), "checkpoint": checkpoint,
              "validation_cases": validation, "classes": classes}
    write_json_atomic(result, model_folder / f"nnsynth_calibration_fold{fold}.json")
    return result


