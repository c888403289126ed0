"""A site's Adam moments advance only with an update the server took (built-in server and Flower alike).

The moments after training round r are saved as *pending* (``<prefix>-state-pending-NNNN.pt``) before
the update leaves the site. They become the site's moments (``<prefix>-state.pt``) once the site learns
that the server took that update, and are dropped when it learns the update did not count. A site
killed at any moment (before its upload, or after the server took it but before the site heard so)
therefore resumes with the moments of exactly the updates that counted, and trains on as if never
interrupted. Never counting a step is the safe side: a pending file nobody speaks for is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

from fedmix_engine.checkpoint import load_site_state, save_site_state
from fedmix_engine.errors import InputError
from fedmix_engine.fedmix.local_update import SiteState

log = logging.getLogger(__name__)


def committed_name(prefix: str) -> str:
    return f"{prefix}-state.pt"


def pending_name(prefix: str, round_index: int) -> str:
    return f"{prefix}-state-pending-{round_index:04d}.pt"


def load(models_dir: Path, prefix: str) -> SiteState:
    """The committed moments (a fresh optimiser before any)."""
    try:
        return load_site_state(models_dir, committed_name(prefix))
    except InputError as exc:
        raise InputError(exc.where, f"{exc.reason}: delete it, and this site's optimiser starts afresh at its next "
                                    "round (only Adam's moments are lost, not the model)") from None


def save_pending(models_dir: Path, prefix: str, round_index: int, state: SiteState) -> None:
    """Keep the moments after training ``round_index``, before its update leaves the site."""
    save_site_state(models_dir, state, pending_name(prefix, round_index))


def settle(models_dir: Path, prefix: str, accepted_round: int | None) -> bool:
    """Commit the pending moments of ``accepted_round`` (the round whose update the server took; None: no
    pending update was taken) and drop every other pending file; True when moments were committed."""
    pattern = re.compile(rf"{re.escape(prefix)}-state-pending-(\d+)\.pt")
    committed = False
    for path in sorted(models_dir.glob(f"{prefix}-state-pending-*.pt")):
        match = pattern.fullmatch(path.name)
        if match is None:
            continue
        round_index = int(match.group(1))
        if round_index == accepted_round:
            os.replace(path, models_dir / committed_name(prefix))
            committed = True
        else:
            log.info("round %d's update did not count: its optimiser step is dropped", round_index)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return committed
