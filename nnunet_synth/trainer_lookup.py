"""Where nnU-Net finds the nnunet-synth trainers (``nnUNet_extTrainer``). The folder is located by its module name
(``importlib.util.find_spec``), without importing any trainer, so that every layer can point nnU-Net at the
trainers while only ``trainers`` and the commands import them."""
import contextlib
import importlib.util
import os
from pathlib import Path

EXT_PACKAGE = "nnunet_synth.trainers.nnunet_ext"     # re-exports every trainer class (trainers/nnunet_ext/)


def trainer_directory() -> Path:
    """The installed folder of the re-export modules, for ``nnUNet_extTrainer``."""
    spec = importlib.util.find_spec(EXT_PACKAGE)
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def ext_trainer_value(existing: str = None) -> str:
    """``existing`` (an nnUNet_extTrainer value) with our directory added once, at the end."""
    ours = str(trainer_directory())
    parts = [part for part in (existing or "").split(os.pathsep) if part]
    return os.pathsep.join(parts if ours in parts else parts + [ours])


@contextlib.contextmanager
def trainers_visible():
    """Within the block, nnU-Net's in-process trainer lookup (it reads ``nnUNet_extTrainer`` when called) also
    searches our folder; the variable is restored afterwards."""
    previous = os.environ.get("nnUNet_extTrainer")
    os.environ["nnUNet_extTrainer"] = ext_trainer_value(previous)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("nnUNet_extTrainer", None)
        else:
            os.environ["nnUNet_extTrainer"] = previous
