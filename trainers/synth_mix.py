"""nnUNetTrainerSynthMix: nnU-Net training with a set fraction of synthetic cases in every training batch.

Use with the stock commands after ``export nnUNet_extTrainer=$(nnsynth_trainer_dir)``::

    nnUNetv2_train DatasetXXX 2d 0 -tr nnUNetTrainerSynthMix_r25

What changes against ``nnUNetTrainer``: only the training sampler. Splits, plans, fingerprint and validation
are those of a real-only run; synthetic cases come from their own preprocessed pool (see
``synthetic_pool.py``), brought up to date automatically when training starts, and are only ever added to
the training data loader. Fold k uses only the synthetic cases that depend on none of its validation cases
(``nnunet_synth/provenance.py``: in practice those made with ``nnsynth_generate D --fold k``); fold "all" uses
those made for "all". How many were dropped for that reason goes to the log and ``synthmix.json``.

Settings (``mixing.py``)::

    nnsynth_ratio        synthetic fraction of each training batch, 0..1 (default 0.5)
    nnsynth_min_quality  lowest quality score a synthetic case needs; unset/'none' = no filter (default)
    nnsynth_quality_key  model_free (quality.model_free.score) | segmentation (quality.segmentation.mean_dice)
    nnsynth_rare_oversampling  share of the real draws centred on a pixel of the rarest class (a slice that
                         contains it), 0..1 (default 0: nnU-Net's own sampling); same iterations, same batches
    nnsynth_seed         seeds python, numpy and torch when the trainer is built (network initialisation, the
                         main process's draws); nnU-Net itself does not seed training

``nnUNetTrainerSynthMix`` and ``nnUNetTrainerSynthMix_debug`` read all three from the environment. The ratio
variants (``_r0`` ... ``_r100``) fix the ratio in the class, so their results folders never mix ratios; they
still read the quality settings from the environment, and refuse an ``nnsynth_ratio`` that contradicts
their name. The effective settings and the counts of used and filtered synthetic cases go to
``<results fold folder>/synthmix.json`` and the training log; continuing a run (``--c``) with different
settings is refused.
"""
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunet_synth.atomic import write_json_atomic
from nnunet_synth.dataset.raw_dataset import RawDataset
from nnunet_synth.errors import NnsynthError
from nnunet_synth.provenance import select_for_fold
from nnunet_synth.trainers.mixing import (ENV_RARE_OVERSAMPLING, ENV_SEED, EXPOSURE_WARNING_FACTOR,
                                          FROM_ENVIRONMENT, SynthMixDataLoader, SynthMixDataset, exposure,
                                          parse_rare_oversampling, parse_seed, rarest_class, resolve_settings,
                                          select_synthetic_cases)
from nnunet_synth.trainers.synthetic_pool import update_synthetic_pool
from nnunet_synth.writer.synthetic_store import SyntheticStore

SETTINGS_FILE_NAME = "synthmix.json"


