"""nnUNetTrainerLesionPaste: nnU-Net training with online lesion copy-paste (TumorCP) in the data loader.

    nnUNetv2_train DatasetXXX 2d 0 -tr nnUNetTrainerLesionPaste            # real cases, p = 0.5
    nnsynth_ratio=0.5 nnUNetv2_train DatasetXXX 2d 0 -tr nnUNetTrainerLesionPaste   # and synthetic cases mixed in

A SynthMix trainer whose defaults are ``nnsynth_ratio=0`` (real only) and ``nnsynth_paste_probability=0.5``;
the paste itself is ``pasting.LesionPasteTransform``, put in front of nnU-Net's training transforms by
``build_training_loader``. Pastes go into real samples only; synthetic cases (when mixed in) keep their maps.
The donors, their memory and the paste counts (summed from the workers at every epoch end) are in
``synthmix.json`` (``lesion_paste``); settings through ``settings.py`` like every other, so ``--c`` refuses a
change of ``nnsynth_paste_probability``, ``nnsynth_paste_components`` or ``nnsynth_paste_classes``.
"""
import shutil
import time
from pathlib import Path

import torch
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

from nnunet_synth.atomic import write_json_atomic
from nnunet_synth.errors import NnsynthError
from nnunet_synth.trainers.pasting import LesionPasteTransform, check_paste_class_names, extract_donors, gather_counts
from nnunet_synth.trainers.synth_mix import SETTINGS_FILE_NAME, exit_with_error, nnUNetTrainerSynthMix

COUNTS_FOLDER_NAME = "lesion_paste_counts"


class nnUNetTrainerLesionPaste(nnUNetTrainerSynthMix):
    default_settings = {"ratio": 0.0, "paste_probability": 0.5}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        try:
            check_paste_class_names(self.synth_settings.paste_classes, dataset_json)
        except NnsynthError as error:
            exit_with_error(error)
        self.paste_report = None

    def build_training_loader(self, dataset_tr, batch_size, patch_size, final_patch_size, label_manager, **kwargs):
        settings = self.synth_settings
        if settings.paste_probability > 0:
            try:
                paste = self._paste_transform(dataset_tr)
            except NnsynthError as error:
                exit_with_error(error, self.print_to_log_file)
            kwargs["transforms"] = ComposeTransforms([paste, *kwargs["transforms"].transforms])
        return super().build_training_loader(dataset_tr, batch_size, patch_size, final_patch_size, label_manager,
                                             **kwargs)

    def _paste_transform(self, dataset_tr) -> LesionPasteTransform:
        """Donors from the fold's real training cases (never a validation case, never a synthetic one)."""
        settings = self.synth_settings
        start = time.perf_counter()
        bank = extract_donors(dataset_tr.real_dataset, dataset_tr.real_identifiers, self.dataset_json,
                              settings.paste_classes, two_d=len(self.configuration_manager.patch_size) == 2,
                              seed=0 if settings.seed is None else settings.seed)
        counts_folder = Path(self.output_folder) / COUNTS_FOLDER_NAME
        if self.current_epoch == 0 and counts_folder.exists():
            shutil.rmtree(counts_folder)        # a new run: counts of an earlier run in this folder are dropped
        self.paste_report = {"probability": settings.paste_probability, "max_components": settings.paste_components,
                             **bank.summary(), "extraction_seconds": round(time.perf_counter() - start, 2),
                             "counts_gathered_from": f"{COUNTS_FOLDER_NAME}/process_*.json (each data loading "
                                                     f"process writes its counts every few samples)"}
        self.print_to_log_file(
            f"LesionPaste: p={settings.paste_probability}, up to {settings.paste_components} components per sample "
            f"of classes {list(bank.paste_classes)} into {list(bank.host_classes) or 'background inside the body'}; "
            f"{sum(len(d) for d in bank.by_class.values())} donor components from "
            f"{len(self.paste_report['donor_cases'])} training cases, {bank.nbytes / 2 ** 20:.1f} MiB per data "
            f"loading process")
        self._write_paste_report()
        return LesionPasteTransform(bank, settings.paste_probability, settings.paste_components, counts_folder,
                                    dataset=dataset_tr)

    def _write_paste_report(self):
        settings_file = Path(self.output_folder) / SETTINGS_FILE_NAME
        summary = dict(self.synth_summary or {})
        counts = gather_counts(Path(self.output_folder) / COUNTS_FOLDER_NAME)
        summary["lesion_paste"] = {**self.paste_report, "counts": counts}
        self.synth_summary = summary
        write_json_atomic(summary, settings_file)

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.paste_report is not None:
            self._write_paste_report()

    def on_train_end(self):
        transform = getattr(getattr(self.dataloader_train, "data_loader", None), "transforms", None)
        for step in getattr(transform, "transforms", []):      # the main process's own counts (no workers)
            if isinstance(step, LesionPasteTransform):
                step.write_counts()
        super().on_train_end()
        if self.paste_report is not None:
            self._write_paste_report()
