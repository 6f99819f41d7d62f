"""The generators of the MAT / CBMAT arms when the evaluation chooses the training patients itself
(``--test-patients`` / ``--real-cases``): trained on exactly the training patients of the setting, so no test,
validation or left-out patient reaches synthetic data."""
from dataclasses import dataclass
from pathlib import Path

from nnunet_synth.dataset import RawDataset


@dataclass(frozen=True)
class ArmGeneratorSettings:
    preset: str = "tiny"
    steps: int = 400
    learning_rate: float = 1e-3
    seed: int = 0


def train_arm_generator(dataset: RawDataset, folder, training_cases, ablation_mode: str,
                        settings: ArmGeneratorSettings) -> Path:
    """Train (or reuse) a generator on ``training_cases`` only; return its final folder."""
    from nnunet_synth.generator.config import TrainingSettings
    from nnunet_synth.generator.training import train_generator
    training = TrainingSettings(preset=settings.preset, max_steps=settings.steps, learning_rate=settings.learning_rate,
                                ablation_mode=ablation_mode, seed=settings.seed, preview_every=settings.steps)
    result = train_generator(dataset, Path(folder), training, fold=0, case_ids=sorted(training_cases))
    return result.final_folder
