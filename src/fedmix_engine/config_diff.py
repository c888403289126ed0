"""Which settings differ between a stored configuration and a new one, named as a user types them.

A resumed simulation and a restarted server both compare what was stored with what was asked for
now, and must name every differing field (``train.lr``), not just say "other settings".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(config: Mapping[str, Any]) -> dict[str, Any]:
    """One level of nesting as dotted names: ``{"train": {"lr": 1e-3}}`` → ``{"train.lr": 1e-3}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


def changed_fields(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(name, stored value, value now)`` for every field of ``now`` whose stored value differs."""
    before, after = flatten(stored), flatten(now)
    return [(key, before.get(key), value) for key, value in after.items() if before.get(key) != value]
