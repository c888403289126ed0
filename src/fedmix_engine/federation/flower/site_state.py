"""A Flower site's Adam moments advance only with an update the ServerApp aggregated, as a ``join``
site's do (both through ``federation.pending_state``).

A ClientApp replies and forgets: it cannot know whether its update counted. So the moments after
round r are kept as *pending* (``flower-run-<id>-state-pending-NNNN.pt``), and the next message from
the ServerApp (round r + 1's training, or the final model) names the nodes whose round-r updates it
aggregated. The site then commits them (they become ``flower-run-<id>-state.pt``) or drops them and
trains from the moments it had. A pending file from a round the message does not speak of (a node
not sampled in between) is dropped too: never counting a step is the safe side.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedmix_engine.errors import InputError
from fedmix_engine.federation import pending_state
from fedmix_engine.fedmix.local_update import SiteState
from fedmix_engine.json_values import parse_json

ACCEPTED_KEY = "fedmix-accepted"  # in the ServerApp's config: {"round": r, "nodes": [node ids aggregated in r]}


def accepted_config(round_index: int, nodes: Iterable[int]) -> dict[str, str]:
    """The config entry naming the nodes whose updates of ``round_index`` were aggregated."""
    return {ACCEPTED_KEY: json.dumps({"round": int(round_index), "nodes": sorted(int(n) for n in nodes)})}


def _prefix(run_id: int) -> str:
    return f"flower-run-{run_id}"  # flower-run-<id>-state.pt, flower-run-<id>-state-pending-NNNN.pt


def settle(models_dir: Path, run_id: int, node_id: int, config: Mapping[str, Any]) -> None:
    """Commit this node's pending moments if the config says its update was aggregated; drop any other."""
    raw = config.get(ACCEPTED_KEY)
    try:
        accepted = parse_json(str(raw)) if raw is not None else {"round": 0, "nodes": []}
        accepted_round, nodes = int(accepted["round"]), {int(n) for n in accepted["nodes"]}
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"config '{ACCEPTED_KEY}'", f"unreadable ({exc}): is the server running this "
                                                     "version of the FedMix app?") from None
    pending_state.settle(models_dir, _prefix(run_id), accepted_round if node_id in nodes else None)


def load(models_dir: Path, run_id: int) -> SiteState:
    """The committed moments (a fresh optimiser before any)."""
    return pending_state.load(models_dir, _prefix(run_id))


def save_pending(models_dir: Path, run_id: int, round_index: int, state: SiteState) -> None:
    pending_state.save_pending(models_dir, _prefix(run_id), round_index, state)
