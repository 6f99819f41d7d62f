"""Atomic writes: every file appears complete under its final name or not at all.

A writer may fail without saying so (SimpleITK writes a short file on a full disk and only prints an error), so a
caller can pass ``verify``: it reads the temporary file back before the rename and raises when it is incomplete.
I/O errors (disk full, read-only folder, permissions) become one ``NnsynthError`` line naming the path and the fix.
"""
import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from nnunet_synth.errors import storage_error

TEMP_PREFIX = ".nnsynth_tmp_"


@contextlib.contextmanager
def atomic_path(final_path, suffix=None, verify=None):
    """Yield a temporary path next to ``final_path``; on success (and after ``verify(temp_name)``, when given,
    passed) rename it onto ``final_path``. The temporary file is removed on any failure.

    The temporary name keeps the file ending (``suffix``, default: everything after the first dot of the
    final name) so that writers that pick a format by ending (SimpleITK, skimage) write the right format.
    """
    final_path = Path(final_path)
    if suffix is None:
        name = final_path.name
        suffix = name[name.index("."):] if "." in name else ""
    try:
        final_path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=final_path.parent)
        os.close(handle)
    except OSError as error:
        raise storage_error(final_path, error) from None
    try:
        yield temp_name
        if verify is not None:
            verify(temp_name)
        _fsync(temp_name)          # the content is on disk before the name says the file is complete
        os.replace(temp_name, final_path)
    except OSError as error:
        raise storage_error(final_path, error) from None
    finally:
        try:
            if os.path.exists(temp_name):
                os.remove(temp_name)
        except OSError:
            pass                   # a read-only folder: nothing was written there either


class IncompleteWrite(OSError):
    """The file read back differs from what was written (a writer that failed without raising)."""


def check_size(path, expected_bytes: int):
    size = os.path.getsize(path)
    if size != expected_bytes:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        code = errno.ENOSPC if free < expected_bytes else errno.EIO
        raise IncompleteWrite(code, f"{size} of {expected_bytes} bytes written")


def _fsync(path):
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def copy_file_atomic(source, final_path):
    """Copy ``source`` to ``final_path`` atomically."""
    expected = os.path.getsize(source)
    with atomic_path(final_path, verify=lambda temp_name: check_size(temp_name, expected)) as temp_name:
        shutil.copyfile(source, temp_name)


def write_json_atomic(data, final_path):
    """Write ``data`` as indented JSON to ``final_path`` atomically."""
    text = json.dumps(data, indent=2, sort_keys=False).encode()
    with atomic_path(final_path, suffix=".json", verify=lambda temp_name: check_size(temp_name, len(text))) \
            as temp_name:
        with open(temp_name, "wb") as handle:
            handle.write(text)


def remove_stale_temp_files(folder):
    """Delete temporary files an interrupted run left in ``folder``; return how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = list(folder.glob(TEMP_PREFIX + "*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
