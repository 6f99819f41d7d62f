"""Lesion-paste variants: ``_p50`` fixes ``nnsynth_paste_probability`` in the class name; the budget variants train
as long as the SynthMix budget of the same name (``budgets.BUDGETS``), so evaluation arms compare alike."""
from nnunet_synth.trainers.lesion_paste import nnUNetTrainerLesionPaste
from nnunet_synth.trainers.variants.budgets import BUDGETS


class nnUNetTrainerLesionPaste_p50(nnUNetTrainerLesionPaste):
    fixed_settings = {"paste_probability": 0.5}


class nnUNetTrainerLesionPaste_smoke(nnUNetTrainerLesionPaste):
    budget = BUDGETS["smoke"]
    predict_validation_cases = False


class nnUNetTrainerLesionPaste_debug(nnUNetTrainerLesionPaste):
    budget = BUDGETS["debug"]


class nnUNetTrainerLesionPaste_short(nnUNetTrainerLesionPaste):
    budget = BUDGETS["short"]
    predict_validation_cases = False


class nnUNetTrainerLesionPaste_demo(nnUNetTrainerLesionPaste):
    budget = BUDGETS["demo"]
    predict_validation_cases = False


class nnUNetTrainerLesionPaste_medium(nnUNetTrainerLesionPaste):
    budget = BUDGETS["medium"]
    predict_validation_cases = False
