"""Trainers for the GPU kit's evidence stage, found through ``nnUNet_extTrainer`` (run.sh adds this folder).

Both arms run the SynthMix code path with the same budget (``nnsynth_kit_epochs`` x ``nnsynth_kit_iterations``,
default 10 x 50) and the same seed (``nnsynth_kit_seed``, default 0; nnU-Net's data augmentation workers stay
nondeterministic). ``_r0`` is the real-only baseline, ``_r50`` half of each batch synthetic; separate class names
keep their results folders apart.
"""
import os
import random

import numpy as np
import torch

from nnunet_synth.trainers.synth_mix import nnUNetTrainerSynthMix


class nnUNetTrainerKit_r0(nnUNetTrainerSynthMix):
    fixed_settings = {"ratio": 0.0}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        seed = int(os.environ.get("nnsynth_kit_seed", "0"))
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("nnsynth_kit_epochs", "10"))
        self.num_iterations_per_epoch = int(os.environ.get("nnsynth_kit_iterations", "50"))
        self.num_val_iterations_per_epoch = int(os.environ.get("nnsynth_kit_val_iterations", "5"))


class nnUNetTrainerKit_r50(nnUNetTrainerKit_r0):
    fixed_settings = {"ratio": 0.5}


class nnUNetTrainerKitSmoke_r50(nnUNetTrainerKit_r0):
    """What the CPU rehearsal trains instead of nnUNetTrainerSynthMix_debug (2 x 10 iterations): the same
    SynthMix code path with the rehearsal's tiny budget."""
    fixed_settings = {"ratio": 0.5}
