"""Atomic writes: every file appears complete under its final name or not at all."""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

TEMP_PREFIX = ".nnsynth_tmp_"


@contextlib.contextmanager
def atomic_path(final_path, suffix=None):
    """Yield a temporary path next to ``final_path``; on success rename it onto ``final_path``.

    The temporary name keeps the file ending (``suffix``, default: everything after the first dot of the
    final name) so that writers that pick a format by ending (SimpleITK, skimage) write the right format.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        name = final_path.name
        suffix = name[name.index("."):] if "." in name else ""
    handle, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=final_path.parent)
    os.close(handle)
    try:
        yield temp_name
        _fsync(temp_name)          # the content is on disk before the name says the file is complete
        os.replace(temp_name, final_path)
    finally:
        if os.path.exists(temp_name):
            os.remove(temp_name)


def _fsync(path):
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def copy_file_atomic(source, final_path):
    """Copy ``source`` to ``final_path`` atomically."""
    with atomic_path(final_path) as temp_name:
        shutil.copyfile(source, temp_name)


def write_json_atomic(data, final_path):
    """Write ``data`` as indented JSON to ``final_path`` atomically."""
    with atomic_path(final_path, suffix=".json") as temp_name:
        with open(temp_name, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)


def remove_stale_temp_files(folder):
    """Delete temporary files an interrupted run left in ``folder``; return how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = list(folder.glob(TEMP_PREFIX + "*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
