"""The generators of the MAT / CBMAT / inpaint arms when the evaluation chooses the training patients itself
(``--test-patients`` / ``--real-cases``): trained on exactly the training patients of the setting, so no test,
validation or left-out patient reaches synthetic data."""
from dataclasses import dataclass
from pathlib import Path

from nnunet_synth.dataset import RawDataset
from nnunet_synth.errors import NnsynthError

# arm -> (generator mode, ablation mode) of the generator the arm trains (or is given)
ARM_GENERATORS = {"mat": ("slice", "mat"), "cbmat": ("slice", "cbmat"), "none": ("slice", "none"),
                  "inpaint": ("inpaint", "cbmat")}


@dataclass(frozen=True)
class ArmGeneratorSettings:
    preset: str = "tiny"
    steps: int = 400
    learning_rate: float = 1e-3
    seed: int = 0
    inpaint_steps: int = 300            # docs/inpainting.md: 300 steps of batch 4 on the CPU preset
    inpaint_batch_size: int = 4


def train_arm_generator(dataset: RawDataset, folder, training_cases, arm: str,
                        settings: ArmGeneratorSettings) -> Path:
    """Train (or reuse) the generator of ``arm`` (``ARM_GENERATORS``) on ``training_cases`` only; return its final
    folder."""
    from nnunet_synth.generator.config import TrainingSettings
    from nnunet_synth.generator.training import train_generator
    mode, ablation_mode = ARM_GENERATORS[arm]
    steps, batch_size = (settings.inpaint_steps, settings.inpaint_batch_size) if mode == "inpaint" else \
        (settings.steps, None)
    training = TrainingSettings(preset=settings.preset, mode=mode, max_steps=steps, batch_size=batch_size,
                                learning_rate=settings.learning_rate, ablation_mode=ablation_mode,
                                seed=settings.seed, preview_every=steps)
    result = train_generator(dataset, Path(folder), training, fold=0, case_ids=sorted(training_cases))
    return result.final_folder


def check_arm_generator(arm: str, generator_folder):
    """Refuse a given generator whose mode is not the one ``arm`` needs (a whole-slice generator as ``inpaint=``, an
    inpainting one as ``cbmat=``); other arm names take either."""
    if arm not in ARM_GENERATORS:
        return
    from nnunet_synth.generator.checkpoints import read_generator_config, resolve_generator_folder
    folder = resolve_generator_folder(generator_folder)
    found, needed = read_generator_config(folder).mode, ARM_GENERATORS[arm][0]
    if found != needed:
        raise NnsynthError(f"{folder}: arm '{arm}' needs a {needed} generator, this one is a {found} generator: "
                           f"pass it under another arm name (--generator NAME={generator_folder}), or leave out "
                           f"--generator {arm}=... to train one here")
