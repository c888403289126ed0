"""A simulation's state after its last completed round, so a killed run resumes where it stopped.

Everything the next round depends on is here: the global pair (or, for ``local``, each site's
pair), the best pair found so far, every site's Adam moments and the round records. The random
streams need no saving: a round's augmentation and selection are seeded from (seed, site, round).
So a resumed run computes exactly what the uninterrupted run would have (tested on CPU).

Each round is written to a fresh ``snapshot-NNNN/`` folder whose ``progress.json`` is written
last and atomically: a folder without it is a snapshot cut short by the crash and is ignored.
Older snapshots are deleted only after the new one is complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmix_engine.atomic import atomic_write_bytes, make_folder
from fedmix_engine.checkpoint import load_checkpoint, load_site_state, save_checkpoint, save_site_state
from fedmix_engine.errors import InputError
from fedmix_engine.fedmix.local_update import SiteState
from fedmix_engine.fedmix.pair import PairState
from fedmix_engine.json_values import parse_json
from fedmix_engine.model import ModelConfig

PROGRESS = "progress.json"
PREFIX = "snapshot-"


@dataclass
class Snapshot:
    """The run after ``round``; files in the folder are named by site index (site names are free text)."""

    round: int
    sites: list[str]  # names, in the simulator's (sorted) order
    best_round: int
    best_val: float
    history: list[dict[str, Any]]  # RoundDone records of rounds 1..round
    global_pair: PairState | None = None  # federated methods
    best_pair: PairState | None = None
    states: dict[str, SiteState] = field(default_factory=dict)
    site_pairs: dict[str, PairState] = field(default_factory=dict)  # "local": each site's own pair
    site_best: dict[str, tuple[float, int, PairState]] = field(default_factory=dict)  # "local": score, round, pair


def save_snapshot(out: Path, snap: Snapshot, model_config: ModelConfig) -> Path:
    """Write ``snap`` as ``out/snapshot-NNNN`` and then drop the older snapshots."""
    folder = make_folder(out / f"{PREFIX}{snap.round:04d}")
    if snap.global_pair is not None:
        save_checkpoint(folder / "global.safetensors", snap.global_pair, model_config)
    if snap.best_pair is not None:
        save_checkpoint(folder / "best.safetensors", snap.best_pair, model_config)
    site_best = {}
    for i, name in enumerate(snap.sites):
        if name in snap.states:
            save_site_state(folder, snap.states[name], f"state-{i}.pt")
        if name in snap.site_pairs:
            save_checkpoint(folder / f"pair-{i}.safetensors", snap.site_pairs[name], model_config)
        if name in snap.site_best:
            score, rnd, pair = snap.site_best[name]
            save_checkpoint(folder / f"best-{i}.safetensors", pair, model_config)
            site_best[name] = [score, rnd]
    progress = {"round": snap.round, "sites": snap.sites, "best_round": snap.best_round, "best_val": snap.best_val,
                "site_best": site_best, "history": snap.history}
    atomic_write_bytes(folder / PROGRESS, (json.dumps(progress, indent=1) + "\n").encode())  # the commit
    for _, older in _snapshots(out):
        if older != folder:
            shutil.rmtree(older, ignore_errors=True)
    return folder


def _snapshots(out: Path) -> list[tuple[int, Path]]:
    found = []
    for path in out.glob(f"{PREFIX}*"):
        number = path.name[len(PREFIX):]
        if path.is_dir() and number.isdigit():
            found.append((int(number), path))
    return sorted(found)


def latest_snapshot(out: Path) -> Path | None:
    """The newest complete snapshot folder in ``out``, or None."""
    done = [path for _, path in _snapshots(out) if (path / PROGRESS).is_file()]
    return done[-1] if done else None


def snapshot_round(out: Path) -> int | None:
    """The round of the newest complete snapshot in ``out`` (what a resume continues after), or None."""
    folder = latest_snapshot(out)
    return int(folder.name[len(PREFIX):]) if folder is not None else None


def clear_snapshots(out: Path) -> None:
    """Remove every snapshot folder (a new run starts in ``out``)."""
    for _, path in _snapshots(out):
        shutil.rmtree(path)


def load_snapshot(out: Path) -> Snapshot:
    """Read the newest complete snapshot; an error names the folder when there is none or it is damaged."""
    folder = latest_snapshot(out)
    if folder is None:
        raise InputError(out, "no completed round to resume from (the run stopped before its first round ended, "
                              "or this folder is not a simulate --out folder)")
    try:
        progress = parse_json((folder / PROGRESS).read_text())
        snap = Snapshot(int(progress["round"]), list(progress["sites"]), int(progress["best_round"]),
                        float(progress["best_val"]), list(progress["history"]))
        if (folder / "global.safetensors").is_file():
            snap.global_pair = load_checkpoint(folder / "global.safetensors")[0]
            snap.best_pair = load_checkpoint(folder / "best.safetensors")[0]
        for i, name in enumerate(snap.sites):
            if (folder / f"state-{i}.pt").is_file():
                snap.states[name] = load_site_state(folder, f"state-{i}.pt")
            if (folder / f"pair-{i}.safetensors").is_file():
                snap.site_pairs[name] = load_checkpoint(folder / f"pair-{i}.safetensors")[0]
            if name in progress["site_best"]:
                score, rnd = progress["site_best"][name]
                snap.site_best[name] = (float(score), int(rnd), load_checkpoint(folder / f"best-{i}.safetensors")[0])
    except InputError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise InputError(folder, f"damaged snapshot, cannot resume from it ({type(exc).__name__}: {exc})") from exc
    return snap
