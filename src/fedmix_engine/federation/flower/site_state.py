"""A Flower site's Adam moments advance only with an update the ServerApp aggregated, as a ``join``
site's do (``federation.client``: an upload refused or too late leaves the moments as they were).

A ClientApp replies and forgets: it cannot know whether its update counted. So the moments after
round r are kept as *pending* (``flower-run-<id>-state-pending-NNNN.pt``), and the next message from
the ServerApp (round r + 1's training, or the final model) names the nodes whose round-r updates it
aggregated. The site then commits them (they become ``flower-run-<id>-state.pt``) or drops them and
trains from the moments it had. A pending file from a round the message does not speak of (a node
not sampled in between) is dropped too: never counting a step is the safe side.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedmix_engine.checkpoint import load_site_state, save_site_state
from fedmix_engine.errors import InputError
from fedmix_engine.fedmix.local_update import SiteState

ACCEPTED_KEY = "fedmix-accepted"  # in the ServerApp's config: {"round": r, "nodes": [node ids aggregated in r]}
log = logging.getLogger(__name__)


def accepted_config(round_index: int, nodes: Iterable[int]) -> dict[str, str]:
    """The config entry naming the nodes whose updates of ``round_index`` were aggregated."""
    return {ACCEPTED_KEY: json.dumps({"round": int(round_index), "nodes": sorted(int(n) for n in nodes)})}


def _committed(run_id: int) -> str:
    return f"flower-run-{run_id}-state.pt"


def _pending(run_id: int, round_index: int) -> str:
    return f"flower-run-{run_id}-state-pending-{round_index:04d}.pt"


def settle(models_dir: Path, run_id: int, node_id: int, config: Mapping[str, Any]) -> None:
    """Commit this node's pending moments if the config says its update was aggregated; drop any other."""
    raw = config.get(ACCEPTED_KEY)
    try:
        accepted = json.loads(str(raw)) if raw is not None else {"round": 0, "nodes": []}
        accepted_round, nodes = int(accepted["round"]), {int(n) for n in accepted["nodes"]}
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"config '{ACCEPTED_KEY}'", f"unreadable ({exc}): is the server running this "
                                                     "version of the FedMix app?") from None
    pattern = re.compile(rf"flower-run-{run_id}-state-pending-(\d+)\.pt")
    for path in sorted(models_dir.glob(f"flower-run-{run_id}-state-pending-*.pt")):
        match = pattern.fullmatch(path.name)
        if match is None:
            continue
        round_index = int(match.group(1))
        if round_index == accepted_round and node_id in nodes:
            os.replace(path, models_dir / _committed(run_id))
        else:
            log.info("round %d's update was not aggregated: its optimiser step is dropped", round_index)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def load(models_dir: Path, run_id: int) -> SiteState:
    """The committed moments (a fresh optimiser before any)."""
    return load_site_state(models_dir, _committed(run_id))


def save_pending(models_dir: Path, run_id: int, round_index: int, state: SiteState) -> None:
    save_site_state(models_dir, state, _pending(run_id, round_index))
