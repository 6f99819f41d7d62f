"""nnU-Net's cross-validation split of the real cases: the one training, generation and export all follow."""
import json
from pathlib import Path

from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.errors import NnsynthError
from nnunet_synth.nnunet_paths import nnunet_folder

NNUNET_SPLIT_SEED = 12345   # the seed nnUNetTrainer.do_split uses for its default 5-fold split


def real_crossval_split(dataset: RawDataset, preprocessed_root=None):
    """Return ``(splits, source)``: ``<preprocessed_root>/<dataset>/splits_final.json`` if nnU-Net made one
    (``preprocessed_root`` defaults to ``$nnUNet_preprocessed``), else the seeded 5-fold split nnU-Net would make."""
    preprocessed_root = preprocessed_root or nnunet_folder("nnUNet_preprocessed")
    splits_file = Path(preprocessed_root) / dataset.name / "splits_final.json" if preprocessed_root else None
    if splits_file is not None and splits_file.is_file():
        with open(splits_file) as handle:
            splits = json.load(handle)
        unknown = sorted({str(c) for fold in splits for c in fold["train"] + fold["val"]} - set(dataset.case_ids))
        if unknown:
            raise NnsynthError(f"{splits_file} names cases {unknown[:5]} that {dataset.name} does not have: "
                               f"delete the stale splits file or rerun nnU-Net's planning")
        return splits, str(splits_file)
    if len(dataset.case_ids) < 5:
        raise NnsynthError(f"{dataset.folder} has {len(dataset.case_ids)} cases; a 5-fold split needs at least 5: "
                           f"add cases or use fold 'all'")
    return (generate_crossval_split(dataset.case_ids, seed=NNUNET_SPLIT_SEED, n_splits=5),
            "nnU-Net's default 5-fold split")


def fold_training_cases(dataset: RawDataset, fold) -> list:
    """The training cases of nnU-Net's fold ``fold`` (int or "all"), sorted."""
    if str(fold) == "all":
        return dataset.case_ids
    try:
        fold = int(fold)
    except ValueError:
        raise NnsynthError(f"fold must be an integer or 'all', got '{fold}'") from None
    splits, source = real_crossval_split(dataset)
    if not 0 <= fold < len(splits):
        raise NnsynthError(f"fold {fold} does not exist in {source} ({len(splits)} folds): "
                           f"use 0-{len(splits) - 1} or 'all'")
    return sorted(str(case) for case in splits[fold]["train"])


def fold_validation_cases(dataset: RawDataset, fold) -> list:
    """The validation cases of nnU-Net's fold ``fold``, sorted; none for fold "all" (it trains on every case)."""
    if str(fold) == "all":
        return []
    training = set(fold_training_cases(dataset, fold))
    return sorted(case for case in dataset.case_ids if case not in training)
