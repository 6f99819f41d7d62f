"""Where nnU-Net finds the nnunet-synth trainers: the folder for ``nnUNet_extTrainer`` and the modules that
define trainer classes (re-exported there by ``nnunet_ext/nnsynth_trainers.py``)."""
import importlib
import inspect

from nnunet_synth.trainer_lookup import ext_trainer_value, trainer_directory  # noqa: F401  (re-exported)

# every module of the installed package that defines nnU-Net trainer classes
TRAINER_MODULES = (
    "nnunet_synth.trainers.synth_mix",
    "nnunet_synth.trainers.variants.ratios",
    "nnunet_synth.trainers.variants.budgets",
    "nnunet_synth.trainers.lesion_paste",
    "nnunet_synth.trainers.variants.paste",
)


def trainer_classes() -> dict:
    """{class name: class} of every trainer the package defines (classes whose name starts with nnUNetTrainer,
    defined in one of ``TRAINER_MODULES``)."""
    found = {}
    for module_name in TRAINER_MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and name.startswith("nnUNetTrainer") and value.__module__ == module_name:
                found[name] = value
    return found

