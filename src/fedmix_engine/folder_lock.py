"""One writer per folder: an OS lock a process holds while it writes a folder that only it may write.

A server's state directory and a simulation's output folder are each written by one process; a second
one (a forgotten terminal, napari beside a terminal) would take the first one's files for its own. The
lock is released however the process ends, ``kill -9`` included. On POSIX it is ``flock`` on the folder
itself, opened read-only: a lock file opened for writing pins the file system (a read-only remount for
maintenance fails with EBUSY). Windows has no ``flock``: filelock's ``lock_file`` in the folder there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from fedmix_engine.errors import InputError

log = logging.getLogger(__name__)


class HeldFolder:
    """A folder's lock, released by calling it. ``descriptor`` is the locked file descriptor (POSIX): a
    child process given it (``subprocess.Popen(pass_fds=...)``) holds the lock too, until all have ended."""

    def __init__(self, release: Callable[[], None], descriptor: int | None = None) -> None:
        self._release = release
        self.descriptor = descriptor

    def __call__(self) -> None:
        self._release()


def hold_folder(folder: Path, busy: str, lock_file: str) -> HeldFolder:
    """Lock ``folder`` (which exists) or raise ``InputError(folder, busy)`` if another process holds it;
    returns the hold. On a file system without locks (some network shares) it warns and goes on."""
    if os.name != "posix":
        from filelock import FileLock, Timeout

        lock = FileLock(folder / lock_file, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise InputError(folder, busy) from None
        return HeldFolder(lock.release)
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(folder, busy) from None
    except OSError as exc:  # a file system without locks: run, but say what is lost
        log.warning("%s: cannot be locked (%s): a second writer started on it would not be noticed",
                    folder, exc.strerror)
    return HeldFolder(lambda: os.close(fd), fd)
