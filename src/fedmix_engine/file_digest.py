"""SHA-256 of a file read a block at a time, without torch: what recognises a weights file as the one
written (a resumed round, a re-sent upload, a site's copy of the final model) and what ``status --verify``
checks a state directory's models by."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """A file's SHA-256, read 1 MiB at a time (a reference-width pair is 140 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