class nnUNetTrainerSynthMix(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        self.synth_seed = parse_seed(os.environ[ENV_SEED]) if ENV_SEED in os.environ else None
        if self.synth_seed is not None:     # before nnU-Net builds anything random
            random.seed(self.synth_seed)
            np.random.seed(self.synth_seed)
            torch.manual_seed(self.synth_seed)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.device.type == "cpu" and os.environ.get("nnsynth_cpu_threads"):
            # nnUNetv2_train uses every core on a CPU; on a shared machine one thread per run stalls far less
            torch.set_num_threads(int(os.environ["nnsynth_cpu_threads"]))
        # FROM_ENVIRONMENT: read nnsynth_ratio / nnsynth_min_quality / nnsynth_quality_key (or the default)
        self.synth_ratio = FROM_ENVIRONMENT
        self.synth_min_quality = FROM_ENVIRONMENT
        self.synth_quality_key = FROM_ENVIRONMENT
        self.synth_settings = None      # -> get_tr_and_val_datasets
        self.synth_summary = None

    # ------------------------------------------------------------------ data
    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()     # the real split, untouched
        settings = resolve_settings(self.__class__.__name__, {"ratio": self.synth_ratio,
                                                              "min_quality": self.synth_min_quality,
                                                              "quality_key": self.synth_quality_key})
        self._refuse_changed_settings_on_continue(settings)
        self.synth_settings = settings
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
                                           len(synthetic_dataset.identifiers), self._count_slices(dataset_tr))
        else:
            summary.update(synthetic_cases={"available": 0, "used": 0, "below_threshold": 0, "unscored": 0},
                           note="ratio 0: real-only baseline, the synthetic pool is not read")
        summary["seed"] = self.synth_seed
        summary["rare_oversampling"] = self._rare_oversampling(dataset_tr)
        if self.synth_settings.ratio < 1 and len(dataset_tr.identifiers) == 0:
            raise NnsynthError(f"fold {self.fold} has no real training case; a ratio below 1 needs some")
        self.synth_summary = summary
        self._report(summary)
        return SynthMixDataset(dataset_tr, synthetic_dataset), dataset_val

    def _rare_oversampling(self, dataset_tr) -> dict:
        """{"probability", "class", "pixels_per_class"} of ``nnsynth_rare_oversampling`` (probability 0: off)."""
        probability = parse_rare_oversampling(os.environ.get(ENV_RARE_OVERSAMPLING, "0"))
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

    @staticmethod
    def _count_slices(dataset) -> int:
        """Slices of the real training cases (2d: the first spatial axis of each preprocessed case)."""
        return sum(int(dataset.load_case(identifier)[0].shape[1]) for identifier in dataset.identifiers)

    def _synthetic_training_dataset(self, settings, validation_cases):
        if len(self.configuration_manager.patch_size) != 2:
            raise NnsynthError(f"{self.__class__.__name__} mixes single-slice synthetic cases and supports 2d "
                               f"configurations only, not '{self.configuration_name}' (patch size "
                               f"{self.configuration_manager.patch_size}): train a 2d configuration, or use the "
                               f"_r0 variant for a real-only run")
        if self.is_cascaded:
            raise NnsynthError(f"{self.__class__.__name__} does not support cascaded configurations")
        if not nnUNet_raw.is_set():
            raise NnsynthError("nnUNet_raw is not set: the synthetic manifest is read from the raw dataset folder")
        raw_folder = Path(nnUNet_raw.get()) / self.plans_manager.dataset_name
        store = SyntheticStore(RawDataset(raw_folder))
        available = store.complete_case_ids()
        for_fold = select_for_fold(store.manifest, available, self.fold, validation_cases)
        if not for_fold.allowed:
            if not available:
                reason = "it holds none"
            elif str(self.fold) == "all":
                reason = f"none of the {len(available)} was made for fold all"
            else:
                reason = (f"all {len(available)} depend on fold {self.fold}'s validation cases (they were made "
                          f"for other folds)")
            raise NnsynthError(f"no synthetic case of {store.manifest_file} may be used for fold {self.fold}: {reason}: "
                               f"run nnsynth_generate {self.plans_manager.dataset_name} --fold {self.fold} (or set "
                               f"nnsynth_ratio=0 for a real-only run)")
        report = update_synthetic_pool(raw_folder, self.preprocessed_dataset_folder_base, self.plans_manager.plans,
                                       self.configuration_name, self.dataset_json,
                                       log=lambda message: self.print_to_log_file(message), case_ids=for_fold.allowed)
        self.print_to_log_file(report.summary())
        selection = select_synthetic_cases(store.cases, report.case_ids, settings.min_quality, settings.quality_key,
                                           fold=self.fold)
        pool_summary = {"pool_folder": str(report.folder), "provenance": for_fold.counts(),
                        "synthetic_cases": selection.counts(), "used_synthetic_cases": selection.used,
                        "left_out": {"below_threshold": selection.below_threshold, "unscored": selection.unscored,
                                     "scored_by_another_fold": selection.scored_by_another_fold}}
        if not selection.used:
            raise NnsynthError(f"no synthetic case to mix in: {selection.counts()} (manifest "
                               f"{store.manifest_file}, quality key {settings.quality_key}, threshold "
                               f"{settings.min_quality}); generate cases, lower nnsynth_min_quality, or set "
                               f"nnsynth_ratio=0 for a real-only run")
        pool_dataset_class = infer_dataset_class(str(report.folder))
        return pool_dataset_class(str(report.folder), list(selection.used)), pool_summary

    def _refuse_changed_settings_on_continue(self, settings):
        previous_file = Path(self.output_folder) / SETTINGS_FILE_NAME
        if self.current_epoch == 0 or not previous_file.is_file():
            return
        with open(previous_file) as handle:
            previous = json.load(handle).get("settings", {})
        previous = {key: previous.get(key) for key in settings.comparable()}
        if previous != settings.comparable():
            raise NnsynthError(f"this run was started with {previous} ({previous_file}) but would continue with "
                               f"{settings.comparable()}: restore the environment (nnsynth_*) or start a new run")

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

    def _stop(self, error: NnsynthError):
        """End nnUNetv2_train with the one-line message (in the log too) instead of a traceback."""
        message = "nnsynth: error: " + " ".join(str(error).split())
        self.print_to_log_file(message)
        print(message, file=sys.stderr, flush=True)
        sys.exit(2)

    def get_dataloaders(self):
        """nnUNetTrainer.get_dataloaders (2.8.1) with SynthMixDataLoader as the training loader."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        deep_supervision_scales = self._get_deep_supervision_scales()
        (rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size,
         mirror_axes) = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        tr_transforms = self.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
            is_cascaded=self.is_cascaded, foreground_labels=self.label_manager.foreground_labels,
            regions=self.label_manager.foreground_regions if self.label_manager.has_regions else None,
            ignore_label=self.label_manager.ignore_label)
        val_transforms = self.get_validation_transforms(
            deep_supervision_scales, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels,
            regions=self.label_manager.foreground_regions if self.label_manager.has_regions else None,
            ignore_label=self.label_manager.ignore_label)

        try:
            dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        except NnsynthError as error:
            self._stop(error)
        dl_tr = SynthMixDataLoader(dataset_tr, self.batch_size, initial_patch_size,
                                   self.configuration_manager.patch_size, self.label_manager,
                                   synthetic_ratio=self.synth_settings.ratio,
                                   oversample_foreground_percent=self.oversample_foreground_percent,
                                   sampling_probabilities=None, pad_sides=None, transforms=tr_transforms,
                                   probabilistic_oversampling=self.probabilistic_oversampling)
        rare = self.synth_summary["rare_oversampling"]
        if rare["probability"] > 0:
            dl_tr.enable_rare_oversampling(rare["class"], rare["probability"])
            self.print_to_log_file(f"SynthMix: {rare['probability']:.2f} of the real draws are centred on the rarest "
                                   f"class {rare['class']} (pixels per class {rare['pixels_per_class']})")
        dl_val = nnUNetDataLoader(dataset_val, self.batch_size, self.configuration_manager.patch_size,
                                  self.configuration_manager.patch_size, self.label_manager,
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
            mt_gen_val = NonDetMultiThreadedAugmenter(data_loader=dl_val, transform=None,
                                                      num_processes=max(1, allowed_num_processes // 2),
                                                      num_cached=max(3, allowed_num_processes // 4), seeds=None,
                                                      pin_memory=self.device.type == 'cuda', wait_time=0.002)
        _ = next(mt_gen_train)
        _ = next(mt_gen_val)
        return mt_gen_train, mt_gen_val


# ---------------------------------------------------------------- named ratio variants (nnUNetTrainer_Xepochs style)
class nnUNetTrainerSynthMix_r0(nnUNetTrainerSynthMix):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        """real-only baseline through the same code path (the synthetic pool is not read)"""
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.synth_ratio = 0.0


class nnUNetTrainerSynthMix_r25(nnUNetTrainerSynthMix):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.synth_ratio = 0.25


class nnUNetTrainerSynthMix_r50(nnUNetTrainerSynthMix):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.synth_ratio = 0.5


class nnUNetTrainerSynthMix_r75(nnUNetTrainerSynthMix):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.synth_ratio = 0.75


class nnUNetTrainerSynthMix_r100(nnUNetTrainerSynthMix):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        """synthetic-only training, validated on real cases"""
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.synth_ratio = 1.0


# ---------------------------------------------------------------- short runs for tests and demos
class nnUNetTrainerSynthMix_debug(nnUNetTrainerSynthMix):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        """4 epochs of 25 training and 2 validation iterations (about 30 s on 2 CPU cores with small plans);
        settings from the environment"""
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 4
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 2


class nnUNetTrainerSynthMix_demo(nnUNetTrainerSynthMix):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        """20 epochs of 25 training and 2 validation iterations (a few minutes on 2 CPU cores with small
        plans): what nnsynth_demo trains; settings from the environment"""
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 20
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 2


class nnUNetTrainerSynthMix_smoke(nnUNetTrainerSynthMix):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        """1 epoch of 10 training and 1 validation iteration, no prediction of the fold's validation cases at the
        end: checks that a pipeline runs, nothing more"""
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 10
        self.num_val_iterations_per_epoch = 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("nnUNetTrainerSynthMix_smoke: the fold's validation cases are not predicted")


class nnUNetTrainerSynthMix_short(nnUNetTrainerSynthMix):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        """4 epochs of 25 training and 2 validation iterations, and no prediction of the fold's validation cases
        at the end: for repeated downstream runs on a CPU, which score their own test set; settings from the
        environment"""
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 4
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 2

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("nnUNetTrainerSynthMix_short: the fold's validation cases are not predicted (the "
                               "downstream evaluation predicts its test set with nnUNetv2_predict)")


class nnUNetTrainerSynthMix_medium(nnUNetTrainerSynthMix_short):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        """20 epochs of 25 training and 2 validation iterations (the demo's 500), and no prediction of the fold's
        validation cases at the end: for repeated downstream runs on a CPU; settings from the environment"""
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 20
