"""Checkpoints: the dual pair in one safetensors file with its model config in the header.

safetensors, never pickle: a checkpoint from another site or the server cannot execute code.
Written atomically, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from fedmix_engine import safetensors_layout
from fedmix_engine.atomic import atomic_open, atomic_write_bytes
from fedmix_engine.errors import InputError
from fedmix_engine.federation.wire import check_specs, tensor_template
from fedmix_engine.fedmix.local_update import SiteState
from fedmix_engine.fedmix.pair import PairState, pair_layout
from fedmix_engine.json_values import parse_json
from fedmix_engine.model import ModelConfig
from fedmix_engine.safetensors_layout import header_from_bytes, read_header

FORMAT = "fedmix-pair/1"
# The header's SHA-256 of the weights as saved. safetensors checks a file's header, not its numbers: a byte
# changed among the weights (a failing disk, a copy gone wrong) loaded as other weights, to predict and train
# with. Checkpoints saved before it was written load unchecked.
DATA_DIGEST = "data_sha256"
STATE_FILE = "client-state.pt"


def pair_from_bytes(data: bytes, where: str | Path) -> tuple[PairState, ModelConfig, dict[str, Any]]:
    from safetensors.torch import load

    try:
        _, header = header_from_bytes(data, str(where))
        tensors = load(data)
    except Exception as exc:
        raise InputError(where, f"not a readable safetensors checkpoint ({exc})") from exc
    recorded = header.get(DATA_DIGEST)
    if recorded is not None and hashlib.sha256(safetensors_layout.data_section(data)).hexdigest() != recorded:
        raise InputError(where, "its weights are not the ones it was saved with (their SHA-256 differs from the "
                                f"one in its header, {DATA_DIGEST}): the file was damaged after it was saved (a "
                                "failing disk, a copy cut or changed)")
    model_config = _model_of(header, where)
    try:
        check_specs(tensor_template(tensors), pair_layout(model_config), "the model configuration it names")
    except InputError as exc:  # said of the file: which checkpoint is damaged or was written otherwise
        raise InputError(where, str(exc)) from exc
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InputError(where, f"tensor '{key}' contains NaN or infinite values")
    return tensors, model_config, _checked_meta(header.get("meta", "{}"), model_config, where)


def _model_of(header: dict[str, str], where: str | Path) -> ModelConfig:
    """The model a FedMix checkpoint's header names (validated), or an error naming the file."""
    if header.get("format") != FORMAT:
        raise InputError(where, f"not a FedMix checkpoint (format {header.get('format')!r}, expected {FORMAT!r})")
    try:
        return ModelConfig.from_json(header.get("model", "{}"))
    except InputError as exc:  # said of the file: which checkpoint is damaged or was written otherwise
        raise InputError(where, str(exc)) from exc


def checkpoint_model(path: str | Path) -> ModelConfig:
    """The model a checkpoint file holds, from its header alone (a few kB, no weights read): what a GUI
    checks before the worker that loads the weights starts (the overlays a stack's classes need)."""
    path = _checkpoint_file(path)
    return _model_of(read_header(path, str(path))[1], path)


