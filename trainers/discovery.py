"""Where nnU-Net finds the nnunet-synth trainers: the folder for ``nnUNet_extTrainer``."""
import os
from pathlib import Path


def trainer_directory() -> Path:
    """The installed folder of re-export modules (nnunet_synth.trainers.nnunet_ext)."""
    import nnunet_synth.trainers.nnunet_ext as ext
    return Path(ext.__file__).resolve().parent


def ext_trainer_value(existing: str = None) -> str:
    """``existing`` (an nnUNet_extTrainer value) with our directory added once, at the end."""
    ours = str(trainer_directory())
    parts = [part for part in (existing or "").split(os.pathsep) if part]
    return os.pathsep.join(parts if ours in parts else parts + [ours])
