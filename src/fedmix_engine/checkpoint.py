"""Checkpoints: the dual pair in one safetensors file with its model config in the header.

safetensors, never pickle: a checkpoint from another site or the server cannot execute code.
Written atomically, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedmix_engine.atomic import atomic_write_bytes
from fedmix_engine.errors import InputError
from fedmix_engine.fedmix.pair import PairState
from fedmix_engine.model import ModelConfig

FORMAT = "fedmix-pair/1"


def pair_to_bytes(pair: PairState, model_config: ModelConfig, meta: dict[str, Any] | None = None) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in pair.items()}
    header = {"format": FORMAT, "model": model_config.to_json(), "meta": json.dumps(meta or {}, sort_keys=True)}
    return save(tensors, metadata=header)


def pair_from_bytes(data: bytes, where: str | Path) -> tuple[PairState, ModelConfig, dict[str, Any]]:
    from safetensors.torch import load

    try:
        tensors = load(data)
        header = _read_header(data)
    except Exception as exc:
        raise InputError(where, f"not a readable safetensors checkpoint ({type(exc).__name__}: {exc})") from exc
    if header.get("format") != FORMAT:
        raise InputError(where, f"not a FedMix checkpoint (format {header.get('format')!r}, expected {FORMAT!r})")
    model_config = ModelConfig.from_json(header.get("model", "{}"))
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InputError(where, f"tensor '{key}' contains NaN or infinite values")
    return tensors, model_config, json.loads(header.get("meta", "{}"))


def _read_header(data: bytes) -> dict[str, str]:
    """The safetensors ``__metadata__`` block (an 8-byte length, then JSON)."""
    if len(data) < 8:
        raise ValueError("file too short")
    length = int.from_bytes(data[:8], "little")
    if length <= 0 or 8 + length > len(data):
        raise ValueError("truncated header")
    return json.loads(data[8:8 + length]).get("__metadata__", {}) or {}


def save_checkpoint(path: str | Path, pair: PairState, model_config: ModelConfig,
                    meta: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    atomic_write_bytes(path, pair_to_bytes(pair, model_config, meta))
    return path


def load_checkpoint(path: str | Path) -> tuple[PairState, ModelConfig, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    return pair_from_bytes(path.read_bytes(), path)