def _checked_meta(text: str, model_config: ModelConfig, where: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata, its fields checked as far as prediction relies on them: a training size
    in pixels, and one name per output class."""
    try:
        meta = parse_json(text)
    except ValueError as exc:
        raise InputError(where, f"its metadata is not JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise InputError(where, "its metadata is not a JSON object")
    size = meta.get("image_size", 128)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(where, f"metadata image_size: {size!r} is not a size in pixels")
    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) != model_config.num_classes
                                or not all(isinstance(name, str) and name for name in classes)):
        raise InputError(where, f"metadata classes: {classes!r} does not name the model's "
                                f"{model_config.num_classes} output class(es)")
    return meta


def save_checkpoint(path: str | Path, pair: PairState, model_config: ModelConfig,
                    meta: dict[str, Any] | None = None) -> Path:
    """Save the pair atomically, streaming tensors to disk (no in-memory copy of the file)."""
    path = Path(path)
    header = {"format": FORMAT, "model": model_config.to_json(), "meta": json.dumps(meta or {}, sort_keys=True),
              DATA_DIGEST: safetensors_layout.data_sha256(pair)}
    with atomic_open(path) as handle:
        safetensors_layout.write(handle, dict(pair), header)
    return path


def _checkpoint_file(path: str | Path) -> Path:
    """``path``, or an error naming the checkpoint file that is not there."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    return path


def checkpoint_bytes(path: str | Path) -> bytes:
    """A checkpoint file's bytes, or an error naming the file that is not there."""
    return _checkpoint_file(path).read_bytes()


def load_checkpoint(path: str | Path) -> tuple[PairState, ModelConfig, dict[str, Any]]:
    return pair_from_bytes(checkpoint_bytes(path), path)


def save_site_state(models_dir: Path, state: SiteState, name: str = STATE_FILE) -> None:
    """Keep the site's Adam moments between rounds (local only; never sent)."""
    if state.optimizers is None:
        return
    buffer = io.BytesIO()
    torch.save({"optimizers": state.optimizers, "rounds_done": state.rounds_done}, buffer)
    atomic_write_bytes(models_dir / name, buffer.getvalue())


def _check_moments(optimizer: dict) -> None:
    """ValueError unless an Adam state's numbers can be trained on: damage that unpickles still gave NaN
    moments (every weight NaN after the round), or a negative step (``beta ** step`` overflowing in torch)."""
    for entry in optimizer["state"].values():
        for name, value in entry.items():
            if not (torch.is_tensor(value) and bool(torch.isfinite(value).all())):
                raise ValueError(f"its {name} is not finite")
            if name in ("step", "exp_avg_sq") and bool((value < 0).any()):
                raise ValueError(f"its {name} is negative")
    for group in optimizer["param_groups"]:
        betas = group.get("betas", (0.9, 0.999))
        numbers = [group.get(key, 0.0) for key in ("lr", "eps", "weight_decay")]
        if not (all(isinstance(v, int | float) and 0 <= v < math.inf for v in numbers)
                and len(betas) == 2 and all(isinstance(b, int | float) and 0 <= b < 1 for b in betas)):
            raise ValueError("its settings (lr, betas, eps, weight decay) are out of range")


def _check_archive(path: Path) -> None:
    """ValueError unless each part of the state's zip archive matches the CRC-32 that torch.save wrote for
    it: torch.load does not check them, and a byte changed among the moments (a failing disk) loaded as
    other, finite moments to train with."""
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except OSError as exc:
        if exc.errno is not None:  # the disk's (EIO), or a seek outside the file (EINVAL: said by the caller)
            raise
        raise ValueError(f"not a whole zip archive ({exc})") from None  # bz2's "Invalid data stream"
    except Exception as exc:  # zipfile's and its decompressors' errors (a part's method byte changed to
        # deflate: zlib.error): torch.save stores its parts uncompressed, so every one is damage
        raise ValueError(f"not a whole zip archive ({exc})") from None
    if broken is not None:
        raise ValueError(f"its part {broken} does not match the CRC-32 it was saved with")


def load_site_state(models_dir: Path, name: str = STATE_FILE) -> SiteState:
    path = models_dir / name
    if not path.exists():
        return SiteState()
    try:
        # local file, still no arbitrary code; on the CPU: a state an earlier version saved on a GPU kept the
        # GPU's tensors, unreadable once that GPU is gone (a driver update) and taken for a damaged file
        try:
            _check_archive(path)
            saved = torch.load(path, weights_only=True, map_location="cpu")
        except OSError as exc:  # a zip reader seeking where a damaged directory points: not the disk's
            if exc.errno != errno.EINVAL:
                raise
            raise ValueError(f"its archive points outside the file ({exc.strerror})") from None
        optimizers = tuple(saved["optimizers"])
        for optimizer in optimizers:
            _check_moments(optimizer)
        return SiteState(optimizers, int(saved["rounds_done"]))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # a torn or overwritten file (a failing disk): torch's message alone named neither file nor remedy
        raise InputError(path, f"damaged optimiser state, cannot be read ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0].split('. ')[0][:200]})") from None
