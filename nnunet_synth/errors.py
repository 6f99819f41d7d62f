"""One-line errors for bad input, and the wrapper that turns them into a clean exit for every command."""
import argparse
import errno
import functools
import os
import sys


class NnsynthError(Exception):
    """An error the user can fix. The message is one line that names the file and the fix."""


class CommandParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (an unknown option, a value outside ``choices``) are one
    ``nnsynth: error:`` line, as every other refusal of a command (``command_entry_point``)."""

    def error(self, message):
        raise NnsynthError(f"{message}: see {self.prog} --help")


_WARNED = set()


def warn_once(key, message: str):
    """Print ``nnsynth: warning: <message>`` on stderr the first time ``key`` is warned about in this process: a
    condition nnU-Net itself only warns about (the command goes on)."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    print(f"nnsynth: warning: {' '.join(message.split())}", file=sys.stderr)


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (libraries chain several), at most 200 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


def storage_error(path, error: BaseException, action: str = "write") -> NnsynthError:
    """One line for a failed ``action`` on ``path`` (disk full, read-only, permissions, other I/O errors) that
    says what to do; commands resume, so the fix is always followed by a rerun."""
    code = getattr(error, "errno", None)
    reason = os.strerror(code) if code else (str(error).strip() or type(error).__name__)
    folder = os.path.dirname(os.path.abspath(path))
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free space on the disk holding {folder}, then rerun the same command (it resumes)"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f"make {folder} writable (permissions, a read-write mount), then rerun the same command"
    else:
        fix = "check the disk and the file system, then rerun the same command"
    return NnsynthError(f"{path}: cannot {action} ({reason}): {fix}")


def _close_progress_bars():
    """End the progress bars a failure interrupted, so that the error starts a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def command_entry_point(main_function):
    """Run a command's main function; print NnsynthError as one line on stderr and exit with status 2."""

    @functools.wraps(main_function)
    def wrapper(*args, **kwargs):
        _WARNED.clear()             # warnings are once per command, also for commands run in one process
        try:
            return main_function(*args, **kwargs)
        except NnsynthError as error:
            _close_progress_bars()
            message = " ".join(str(error).split())
            print(f"nnsynth: error: {message}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("nnsynth: interrupted; rerun the same command to resume", file=sys.stderr)
            sys.exit(130)

    return wrapper
