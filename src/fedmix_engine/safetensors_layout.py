"""The safetensors file layout, read and written one tensor at a time.

One place for what checkpoints and uploads share: the header parser (which refuses truncated or
padded files), the dtype table, and a writer that streams tensors to a file instead of building
the whole file in memory (``safetensors.torch.save`` holds 2× the model while it does).
Layout: 8-byte little-endian header length, JSON header (``__metadata__`` plus one entry per
tensor with dtype, shape and data offsets), then the tensors' bytes back to back.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from fedmix_engine.errors import InputError
from fedmix_engine.json_values import is_count, parse_json

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
        header = parse_json(header_bytes)
    except ValueError:
        raise InputError(where, "not safetensors: the header is not JSON") from None
    if not isinstance(header, dict):
        raise InputError(where, "not safetensors: the header is not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(where, "not safetensors: its __metadata__ must map names to strings")
    end = _data_length(header, where)
    if 8 + length + end != size:
        raise InputError(where, f"truncated: {size} bytes received, the header describes {8 + length + end}")
    return header, metadata


# bytes per element of the dtypes the safetensors format names (its sub-byte F4/F6 packings are not checked)
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
              "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def _data_length(header: dict[str, Any], where: str) -> int:
    """The length of the data the tensor entries describe, checked by the rules the safetensors library
    applies when it loads a file: each entry a dtype name, a shape of sizes and [begin, end] offsets that
    hold exactly its elements, the tensors' data back to back without gaps or overlaps. Without them a
    site's malformed header reached the server's reading of the update as a TypeError (HTTP 500, retried
    by the site for an hour) and offsets pointing into the header were read as weights."""
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise InputError(where, f"tensor '{key}': not a tensor entry (an object with dtype, shape and "
                                    "data_offsets)")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise InputError(where, f"tensor '{key}': dtype {dtype!r} is not a dtype's name")
        if not isinstance(shape, list) or not all(is_count(n) for n in shape):
            raise InputError(where, f"tensor '{key}': shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(n) for n in offsets)
                and offsets[0] <= offsets[1]):
            raise InputError(where, f"tensor '{key}': data_offsets {offsets!r} are not [begin, end] with "
                                    "0 ≤ begin ≤ end")
        held, needed = offsets[1] - offsets[0], math.prod(shape) * ITEM_BYTES.get(dtype, 0)
        if dtype in ITEM_BYTES and held != needed:
            raise InputError(where, f"tensor '{key}': data_offsets {offsets} hold {held} bytes; its shape "
                                    f"{shape} of {dtype} needs {needed}")
        spans.append((offsets[0], offsets[1], key))
    end, before = 0, None
    for begin, stop, key in sorted(spans):
        if begin != end:
            after = f"where tensor '{before}' ends" if before is not None else "where the data begins"
            raise InputError(where, f"tensor '{key}': its data begins at byte {begin}, not at {end} {after} (the "
                                    "tensors' data must follow each other without gaps or overlaps)")
        end, before = stop, key
    return end


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
    for block in data_blocks(tensors):
        handle.write(block)


def data_blocks(tensors: dict[str, torch.Tensor]) -> Iterator[bytes | memoryview]:
    """The tensors' bytes in the order the layout stores them (by name): what ``write`` writes after the
    header, and what ``data_sha256`` digests before the header is written."""
    import torch

    for key in sorted(tensors):
        value = tensors[key].detach().contiguous().cpu().reshape(-1)  # 1-D: a 0-dim tensor cannot be viewed as bytes
        if value.numel():
            yield value.numpy().tobytes() if value.dtype == torch.bool else memoryview(value.view(torch.uint8).numpy())


def data_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the data section ``write`` will write for ``tensors``, without writing it."""
    digest = hashlib.sha256()
    for block in data_blocks(tensors):
        digest.update(block)
    return digest.hexdigest()


def data_section(data: bytes) -> memoryview:
    """The data section of a whole file held in memory (after the header), without a copy."""
    return memoryview(data)[8 + int.from_bytes(data[:8], "little"):]
