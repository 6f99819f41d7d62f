"""nnUNetTrainerSynthMix: nnU-Net training with a set fraction of synthetic cases in every training batch.

Use with the stock commands after ``export nnUNet_extTrainer=$(nnsynth_trainer_dir)``::

    nnUNetv2_train DatasetXXX 2d 0 -tr nnUNetTrainerSynthMix_r25

What changes against ``nnUNetTrainer``: only the training data. Splits, plans, fingerprint and validation are those
of a real-only run; synthetic cases come from their own preprocessed pool (``synthetic_pool.py``), brought up to
date and verified when training starts, and are only ever added to the training data loader
(``build_training_loader``). Fold k uses only the synthetic cases that depend on none of its validation cases
(``nnunet_synth/provenance.py``: in practice those made with ``nnsynth_generate D --fold k``).

Every ``nnsynth_*`` setting is resolved once, when the trainer is built (``settings.py``); a bad value ends
``nnUNetv2_train`` with one ``nnsynth: error:`` line and exit status 2 (nnU-Net's entry point would print a
traceback for any exception, so the trainer exits itself). Variants (``variants/``) fix settings or the training
length through the class attributes below. The effective settings and the counts of used and left-out synthetic
cases go to ``<fold folder>/synthmix.json`` and the training log; continuing a run (``--c``) with any changed
setting is refused.
"""
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunet_synth.atomic import write_json_atomic
from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.errors import NnsynthError
from nnunet_synth.nnunet_paths import require_nnunet_folder
from nnunet_synth.provenance import select_for_fold
from nnunet_synth.trainers.mixing import (
    EXPOSURE_WARNING_FACTOR,
    SynthMixDataLoader,
    SynthMixDataset,
    exposure,
    rarest_class,
    select_synthetic_cases,
)
from nnunet_synth.trainers.settings import SETTINGS_BY_NAME, changed_settings, resolve_settings
from nnunet_synth.trainers.synthetic_pool import update_synthetic_pool
from nnunet_synth.writer.synthetic_store import SyntheticStore

SETTINGS_FILE_NAME = "synthmix.json"


def exit_with_error(error: NnsynthError, log=None):
    """End nnUNetv2_train with the one line ``nnsynth: error: ...`` (also in the log) and exit status 2."""
    message = "nnsynth: error: " + " ".join(str(error).split())
    if log is not None:
        log(message)
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(2)


@dataclass(frozen=True)
class TrainingBudget:
    """The training length a variant fixes (nnU-Net's num_epochs x num_iterations_per_epoch)."""

    epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int


