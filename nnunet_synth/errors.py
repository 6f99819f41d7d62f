"""One-line errors for bad input, and the wrapper that turns them into a clean exit for every command."""
import functools
import sys


class NnsynthError(Exception):
    """An error the user can fix. The message is one line that names the file and the fix."""


def command_entry_point(main_function):
    """Run a command's main function; print NnsynthError as one line on stderr and exit with status 2."""

    @functools.wraps(main_function)
    def wrapper(*args, **kwargs):
        try:
            return main_function(*args, **kwargs)
        except NnsynthError as error:
            message = " ".join(str(error).split())
            print(f"nnsynth: error: {message}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("nnsynth: interrupted; rerun the same command to resume", file=sys.stderr)
            sys.exit(130)

    return wrapper
