"""The safetensors file layout, read and written one tensor at a time.

One place for what checkpoints and uploads share: the header parser (which refuses truncated or
padded files), the dtype table, and a writer that streams tensors to a file instead of building
the whole file in memory (``safetensors.torch.save`` holds 2× the model while it does).
Layout: 8-byte little-endian header length, JSON header (``__metadata__`` plus one entry per
tensor with dtype, shape and data offsets), then the tensors' bytes back to back.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from fedmix_engine.errors import InputError

if TYPE_CHECKING:
    import torch

MAX_HEADER = 100_000_000


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """The header's dtype codes as torch dtypes. A function, so that reading a header needs no torch:
    ``site info`` and the model lines it prints took 2 s, 1.4 s of it importing torch."""
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}


@functools.cache
def _codes() -> dict[torch.dtype, str]:
    return {dtype: code for code, dtype in torch_dtypes().items()}


def _parse(length_bytes: bytes, header_bytes: bytes, size: int, where: str) -> tuple[dict[str, Any], dict[str, str]]:
    if len(length_bytes) < 8:
        raise InputError(where, "truncated: shorter than a safetensors header")
    length = int.from_bytes(length_bytes, "little")
    if length <= 1 or length > MAX_HEADER or 8 + length > size or len(header_bytes) != length:
        raise InputError(where, "truncated or not safetensors: header length exceeds the body")
    try:
        header = json.loads(header_bytes)
    except ValueError:
        raise InputError(where, "not safetensors: the header is not JSON") from None
    if not isinstance(header, dict):
        raise InputError(where, "not safetensors: the header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for key, entry in header.items():
        try:
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise InputError(f"tensor '{key}'", "malformed safetensors entry") from None
    if 8 + length + end != size:
        raise InputError(where, f"truncated: {size} bytes received, the header describes {8 + length + end}")
    return header, metadata


def read_header(path: Path, where: str = "body") -> tuple[dict[str, Any], dict[str, str]]:
    """(tensor entries, metadata) of a file; refuses truncated files and trailing bytes."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        return _parse(head, handle.read(min(length, MAX_HEADER)), size, where)


def header_from_bytes(data: bytes, where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The same for a whole file held in memory."""
    length = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    return _parse(data[:8], data[8:8 + min(length, MAX_HEADER)], len(data), where)


def write(handle: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write the layout tensor by tensor (header padded with spaces to 8-byte alignment)."""
    import torch

    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    order = sorted(tensors)
    for key in order:
        value = tensors[key]
        size = value.numel() * value.element_size()
        header[key] = {"dtype": _codes()[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    handle.write(len(encoded).to_bytes(8, "little"))
    handle.write(encoded)
    for key in order:
        value = tensors[key].detach().contiguous().cpu().reshape(-1)  # 1-D: a 0-dim tensor cannot be viewed as bytes
        if value.numel():
            handle.write(value.numpy().tobytes() if value.dtype == torch.bool
                         else memoryview(value.view(torch.uint8).numpy()))
