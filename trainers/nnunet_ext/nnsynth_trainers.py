"""Re-exports the nnunet-synth trainers for nnU-Net's ``nnUNet_extTrainer`` lookup.

nnU-Net imports every module of the directories listed in ``nnUNet_extTrainer`` as a top-level module and
takes the class of the requested name from it. The classes are *defined* in the installed package
(``nnunet_synth.trainers``), so pickling them for data-augmentation workers works under every multiprocessing
start method; this module only re-exports them (``nnunet_synth.trainers.discovery.TRAINER_MODULES``). A failing
import is reported as a warning instead of an exception: one exception here would abort nnU-Net's whole trainer
lookup.
"""
import warnings

__all__ = []

try:
    from nnunet_synth.trainers.discovery import trainer_classes
    for _name, _trainer_class in trainer_classes().items():
        globals()[_name] = _trainer_class
        __all__.append(_name)
except Exception as error:  # noqa: BLE001 - any failure must leave nnU-Net's lookup running
    warnings.warn(f"nnunet-synth trainers are unavailable ({type(error).__name__}: {error}); reinstall "
                  f"nnunet-synth in this Python environment (pip install nnunet-synth)")
