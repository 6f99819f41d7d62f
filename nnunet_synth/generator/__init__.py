"""Stage 3: the mask-conditioned diffusion generator and its CBMAT training (Diff-Lung §2.1-2.2)."""
from nnunet_synth.dataset.splits import fold_training_cases
from nnunet_synth.generator.ablation import (
                                             AblationSchedule,
                                             ablate_label_maps,
                                             cbmat_initial_probabilities,
                                             make_ablation_schedule,
                                             one_hot_condition,
                                             training_noise,
)
from nnunet_synth.generator.checkpoints import generator_run_folder, load_generator, resolve_generator_folder
from nnunet_synth.generator.config import PRESETS, GeneratorConfig, TrainingSettings, build_noise_scheduler, build_unet
from nnunet_synth.generator.data import load_model_slices, mask_outside_region
from nnunet_synth.generator.training import TrainingResult, denoising_loss, train_generator

__all__ = [
    "AblationSchedule", "ablate_label_maps", "cbmat_initial_probabilities", "make_ablation_schedule",
    "one_hot_condition", "training_noise", "generator_run_folder", "load_generator", "resolve_generator_folder",
    "GeneratorConfig", "PRESETS", "TrainingSettings", "build_noise_scheduler", "build_unet", "fold_training_cases",
    "load_model_slices", "mask_outside_region", "TrainingResult", "denoising_loss", "train_generator",
]
