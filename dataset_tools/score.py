"""nnsynth_score: score synthetic pairs with an nnU-Net model trained on real data.

    nnsynth_score DatasetXXX -m MODEL_FOLDER [-f FOLD ...] [-chk checkpoint_final.pth] [--threshold 0.7]
    nnsynth_score DatasetXXX -m MODEL_FOLDER -f FOLD --calibrate

MODEL_FOLDER is an nnU-Net results folder (``$nnUNet_results/<Dataset>/<Trainer>__<Plans>__<conf>``) of a model
trained on the real data. Each synthetic case made for fold k is segmented by the model's fold k, which was
trained on fold k's training cases only: a model of another fold saw fold k's validation cases, and filtering fold
k's training data on its scores would carry them in. Cases whose fold the model lacks are not scored (the command
says which ``nnUNetv2_train`` makes that fold). ``-f`` limits scoring to the cases of these folds. The per-class
Dice and IoU between the prediction and the label map the image was generated from go into the manifest under
``quality.segmentation``::

    {"mean_dice": mean Dice over foreground classes present in label or prediction,
     "mean_iou": ..., "dice": {class name: Dice or null}, "iou": {...},
     "pathology_iou": {pathology class name: IoU or null}, "min_pathology_iou": the lowest of them,
     "threshold": 0.7, "passed": min_pathology_iou > threshold, "model": ..., "model_fold": "k", "checkpoint": ...}

The gate is DiffAug's (§3.3, eq. 14): the IoU between the intended *abnormality* mask and the prediction of
a model trained on real data, per pathology class, keep if > 0.7. The mean Dice over all classes is kept for
reference, but it is not the gate: a dominant healthy class hides a missed lesion. Pathology classes: those of
the label-map report in synthetic.json (``--pathology-classes`` overrides). Other quality keys (e.g.
``quality.model_free``) are kept. A class absent from both label and prediction has no score (null) and does
not count. nnUNetTrainerSynthMix filters on the pathology IoU with ``nnsynth_quality_key=pathology_iou
nnsynth_min_quality=0.7`` (``segmentation`` = the mean Dice). ``--calibrate`` reports the same per-class IoU on
the real validation slices of the model's fold (slices where the class is present), so that a threshold can be
chosen against what the model achieves on real data. Runs on the GPU when there is one, else CPU.
"""
import argparse

import numpy as np

from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.errors import CommandParser, NnsynthError, command_entry_point
from nnunet_synth.quality.segmentation import DEFAULT_IOU_THRESHOLD, calibrate_on_real_validation, score_synthetic_cases
from nnunet_synth.writer.synthetic_store import SyntheticStore


@command_entry_point
def main(argv=None):
    parser = CommandParser(prog="nnsynth_score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="dataset folder, name (Dataset501_Covid19Lung), short name or id")
    parser.add_argument("-m", "--model", required=True, help="nnU-Net model folder trained on the real data")
    parser.add_argument("-f", "--folds", nargs="+", default=None,
                        help="score only the synthetic cases made for these folds (default: all); each case is "
                             "scored by the model's fold it was made for")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint file name")
    parser.add_argument("--threshold", type=float, default=DEFAULT_IOU_THRESHOLD,
                        help="keep a synthetic case if every pathology class has IoU above this (default 0.7, DiffAug)")
    parser.add_argument("--pathology-classes", nargs="+", metavar="NAME",
                        help="label names to gate on (default: the pathology classes of the label-map report)")
    parser.add_argument("--calibrate", action="store_true", help="instead of scoring, report the per-class IoU of "
                        "the model on the real validation slices of its fold (-f F)")
    args = parser.parse_args(argv)
    folds = args.folds
    store = SyntheticStore(RawDataset.from_name(args.dataset))
    if args.calibrate:
        if not folds or len(folds) != 1:
            raise NnsynthError("--calibrate needs exactly one fold: -f F")
        result = calibrate_on_real_validation(store, args.model, folds[0], args.checkpoint,
                                              args.pathology_classes)
        for name, entry in result["classes"].items():
            if not entry["slices"]:
                print(f"{name}: no validation slice holds this class")
                continue
            above = ", ".join(f"> {t}: {100 * share:.0f} %" for t, share in entry["share_above"].items())
            print(f"{name}: IoU on {entry['slices']} real validation slices (fold {result['fold']}): median "
                  f"{entry['median']:.3f}, quartiles {entry['quartiles'][0]:.3f}-{entry['quartiles'][1]:.3f}; "
                  f"slices with IoU {above}")
        return
    results = score_synthetic_cases(store, args.model, folds, args.checkpoint, threshold=args.threshold,
                                    pathology_names=args.pathology_classes)
    means = [scores["mean_dice"] for scores in results.values() if scores["mean_dice"] is not None]
    passed = sum(bool(scores["passed"]) for scores in results.values())
    print(f"scored {len(results)} synthetic cases; {passed} pass the pathology IoU gate (> {args.threshold}); "
          + (f"mean Dice over cases {np.mean(means):.3f}" if means else "no Dice defined"))


if __name__ == "__main__":
    main()
