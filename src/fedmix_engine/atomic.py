"""Crash-safe file writes: write a temporary file beside the target, fsync, then rename over it.

A reader (or a process restarted after ``kill -9``) sees either the old file or the new one,
never a torn mix: ``os.replace`` is atomic on POSIX and Windows within one file system.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fedmix_engine.errors import InputError

_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")  # what _create_temporary names: .<name>.<12 hex>.tmp


def make_folder(path: str | Path) -> Path:
    """``mkdir -p`` that names the file in the way (an ``InputError``: ``--out`` given a file, or a
    file where a parent folder should be), or the folder it cannot create and why (no permission, a
    read-only share), instead of a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        refuse_file_in_the_way(path)
        raise InputError(path, "is a file where a folder is needed") from None
    except OSError as exc:
        raise InputError(path, f"cannot be created ({exc.strerror or exc}); choose a folder you can write to") \
            from None
    return path


def refuse_file_in_the_way(path: str | Path) -> None:
    """Refuse a folder still to be made when it, or the nearest of its parents that exists, is a file, as
    ``make_folder`` would, but before any work (a GUI checks its form before it starts a worker)."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise InputError(existing, "is a file where a folder is needed")


def _create_temporary(path: Path, mode: int | None) -> tuple[int, str]:
    """A new file beside ``path`` with ``mode`` if given, else the replaced file's mode, else what a
    plain ``open`` would give (0o666 less the umask, applied by the kernel). ``tempfile.mkstemp`` made
    every file 0o600: a site folder or a prediction written by one user was unreadable to the others."""
    if mode is None:
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(os.stat(path).st_mode)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOINHERIT", 0)
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")  # _TEMPORARY
        try:
            fd = os.open(tmp, flags, 0o666 if mode is None else mode)
        except FileExistsError:
            continue
        if mode is not None and os.name == "posix":
            with contextlib.suppress(OSError):  # a share without chmod: os.open's mode already bounds it
                os.fchmod(fd, mode)  # exactly: the umask may have narrowed it
        return fd, tmp


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: int | None = None) -> Iterator[BinaryIO]:
    """Open a temporary file for binary writing that replaces ``path`` only if the block succeeds.

    The result has ``mode`` if given (``0o600``: only its owner may read it), else the permissions of
    the file it replaces, else those of a plain ``open`` under the umask."""
    path = Path(path)
    make_folder(path.parent)
    try:
        fd, tmp = _create_temporary(path, mode)
    except OSError as exc:  # it names the hidden temporary (.x.json.3f2a….tmp), which means nothing to the user
        exc.filename = str(path)
        raise
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.raw.name = tmp  # named like a file opened by path (tifffile reads .name), not by its number
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            _name_the_file(exc, path)
        raise
    _fsync_dir(path.parent)


def is_interrupted_write(path: str | Path) -> bool:
    """Whether ``path`` is an atomic write's temporary file. One found later is a write that a crash or a
    kill interrupted before its rename: the file it was to replace is intact and nothing refers to it."""
    return bool(_TEMPORARY.fullmatch(Path(path).name))


def remove_interrupted_writes(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed writes left in ``folder`` and below (``is_interrupted_write``);
    for a folder one process owns, such as a batch's output, which no other process is writing to."""
    left = [path for path in Path(folder).rglob(".*.tmp") if path.is_file() and is_interrupted_write(path)]
    for path in left:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return left


def _name_the_file(exc: OSError, path: Path) -> None:
    """A failed write names no file ("No space left on device", where?): name the one being written."""
    if exc.filename is None:
        exc.filename = str(path)


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a JSON-lines log whole or not at all: a write cut by a full disk is taken back,
    as a torn half line would make the whole log unreadable to the next line-by-line reader."""
    path = Path(path)
    data = line.rstrip("\n").encode() + b"\n"
    with open(path, "ab", buffering=0) as handle:  # unbuffered: a part written is known, and taken back
        start = handle.seek(0, os.SEEK_END)
        try:
            done = 0
            while done < len(data):
                done += handle.write(data[done:])  # a short write, then ENOSPC on the next
        except OSError as exc:
            handle.truncate(start)
            _name_the_file(exc, path)
            raise


def write_refused(folder: str | Path) -> str | None:
    """Why files cannot be made in ``folder`` (the system's words), or None when they can. Tried, not
    asked: ``os.access`` says yes to root on a read-only file system's folder. The probe is a nameless
    temporary file (O_TMPFILE where there is one), so even a kill leaves nothing behind."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def check_writable_file(path: str | Path, replace: bool = False, how_to_replace: str = "") -> Path:
    """An output file's name, checked before the work that fills it: not a folder, in a folder that
    exists (or is made) and is writable, and not an existing file unless ``replace`` (an earlier result is
    not lost to a name typed again); ``how_to_replace`` says how to ask for that, e.g. "pass --overwrite"."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder; give a file name, e.g. scores.csv")
    if path.exists() and not replace:
        raise InputError(path, "exists already, and is kept: give another name"
                               + (f", or {how_to_replace} to replace it" if how_to_replace else ""))
    if not os.access(make_folder(path.parent), os.W_OK):
        raise InputError(path, f"its folder {path.parent} is not writable for you")
    return path


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically (permissions as in ``atomic_open``)."""
    with atomic_open(path, mode) as handle:
        handle.write(data)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
