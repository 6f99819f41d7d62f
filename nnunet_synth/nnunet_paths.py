"""nnU-Net's three folders (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``), the one place that reads
them. They are read through ``nnunetv2.paths`` at every call, not at import, so a folder exported after import (the
tests' tree, a command that sets up its own folders) counts; an empty value counts as unset."""
from pathlib import Path
from typing import Optional

from nnunetv2 import paths

from nnunet_synth.errors import NnsynthError

FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def nnunet_folder(name: str) -> Optional[Path]:
    """The folder ``name`` (one of ``FOLDERS``) points at, or None when it is not set."""
    if name not in FOLDERS:
        raise ValueError(f"{name} is not one of nnU-Net's folders {FOLDERS}")
    value = getattr(paths, name).get()
    return Path(value) if value else None


def require_nnunet_folder(name: str, needed_for: str) -> Path:
    """The folder ``name`` points at; ``NnsynthError`` naming ``needed_for`` (what reads it) when it is not set."""
    folder = nnunet_folder(name)
    if folder is None:
        raise NnsynthError(f"the environment variable {name} is not set ({needed_for}): "
                           f"export {name}=/path/to/{name}")
    return folder

