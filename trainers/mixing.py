"""Mixing synthetic cases into nnU-Net training batches: settings, quality filter, dataset and data loader.

The pieces, in the order the trainer uses them (its settings come from ``settings.py``):

- ``select_synthetic_cases``: which synthetic cases of the manifest pass the quality threshold (the leakage rule
  of ``nnunet_synth/provenance.py`` is applied before it, by the trainer).
- ``exposure``: how often each synthetic case is drawn compared with each real slice (what the batch share
  ``nnsynth_ratio`` means).
- ``SynthMixDataset``: one dataset object that serves real keys from the real preprocessed folder and
  synthetic keys from the synthetic pool.
- ``SynthMixDataLoader``: an ``nnUNetDataLoader`` whose batches hold ``n_synth`` synthetic and
  ``B - n_synth`` real keys, ``n_synth = floor(r*B) + Bernoulli(frac(r*B))`` for the batch share r, shuffled
  within the batch
  (nnU-Net forces foreground by position in the batch).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset

from nnunet_synth.errors import NnsynthError
from nnunet_synth.trainers.settings import QUALITY_SCORES

EXPOSURE_WARNING_FACTOR = 4.0


def quality_score(entry: dict, quality_key: str) -> Optional[float]:
    """The score of a manifest entry under ``quality_key``; None when the case was not scored that way."""
    group, score_field = QUALITY_SCORES[quality_key]
    score = ((entry.get("quality") or {}).get(group) or {}).get(score_field)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or math.isnan(score):
        return None
    return float(score)


def scored_by_another_fold(entry: dict, quality_key: str, fold) -> bool:
    """True when a segmentation score comes from a model of another fold than ``fold`` (or of an unknown fold): that
    model was trained on fold ``fold``'s validation cases, so filtering on its score would carry them into
    training."""
    group, _ = QUALITY_SCORES[quality_key]
    if group != "segmentation" or fold is None:
        return False
    scores = (entry.get("quality") or {}).get(group)
    return bool(scores) and str(scores.get("model_fold")) != str(fold)


@dataclass
class SyntheticSelection:
    used: List[str]
    below_threshold: List[str]
    unscored: List[str]
    scored_by_another_fold: List[str] = field(default_factory=list)

    def counts(self) -> dict:
        return {"available": len(self.used) + len(self.below_threshold) + len(self.unscored)
                + len(self.scored_by_another_fold),
                "used": len(self.used), "below_threshold": len(self.below_threshold), "unscored": len(self.unscored),
                "scored_by_another_fold": len(self.scored_by_another_fold)}


def select_synthetic_cases(entries: Dict[str, dict], case_ids, min_quality: Optional[float],
                           quality_key: str, fold=None) -> SyntheticSelection:
    """Split ``case_ids`` into used cases and cases left out by the quality threshold.

    Without a threshold every case is used. With one, a case is used when its score is >= ``min_quality``;
    a case without that score is left out (counted as unscored), and so is a segmentation score made by a model
    of another fold than ``fold`` (``scored_by_another_fold``).
    """
    used, below, unscored, other_fold = [], [], [], []
    for case_id in sorted(case_ids):
        if min_quality is None:
            used.append(case_id)
            continue
        score = quality_score(entries[case_id], quality_key)
        if scored_by_another_fold(entries[case_id], quality_key, fold):
            other_fold.append(case_id)
        elif score is None:
            unscored.append(case_id)
        elif score < min_quality:
            below.append(case_id)
        else:
            used.append(case_id)
    return SyntheticSelection(used, below, unscored, other_fold)


def exposure(batch_share: float, batch_size: int, num_iterations: int, num_synthetic_cases: int,
             num_real_slices: int) -> dict:
    """How often, in expectation over a training run, each synthetic case and each real slice is drawn.

    A batch holds ``batch_share * batch_size`` synthetic cases on average, drawn uniformly from the used synthetic
    cases; the rest are real cases, and a 2d nnU-Net draws a slice of a real case, so a real slice is drawn about
    ``(1 - batch_share) * batch_size / num_real_slices`` times per iteration (exactly so when all cases have the same
    number of slices). ``factor`` > 1: each synthetic case is repeated more often than a real slice; with
    ``batch_share = R / (1 + R)`` and the amount ``R`` (synthetic cases per real slice) it is 1.
    """
    synthetic = batch_share * batch_size * num_iterations / num_synthetic_cases if num_synthetic_cases else 0.0
    real = (1 - batch_share) * batch_size * num_iterations / num_real_slices if num_real_slices else 0.0
    factor = synthetic / real if real > 0 else float("inf") if synthetic > 0 else 0.0
    return {"draws_per_synthetic_case": round(synthetic, 2), "draws_per_real_slice": round(real, 2),
            "factor": round(factor, 2) if factor != float("inf") else None,
            "num_synthetic_cases": num_synthetic_cases, "num_real_slices": num_real_slices}


class SynthMixDataset(nnUNetBaseDataset):
    """Real keys from the real preprocessed folder, synthetic keys from the pool, behind one interface."""

    def __init__(self, real_dataset: nnUNetBaseDataset, synthetic_dataset: Optional[nnUNetBaseDataset]):
        # nnUNetBaseDataset.__init__ lists a folder; both parts are already built, so set the fields directly
        self.real_dataset = real_dataset
        self.synthetic_dataset = synthetic_dataset
        self.real_identifiers = list(real_dataset.identifiers)
        self.synthetic_identifiers = list(synthetic_dataset.identifiers) if synthetic_dataset is not None else []
        clash = set(self.real_identifiers) & set(self.synthetic_identifiers)
        if clash:
            raise NnsynthError(f"synthetic case ids {sorted(clash)[:3]} equal real case ids: rename the real cases "
                               f"or regenerate the synthetic ones")
        self._synthetic_set = frozenset(self.synthetic_identifiers)
        self.source_folder = real_dataset.source_folder
        self.folder_with_segs_from_previous_stage = real_dataset.folder_with_segs_from_previous_stage
        self.identifiers = self.real_identifiers + self.synthetic_identifiers

    def is_synthetic(self, identifier: str) -> bool:
        return identifier in self._synthetic_set

    def load_case(self, identifier):
        self.last_loaded_case = identifier      # nnU-Net's loader transforms this case next (lesion paste reads it)
        if identifier in self._synthetic_set:
            return self.synthetic_dataset.load_case(identifier)
        return self.real_dataset.load_case(identifier)

    @staticmethod
    def save_case(data, seg, properties, output_filename_truncated):
        raise NotImplementedError("SynthMixDataset is read-only: cases are written by nnU-Net's preprocessing "
                                  "and nnsynth_preprocess_synthetic")

    @staticmethod
    def get_identifiers(folder: str) -> List[str]:
        raise NotImplementedError("SynthMixDataset spans two folders; use .identifiers")


def rarest_class(label_counts: Dict[int, int]) -> int:
    """The foreground class with the fewest pixels among those present (ties: the lower label)."""
    present = {c: n for c, n in label_counts.items() if c > 0 and n > 0}
    if not present:
        raise NnsynthError("rare-class oversampling needs a foreground class in the real training cases; found none")
    return min(present, key=lambda c: (present[c], c))


def synthetic_count(batch_share: float, batch_size: int, uniform_draw: float) -> int:
    """``floor(r*B)`` (r the batch share, B the batch size) plus one when ``uniform_draw`` falls below the
    fractional part (stochastic rounding)."""
    expected = round(batch_share * batch_size, 9)      # 0.3 * 10 is 3.0000000000000004 in floating point
    count = math.floor(expected)
    if uniform_draw < expected - count:
        count += 1
    return count


class SynthMixDataLoader(nnUNetDataLoader):
    """nnU-Net's training data loader, drawing a fixed expected share of each batch (``synthetic_share``, the
    batch share ``nnsynth_ratio``) from synthetic keys."""

    def __init__(self, data: SynthMixDataset, batch_size: int, patch_size, final_patch_size, label_manager,
                 synthetic_share: float, **kwargs):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager, **kwargs)
        if kwargs.get("sampling_probabilities") is not None:
            raise ValueError("SynthMixDataLoader draws by batch share; sampling_probabilities are not supported")
        self.real_keys = list(data.real_identifiers)
        self.synthetic_keys = list(data.synthetic_identifiers)
        if not 0.0 <= synthetic_share <= 1.0:
            raise ValueError(f"synthetic_share must lie in [0, 1], got {synthetic_share}")
        if synthetic_share > 0 and not self.synthetic_keys:
            raise ValueError("synthetic_share > 0 needs at least one synthetic key")
        if synthetic_share < 1 and not self.real_keys:
            raise ValueError("synthetic_share < 1 needs at least one real key")
        self.synthetic_share = synthetic_share

    def enable_rare_oversampling(self, rare_class: int, probability: float):
        """Centre ``probability`` of the real draws on a pixel of ``rare_class`` (2d: a slice that contains it),
        when the case has one; the other draws stay nnU-Net's own."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"rare-class oversampling probability must lie in [0, 1], got {probability}")
        self.rare_class, self.rare_probability = int(rare_class), float(probability)

    def get_bbox(self, data_shape, force_fg, class_locations, overwrite_class=None, verbose=False):
        probability = getattr(self, "rare_probability", 0.0)
        if (probability > 0 and class_locations is not None and len(class_locations.get(self.rare_class, ())) > 0
                and np.random.uniform() < probability):
            return super().get_bbox(data_shape, True, class_locations, overwrite_class=self.rare_class,
                                    verbose=verbose)
        return super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)

    def get_indices(self):
        n_synthetic = synthetic_count(self.synthetic_share, self.batch_size, np.random.uniform())
        n_real = self.batch_size - n_synthetic
        keys = [self.synthetic_keys[i] for i in np.random.randint(len(self.synthetic_keys) or 1, size=n_synthetic)]
        keys += [self.real_keys[i] for i in np.random.randint(len(self.real_keys) or 1, size=n_real)]
        return [keys[i] for i in np.random.permutation(len(keys))]
