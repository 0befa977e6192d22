"""User errors: mistakes a user can fix, which an entry point reports in one line instead of a traceback.

A user error is
    UserError      raised by our code where the user's input is at fault: UserValueError (a flag
                   value, network or dataset name, model config) or UserFileError (a file that is
                   damaged, of the wrong kind, cannot be written or cannot be fetched) or UserRunError
                   (a run that cannot go on, such as a diverged loss);
    OSError        the operating system refused: a missing, unreadable or unwritable file, a full
                   disk, a failed download (FileNotFoundError, PermissionError, ...).
Everything else is a programming error and keeps its traceback. The two subclasses also derive
from ValueError / RuntimeError, so code catching those keeps working.
"""
import contextlib
import sys
from typing import Iterator


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and what to do."""


class UserValueError(UserError, ValueError):
    """A value the user chose is out of range or unknown."""


class UserFileError(UserError, RuntimeError):
    """A file the user named (or the run needs) is damaged, of the wrong kind, unwritable or unobtainable."""


class UserRunError(UserError, RuntimeError):
    """A run cannot go on for a reason the user can act on: a loss that became non-finite, a launch
    that does not fit the machine (more processes than GPUs, CUDA missing)."""


# What exit_on_user_error reports in one line.
USER_ERRORS = (UserError, OSError)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn a user error raised inside the block into one `error: <message>` line on stderr and exit status 1.

        if __name__ == "__main__":
            with exit_on_user_error():
                main()

    Other exceptions, SystemExit (argparse's usage errors, exit 2) and KeyboardInterrupt pass through.
    """
    try:
        yield
    except USER_ERRORS as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
