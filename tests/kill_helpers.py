"""A `site remove` killed with SIGKILL part-way: after its database commit, while it deletes the files."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

# The child removes images with the CLI and SIGKILLs itself when it is about to delete its n-th image file.
REMOVER = textwrap.dedent("""
    import os, pathlib, signal, sys
    from fedmix_engine.cli import main
    real_unlink, seen = pathlib.Path.unlink, []
    def unlink(self, missing_ok=False):
        if self.parent.name == "images":
            seen.append(self)
            if len(seen) == int(sys.argv[1]):
                os.kill(os.getpid(), signal.SIGKILL)
        return real_unlink(self, missing_ok=missing_ok)
    pathlib.Path.unlink = unlink
    sys.exit(main(sys.argv[2:]))
""")


def remove_killed(site: Path, names: list[str], killed_at: int) -> None:
    """Run `fedmix-engine site remove SITE NAMES` in a child that is killed at its ``killed_at``-th image
    file deletion."""
    proc = subprocess.run([sys.executable, "-c", REMOVER, str(killed_at), "site", "remove", str(site), *names],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
