"""nnsynth_score: score synthetic pairs with an nnU-Net model trained on real data.

    nnsynth_score DatasetXXX -m MODEL_FOLDER [-f FOLD ...] [-chk checkpoint_final.pth]

MODEL_FOLDER is an nnU-Net results folder (``$nnUNet_results/<Dataset>/<Trainer>__<Plans>__<conf>``) of a model
trained on the real data. Each synthetic case made for fold k is segmented by the model's fold k, which was
trained on fold k's training cases only: a model of another fold saw fold k's validation cases, and filtering fold
k's training data on its scores would carry them in. Cases whose fold the model lacks are not scored (the command
says which ``nnUNetv2_train`` makes that fold). ``-f`` limits scoring to the cases of these folds. The per-class
Dice and IoU between the prediction and the label map the image was generated from go into the manifest under
``quality.segmentation``::

    {"mean_dice": mean Dice over foreground classes present in label or prediction,
     "mean_iou": ..., "dice": {class name: Dice or null}, "iou": {...}, "model": ..., "model_fold": "k",
     "checkpoint": ...}

Other quality keys (e.g. ``quality.model_free``) are kept. A class absent from both label and prediction has
no Dice (null) and does not count in the mean. nnUNetTrainerSynthMix filters on ``mean_dice`` with
``nnsynth_quality_key=segmentation nnsynth_min_quality=...``. Runs on the GPU when there is one, else CPU.
"""
import argparse
from pathlib import Path

import numpy as np

from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.errors import NnsynthError, command_entry_point
from nnunet_synth.writer.synthetic_store import SyntheticStore


def overlap_scores(prediction: np.ndarray, label_map: np.ndarray, labels: dict) -> dict:
    """Per-class Dice and IoU of ``prediction`` against ``label_map`` for the foreground ``labels`` (name->value)."""
    dice, iou = {}, {}
    for name, value in labels.items():
        if value == 0:
            continue
        predicted, reference = prediction == value, label_map == value
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
    return {"mean_dice": float(np.mean(defined)) if defined else None,
            "mean_iou": float(np.mean(defined_iou)) if defined_iou else None,
            "dice": dice, "iou": iou}


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


def score_synthetic_cases(dataset_folder, model_folder, folds=None, checkpoint: str = "checkpoint_final.pth",
                          log=print) -> dict:
    """Predict the complete synthetic cases (of ``folds``, default all) with the model's fold of each case, write
    quality.segmentation; return the scores per case."""
    dataset = RawDataset(dataset_folder)
    store = SyntheticStore(dataset)
    model_folder = Path(model_folder)
    if not (model_folder / "plans.json").is_file() or not (model_folder / "dataset.json").is_file():
        raise NnsynthError(f"{model_folder} is not an nnU-Net model folder (plans.json/dataset.json missing): give "
                           f"$nnUNet_results/<Dataset>/<Trainer>__<Plans>__<configuration>")
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
        if model_labels != dataset.labels:
            raise NnsynthError(f"the model's labels {model_labels} differ from {dataset.name}'s {dataset.labels}: "
                               f"score with a model trained on this dataset")
        reader = predictor.plans_manager.image_reader_writer_class()
        for index, case_id in enumerate(fold_case_ids):
            image, properties = reader.read_images([str(store.image_file(case_id))])
            label_map, _ = reader.read_seg(str(store.label_file(case_id)))
            prediction = predictor.predict_single_npy_array(image, properties)
            scores = overlap_scores(np.asarray(prediction), label_map[0], dataset.labels)
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


@command_entry_point
def main(argv=None):
    parser = argparse.ArgumentParser(prog="nnsynth_score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="dataset folder, name (Dataset501_Covid19Lung), short name or id")
    parser.add_argument("-m", "--model", required=True, help="nnU-Net model folder trained on the real data")
    parser.add_argument("-f", "--folds", nargs="+", default=None,
                        help="score only the synthetic cases made for these folds (default: all); each case is "
                             "scored by the model's fold it was made for")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint file name")
    args = parser.parse_args(argv)
    results = score_synthetic_cases(RawDataset.from_name(args.dataset).folder, args.model, args.folds, args.checkpoint)
    means = [scores["mean_dice"] for scores in results.values() if scores["mean_dice"] is not None]
    print(f"scored {len(results)} synthetic cases; mean Dice over cases "
          f"{np.mean(means):.3f}" if means else f"scored {len(results)} synthetic cases; no Dice defined")


if __name__ == "__main__":
    main()