class nnUNetTrainerSynthMix(nnUNetTrainer):
    fixed_settings: dict = {}       # settings a variant fixes in its name, e.g. {"ratio": 0.25}
    default_settings: dict = {}     # this trainer's defaults where the environment sets nothing
    budget: Optional[TrainingBudget] = None     # None: nnU-Net's 1000 x 250
    predict_validation_cases = True  # False: skip the final prediction of the fold's validation cases

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        try:
            settings = resolve_settings(self.__class__.__name__, self.fixed_settings, self.default_settings)
        except NnsynthError as error:
            exit_with_error(error)
        if settings.seed is not None:     # before nnU-Net builds anything random
            random.seed(settings.seed)
            np.random.seed(settings.seed)
            torch.manual_seed(settings.seed)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.synth_settings = settings
        self.synth_summary = None        # -> get_tr_and_val_datasets
        if self.budget is not None:
            self.num_epochs = self.budget.epochs
            self.num_iterations_per_epoch = self.budget.iterations_per_epoch
            self.num_val_iterations_per_epoch = self.budget.val_iterations_per_epoch
        if self.device.type == "cpu" and settings.cpu_threads is not None:
            # nnUNetv2_train uses every core on a CPU; on a shared machine one thread per run stalls far less
            torch.set_num_threads(settings.cpu_threads)

    # ------------------------------------------------------------------ data
    def get_tr_and_val_datasets(self):
        try:
            return self._mixed_tr_and_val_datasets()
        except NnsynthError as error:
            exit_with_error(error, self.print_to_log_file)

    def _mixed_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()     # the real split, untouched
        settings = self.synth_settings
        self._refuse_changed_settings_on_continue(settings)
        batch_size = getattr(self, "batch_size", self.configuration_manager.batch_size)   # set by initialize()
        summary = {"trainer": self.__class__.__name__, "configuration": self.configuration_name,
                   "fold": self.fold, "settings": settings.to_json(), "batch_size": batch_size,
                   "expected_synthetic_per_batch": settings.ratio * batch_size,
                   "real_training_cases": len(dataset_tr.identifiers),
                   "validation_cases": len(dataset_val.identifiers)}
        synthetic_dataset = None
        if settings.ratio > 0:
            synthetic_dataset, pool_summary = self._synthetic_training_dataset(settings, dataset_val.identifiers)
            summary.update(pool_summary)
            summary["exposure"] = exposure(settings.ratio, batch_size,
                                           self.num_epochs * self.num_iterations_per_epoch,
                                           len(synthetic_dataset.identifiers), self._count_real_units(dataset_tr))
        else:
            summary.update(synthetic_cases={"available": 0, "used": 0, "below_threshold": 0, "unscored": 0},
                           note="ratio 0: real-only baseline, the synthetic pool is not read")
        summary["seed"] = settings.seed
        summary["rare_oversampling"] = self._rare_oversampling(dataset_tr)
        if settings.ratio < 1 and len(dataset_tr.identifiers) == 0:
            raise NnsynthError(f"fold {self.fold} has no real training case; a batch share (nnsynth_ratio) below 1 needs some")
        self.synth_summary = summary
        self._report(summary)
        return SynthMixDataset(dataset_tr, synthetic_dataset), dataset_val

    def _rare_oversampling(self, dataset_tr) -> dict:
        """{"probability", "class", "pixels_per_class"} of ``nnsynth_rare_oversampling`` (probability 0: off)."""
        probability = self.synth_settings.rare_oversampling
        if probability == 0:
            return {"probability": 0.0, "class": None}
        counts = {}
        for identifier in dataset_tr.identifiers:
            seg = dataset_tr.load_case(identifier)[1]
            values, numbers = np.unique(np.asarray(seg), return_counts=True)
            for value, number in zip(values.tolist(), numbers.tolist()):
                counts[int(value)] = counts.get(int(value), 0) + int(number)
        rare = rarest_class(counts)
        return {"probability": probability, "class": rare, "pixels_per_class": counts}

    @property
    def _trains_3d_patches(self) -> bool:
        return len(self.configuration_manager.patch_size) == 3

    def _count_real_units(self, dataset) -> int:
        """What a real draw picks: a slice of a real training case (2d: the first spatial axis of each preprocessed
        case), or with 3D patches a real training case."""
        if self._trains_3d_patches:
            return len(dataset.identifiers)
        return sum(int(dataset.load_case(identifier)[0].shape[1]) for identifier in dataset.identifiers)

    def _refuse_slices_for_3d_patches(self, store: SyntheticStore, case_ids):
        """3D patches (3d_fullres, 3d_lowres) need synthetic cases that are whole volumes (copy-paste or inpaint
        with unit "volume"); a single-slice case would be a patch of padding."""
        folds = sorted({str(store.cases[case_id].get("fold")) for case_id in case_ids})
        slice_folds = [fold for fold in folds if store.fold_record(fold).get("settings", {}).get("unit") != "volume"]
        if slice_folds:
            raise NnsynthError(f"{store.manifest_file}: the synthetic cases of fold {slice_folds[0]} are single "
                               f"slices, and '{self.configuration_name}' trains 3D patches "
                               f"{self.configuration_manager.patch_size} that need whole volumes: run nnsynth_generate "
                               f"{store.dataset.name} --fold {slice_folds[0]} --image-source copy-paste (or inpaint) --unit volume "
                               f"--overwrite, train a 2d configuration, or set nnsynth_ratio=0 for a real-only run")

    def _synthetic_training_dataset(self, settings, validation_cases):
        if self.is_cascaded:
            raise NnsynthError(f"{self.__class__.__name__} does not support cascaded configurations")
        dataset_name = self.plans_manager.dataset_name
        raw_folder = require_nnunet_folder("nnUNet_raw", "the synthetic manifest is read from the raw dataset "
                                                         "folder") / dataset_name
        store = SyntheticStore(RawDataset(raw_folder))
        available = store.complete_case_ids()
        self._refuse_incomplete_cases(store, validation_cases)
        for_fold = select_for_fold(store.manifest, available, self.fold, validation_cases)
        if not for_fold.allowed:
            if not available:
                reason = "it holds none"
            elif str(self.fold) == "all":
                reason = f"none of the {len(available)} was made for fold all"
            else:
                reason = (f"all {len(available)} depend on fold {self.fold}'s validation cases (they were made "
                          f"for other folds)")
            raise NnsynthError(f"no synthetic case of {store.manifest_file} may be used for fold {self.fold}: "
                               f"{reason}: run nnsynth_generate {dataset_name} --fold {self.fold} (or set "
                               f"nnsynth_ratio=0 for a real-only run)")
        if self._trains_3d_patches:
            self._refuse_slices_for_3d_patches(store, for_fold.allowed)
        report = update_synthetic_pool(raw_folder, self.preprocessed_dataset_folder_base, self.plans_manager.plans,
                                       self.configuration_name, self.dataset_json,
                                       log=lambda message: self.print_to_log_file(message), case_ids=for_fold.allowed)
        self.print_to_log_file(report.summary())
        selection = select_synthetic_cases(store.cases, report.case_ids, settings.min_quality, settings.quality_key,
                                           fold=self.fold)
        pool_summary = {"pool_folder": str(report.folder), "pool": report.to_json(),
                        "provenance": for_fold.counts(),
                        "synthetic_cases": selection.counts(), "used_synthetic_cases": selection.used,
                        "left_out": {"below_threshold": selection.below_threshold, "unscored": selection.unscored,
                                     "scored_by_another_fold": selection.scored_by_another_fold}}
        if not selection.used and selection.below_threshold:
            default = ", the default filter" if settings.sources["min_quality"] == "default" else ""
            raise NnsynthError(f"{store.manifest_file}: none of the {len(report.case_ids)} synthetic cases fold "
                               f"{self.fold} may use passes the {settings.quality_key} quality gate (score >= "
                               f"{settings.min_quality}{default}): set nnsynth_min_quality=none to train on them "
                               f"anyway, make cases that pass (nnsynth_generate {dataset_name} --image-source "
                               f"inpaint or copy-paste), or set nnsynth_ratio=0 for a real-only run")
        if not selection.used:
            raise NnsynthError(f"no synthetic case to mix in: {selection.counts()} (manifest "
                               f"{store.manifest_file}, quality key {settings.quality_key}, threshold "
                               f"{settings.min_quality}); generate cases, lower nnsynth_min_quality, or set "
                               f"nnsynth_ratio=0 for a real-only run")
        pool_dataset_class = infer_dataset_class(str(report.folder))
        return pool_dataset_class(str(report.folder), list(selection.used)), pool_summary

    def _refuse_incomplete_cases(self, store: SyntheticStore, validation_cases):
        """A recorded case this fold could use whose image or label file is gone: stop and name it (the record is
        written after the files, so such a case was damaged after it was made)."""
        incomplete = [case_id for case_id in sorted(store.cases) if not store.is_complete(case_id)]
        usable = select_for_fold(store.manifest, incomplete, self.fold, validation_cases).allowed
        if usable:
            case_id = usable[0]
            missing = [path for path in [*store.image_files(case_id), store.label_file(case_id)] if not path.is_file()]
            fold = store.cases[case_id].get("fold")
            raise NnsynthError(f"{missing[0]}: synthetic case {case_id} (fold {fold}) has lost this file"
                               f"{f' and {len(usable) - 1} more cases are damaged' if len(usable) > 1 else ''}: "
                               f"rerun nnsynth_generate {store.dataset.name} --fold {fold} with the fold's settings "
                               f"(it rewrites incomplete cases), or replace the fold's cases with --overwrite")

    def _refuse_changed_settings_on_continue(self, settings):
        previous_file = Path(self.output_folder) / SETTINGS_FILE_NAME
        if self.current_epoch == 0 or not previous_file.is_file():
            return
        with open(previous_file) as handle:
            previous = json.load(handle).get("settings", {})
        changed = changed_settings(previous, settings)
        if changed:
            started = ", ".join(f"{SETTINGS_BY_NAME[name].variable}={before}" for name, (before, _) in changed.items())
            now = ", ".join(f"{SETTINGS_BY_NAME[name].variable}={after}" for name, (_, after) in changed.items())
            raise NnsynthError(f"{previous_file}: this run was started with {started} but would continue with {now}: "
                               f"restore the environment ({started}) or start a new run")

    def _report(self, summary: dict):
        write_json_atomic(summary, Path(self.output_folder) / SETTINGS_FILE_NAME)
        settings = summary["settings"]
        counts = summary["synthetic_cases"]
        if "provenance" in summary:
            provenance = summary["provenance"]
            self.print_to_log_file(
                f"SynthMix: fold {self.fold} may use {provenance['allowed']} synthetic cases; dropped "
                f"{provenance['dropped_for_leakage']} that depend on its validation cases and "
                f"{provenance['not_made_for_fold_all']} not made for fold all")
        if "exposure" in summary:
            drawn = summary["exposure"]
            self.print_to_log_file(
                f"SynthMix: in expectation each synthetic case is drawn {drawn['draws_per_synthetic_case']} times "
                f"and each real slice {drawn['draws_per_real_slice']} times in this run (factor {drawn['factor']})")
            if drawn["factor"] is not None and drawn["factor"] > EXPOSURE_WARNING_FACTOR:
                self.print_to_log_file(
                    f"SynthMix warning: each synthetic case is repeated {drawn['factor']}x as often as a real slice "
                    f"({drawn['num_synthetic_cases']} synthetic cases for ratio {settings['ratio']}): generate more "
                    f"cases or lower nnsynth_ratio (ratio R/(1+R) with R synthetic cases per real slice gives 1x)")
        self.print_to_log_file(
            f"SynthMix: ratio {settings['ratio']} ({settings['sources']['ratio']}), min quality "
            f"{settings['min_quality']} ({settings['sources']['min_quality']}), quality key "
            f"{settings['quality_key']} ({settings['sources']['quality_key']}); synthetic cases: "
            f"{counts['used']} used, {counts['below_threshold']} below threshold, {counts['unscored']} unscored, "
            f"of {counts['available']}; {summary['real_training_cases']} real training and "
            f"{summary['validation_cases']} validation cases (real only)")

    def build_training_loader(self, dataset_tr, batch_size, patch_size, final_patch_size, label_manager, **kwargs):
        """The training data loader: nnU-Net's, drawing ``ratio`` of each batch from the synthetic cases (and
        centring ``rare_oversampling`` of the real draws on the rarest class)."""
        loader = SynthMixDataLoader(dataset_tr, batch_size, patch_size, final_patch_size, label_manager,
                                    synthetic_share=self.synth_settings.ratio, **kwargs)
        rare = self.synth_summary["rare_oversampling"]
        if rare["probability"] > 0:
            loader.enable_rare_oversampling(rare["class"], rare["probability"])
            self.print_to_log_file(f"SynthMix: {rare['probability']:.2f} of the real draws are centred on the rarest "
                                   f"class {rare['class']} (pixels per class {rare['pixels_per_class']})")
        return loader

    # The one change: the training loader comes from build_training_loader (tests/test_trainer_settings.py compares
    # this copy with the installed nnU-Net's method, so a change there fails loudly).
    # Copied from nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer.get_dataloaders with nnUNetDataLoader(dataset_tr->self.build_training_loader(dataset_tr
    def get_dataloaders(self):
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)

        # we use the patch size to determine whether we need 2D or 3D dataloaders. We also use it to determine whether
        # we need to use dummy 2D augmentation (in case of 3D training) and what our initial patch size should be
        patch_size = self.configuration_manager.patch_size

        # needed for deep supervision: how much do we need to downscale the segmentation targets for the different
        # outputs?
        deep_supervision_scales = self._get_deep_supervision_scales()

        (
            rotation_for_DA,
            do_dummy_2d_data_aug,
            initial_patch_size,
            mirror_axes,
        ) = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()

        # training pipeline
        tr_transforms = self.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
            is_cascaded=self.is_cascaded, foreground_labels=self.label_manager.foreground_labels,
            regions=self.label_manager.foreground_regions if self.label_manager.has_regions else None,
            ignore_label=self.label_manager.ignore_label)

        # validation pipeline
        val_transforms = self.get_validation_transforms(deep_supervision_scales,
                                                        is_cascaded=self.is_cascaded,
                                                        foreground_labels=self.label_manager.foreground_labels,
                                                        regions=self.label_manager.foreground_regions if
                                                        self.label_manager.has_regions else None,
                                                        ignore_label=self.label_manager.ignore_label)

        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        dl_tr = self.build_training_loader(dataset_tr, self.batch_size,
                                           initial_patch_size,
                                           self.configuration_manager.patch_size,
                                           self.label_manager,
                                           oversample_foreground_percent=self.oversample_foreground_percent,
                                           sampling_probabilities=None, pad_sides=None, transforms=tr_transforms,
                                           probabilistic_oversampling=self.probabilistic_oversampling)
        dl_val = nnUNetDataLoader(dataset_val, self.batch_size,
                                  self.configuration_manager.patch_size,
                                  self.configuration_manager.patch_size,
                                  self.label_manager,
                                  oversample_foreground_percent=self.oversample_foreground_percent,
                                  sampling_probabilities=None, pad_sides=None, transforms=val_transforms,
                                  probabilistic_oversampling=self.probabilistic_oversampling)

        allowed_num_processes = get_allowed_n_proc_DA()
        if allowed_num_processes == 0:
            mt_gen_train = SingleThreadedAugmenter(dl_tr, None)
            mt_gen_val = SingleThreadedAugmenter(dl_val, None)
        else:
            mt_gen_train = NonDetMultiThreadedAugmenter(data_loader=dl_tr, transform=None,
                                                        num_processes=allowed_num_processes,
                                                        num_cached=max(6, allowed_num_processes // 2), seeds=None,
                                                        pin_memory=self.device.type == 'cuda', wait_time=0.002)
            mt_gen_val = NonDetMultiThreadedAugmenter(data_loader=dl_val,
                                                      transform=None, num_processes=max(1, allowed_num_processes // 2),
                                                      num_cached=max(3, allowed_num_processes // 4), seeds=None,
                                                      pin_memory=self.device.type == 'cuda',
                                                      wait_time=0.002)
        # # let's get this party started
        _ = next(mt_gen_train)
        _ = next(mt_gen_val)
        return mt_gen_train, mt_gen_val

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not self.predict_validation_cases:
            self.print_to_log_file(f"{self.__class__.__name__}: the fold's validation cases are not predicted (a "
                                   f"downstream evaluation predicts its own test set with nnUNetv2_predict)")
            return
        super().perform_actual_validation(save_probabilities)
