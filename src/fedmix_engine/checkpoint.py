"""Checkpoints: the dual pair in one safetensors file with its model config in the header.

safetensors, never pickle: a checkpoint from another site or the server cannot execute code.
Written atomically, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO

import torch

from fedmix_engine.atomic import atomic_open
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


_DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def write_safetensors(handle: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write the safetensors format tensor by tensor, without building the file in memory.

    ``safetensors.torch.save`` copies every tensor to bytes and then assembles the whole file: 2×
    the model on top of the tensors, which is what a server committing a round cannot afford.
    The layout is the documented one: 8-byte little-endian header length, JSON header (padded with
    spaces to 8-byte alignment), then the tensors' bytes back to back; readers check coverage.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    order = sorted(tensors)
    for key in order:
        value = tensors[key]
        size = value.numel() * value.element_size()
        header[key] = {"dtype": _DTYPE_CODES[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    handle.write(len(encoded).to_bytes(8, "little"))
    handle.write(encoded)
    for key in order:
        value = tensors[key].detach().contiguous().cpu()
        if value.numel():
            handle.write(memoryview(value.view(torch.uint8).numpy()) if value.dtype != torch.bool
                         else value.numpy().tobytes())


def save_checkpoint(path: str | Path, pair: PairState, model_config: ModelConfig,
                    meta: dict[str, Any] | None = None) -> Path:
    """Save the pair atomically, streaming tensors to disk (no in-memory copy of the file)."""
    path = Path(path)
    header = {"format": FORMAT, "model": model_config.to_json(), "meta": json.dumps(meta or {}, sort_keys=True)}
    with atomic_open(path) as handle:
        write_safetensors(handle, dict(pair), header)
    return path


def load_checkpoint(path: str | Path) -> tuple[PairState, ModelConfig, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    return pair_from_bytes(path.read_bytes(), path)
