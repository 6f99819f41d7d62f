"""Short training runs for tests, demos and repeated downstream runs on a CPU; every setting from the
environment. ``BUDGETS`` is shared with the lesion-paste variants, so the arms of an evaluation train alike."""
from nnunet_synth.trainers.synth_mix import TrainingBudget, nnUNetTrainerSynthMix

BUDGETS = {
    "smoke": TrainingBudget(epochs=1, iterations_per_epoch=10, val_iterations_per_epoch=1),
    "debug": TrainingBudget(epochs=2, iterations_per_epoch=10, val_iterations_per_epoch=1),
    "short": TrainingBudget(epochs=4, iterations_per_epoch=25, val_iterations_per_epoch=2),
    "demo": TrainingBudget(epochs=10, iterations_per_epoch=25, val_iterations_per_epoch=2),
    "medium": TrainingBudget(epochs=20, iterations_per_epoch=25, val_iterations_per_epoch=2),
}
# smoke, short, demo and medium skip the final prediction of the fold's validation cases (predict_validation_cases):
# the evaluation scores its own test set, nnsynth_demo predicts the demo fold's validation cases with the stock
# nnUNetv2_predict


class nnUNetTrainerSynthMix_smoke(nnUNetTrainerSynthMix):
    """1 epoch of 10 iterations, no final validation: checks that a pipeline runs, nothing more"""
    budget = BUDGETS["smoke"]
    predict_validation_cases = False


class nnUNetTrainerSynthMix_debug(nnUNetTrainerSynthMix):
    """2 epochs of 10 iterations, then the final validation: the whole training loop of stock nnU-Net, briefly"""
    budget = BUDGETS["debug"]


class nnUNetTrainerSynthMix_short(nnUNetTrainerSynthMix):
    """4 epochs of 25 iterations, no final validation"""
    budget = BUDGETS["short"]
    predict_validation_cases = False


class nnUNetTrainerSynthMix_demo(nnUNetTrainerSynthMix):
    """10 epochs of 25 iterations (a few minutes on a CPU core with small plans), no final validation: what
    nnsynth_demo trains (it predicts the fold's validation cases with nnUNetv2_predict afterwards)"""
    budget = BUDGETS["demo"]
    predict_validation_cases = False


class nnUNetTrainerSynthMix_medium(nnUNetTrainerSynthMix):
    """20 epochs of 25 iterations, no final validation"""
    budget = BUDGETS["medium"]
    predict_validation_cases = False
