"""One error type for bad user input, so every layer can name the file or field at fault, and one way
to name the first few of many files in a message (an error's or a note's)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path


class InputError(ValueError):
    """Bad input from a user or a peer: says *where* (file or field) and *what to do*.

    ``where`` is a path or a field name; the message is written for the person who
    has to fix the input, not for the developer.
    """

    def __init__(self, where: str | Path, reason: str) -> None:
        self.where = str(where)
        self.reason = reason
        super().__init__(f"{self.where}: {reason}")

    def __reduce__(self) -> tuple:
        """Rebuilt from (where, reason) when it crosses a process boundary: a worker pool unpickling it
        from its one-string ``args`` raised TypeError in its result thread, and the pool hung."""
        return self.__class__, (self.where, self.reason)


class SettingsDiffer(InputError):
    """Settings that must stay as they were (a federation's for its life, a run's that resumes) asked to change.
    ``describe`` writes the message from a function naming each setting: here by its field (``train.lr``), on the
    command line again by the option typed (``--lr``), which is what the user has to leave out or set back."""

    def __init__(self, where: str | Path, describe: Callable[[Callable[[str], str]], str]) -> None:
        self.describe = describe
        super().__init__(where, describe(str))

    def __reduce__(self) -> tuple:
        return InputError, (self.where, self.reason)  # its message as written: the function stays in its process


class FederationError(RuntimeError):
    """The server refused us, or cannot be reached, for a reason retrying cannot fix (a token, an API
    version, another join of the site running, an hour of failed retries). Written for the site's user,
    like an ``InputError``: said, not traced back. Here, not in the client, so napari's widgets can tell
    it apart without importing torch."""


class GaveUp(FederationError):
    """The server did not answer, or failed, through all of a client's retries: unlike a refusal, a later try
    may find it back (a maintenance longer than the retries), so ``join`` exits with its own status for a
    service manager to restart it."""


SAID_ERRORS = (InputError, FederationError)  # a person's message already: no type name, no traceback


def error_line(exc: BaseException) -> str:
    """One status line for a person: an ``InputError`` or a ``FederationError`` already says where and what;
    anything else gets its type, since "[Errno 28] No space left on device" alone hides that it is an
    OSError."""
    return f"error: {exc}" if isinstance(exc, SAID_ERRORS) else f"error: {type(exc).__name__}: {exc}"


def first_names(names: Sequence[str], shown: int = 3) -> str:
    """The first few of a list of files or folders for a one-line message, "…" standing for the rest."""
    return ", ".join(names[:shown]) + (", …" if len(names) > shown else "")
