"""SynthMix variants that fix ``nnsynth_ratio`` in the class name, so results folders of different ratios never
collide; they refuse an ``nnsynth_ratio`` that contradicts their name and read every other setting."""
from nnunet_synth.trainers.synth_mix import nnUNetTrainerSynthMix


class nnUNetTrainerSynthMix_r0(nnUNetTrainerSynthMix):
    """real-only baseline through the same code path (the synthetic pool is not read)"""
    fixed_settings = {"ratio": 0.0}


class nnUNetTrainerSynthMix_r25(nnUNetTrainerSynthMix):
    fixed_settings = {"ratio": 0.25}


class nnUNetTrainerSynthMix_r50(nnUNetTrainerSynthMix):
    fixed_settings = {"ratio": 0.5}


class nnUNetTrainerSynthMix_r75(nnUNetTrainerSynthMix):
    fixed_settings = {"ratio": 0.75}


class nnUNetTrainerSynthMix_r100(nnUNetTrainerSynthMix):
    """synthetic-only training, validated on real cases"""
    fixed_settings = {"ratio": 1.0}
