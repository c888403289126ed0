"""A real, small file system for tests that fill a disk and free it again (no mocked OSError)."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def small_disk(path: Path, size_bytes: int):
    """A real file system of ``size_bytes`` at ``path`` (a tmpfs), so a test can fill it and free it again.
    Mounting needs root, as CI's machine runs; elsewhere the test says so and is skipped (not passed)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024}k", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small disk needs mount (root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill_disk_leaving(filler: Path, free_bytes: int) -> None:
    """Grow or shrink ``filler`` so that its file system has about ``free_bytes`` left."""
    have = filler.stat().st_size if filler.exists() else 0
    vfs = os.statvfs(filler.parent)
    size = max(0, have + vfs.f_bavail * vfs.f_frsize - free_bytes)
    with open(filler, "ab") as handle:
        handle.truncate(size)
        if size > have:
            os.posix_fallocate(handle.fileno(), have, size - have)


@contextmanager
def remounted_read_only(mount: Path):
    """``mount`` (a ``small_disk``) read-only for the block, as the kernel remounts a disk with errors or as
    a share is exported read-only; read-write again after."""
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
