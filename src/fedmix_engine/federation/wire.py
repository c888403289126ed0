"""What crosses the wire: safetensors bodies (weights) with the site's report in the header.

An update is one safetensors file: the pair's tensors (``net1.*``, ``net2.*``) and, in the header
metadata, ``fedmix-report`` = JSON ``{"n": int, "loss": float, "loss2": float, "counts": {...}}``.
No pickle anywhere. Every update is validated against the global model before it counts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedmix_engine.errors import InputError
from fedmix_engine.fedmix.losses import LOSS_CEILINGS
from fedmix_engine.json_values import is_count, is_int, is_number, parse_json
from fedmix_engine.safetensors_layout import read_header, torch_dtypes

if TYPE_CHECKING:
    from fedmix_engine.fedmix.local_update import LocalReport

API_VERSION = "v1"
MODEL_DIGEST_HEADER = "X-FedMix-Sha256"  # on a global model: its SHA-256 as the server wrote it
REPORT_KEY = "fedmix-report"
MAX_COUNT_KEYS = 64


@dataclass(frozen=True)
class UpdateReport:
    """The scalars a site sends with its weights (nothing about any image)."""

    n: int
    loss: float
    loss2: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"n": self.n, "loss": self.loss, "loss2": self.loss2, "counts": self.counts},
                          sort_keys=True)

    @classmethod
    def parse(cls, text: str | None) -> UpdateReport:
        if not text:
            raise InputError(REPORT_KEY, "missing: the update carries no report (n, loss)")
        try:
            raw = parse_json(text)
        except ValueError:
            raise InputError(REPORT_KEY, "not valid JSON") from None
        return cls.from_dict(raw)

    @classmethod
    def from_local(cls, report: LocalReport) -> UpdateReport:
        """What of a local update's report is sent (its timings stay at the site)."""
        return cls(report.n, report.loss, report.loss2, dict(report.counts))

    @classmethod
    def from_dict(cls, raw: Any) -> UpdateReport:
        """Validate a decoded report (from the safetensors metadata, or a Flower reply's records)."""
        if not isinstance(raw, dict):
            raise InputError(REPORT_KEY, "must be a JSON object")
        n, loss, loss2 = raw.get("n"), raw.get("loss"), raw.get("loss2", 0.0)
        if not is_count(n):
            raise InputError(f"{REPORT_KEY}.n", f"sample count must be an integer ≥ 0, not {n!r}")
        for name, value in (("loss", loss), ("loss2", loss2)):
            if not is_number(value) or value < 0:
                raise InputError(f"{REPORT_KEY}.{name}", f"must be a finite number ≥ 0, not {value!r}")
        counts = raw.get("counts", {})
        if not isinstance(counts, dict) or len(counts) > MAX_COUNT_KEYS or not all(
                isinstance(k, str) and is_int(v) for k, v in counts.items()):
            raise InputError(f"{REPORT_KEY}.counts", "must be an object of at most 64 integer counts")
        return cls(n, float(loss), float(loss2), counts)

    def check_loss(self, loss: str) -> None:
        """Refuse losses the federation's training loss (``TrainConfig.loss``) cannot give. FedMix weighs a
        site by its reported loss (10/11 of every weight at λ = 10), so a loss above the soft Dice's 1 would
        buy a site the round: it comes from a changed or faulty site program, not from training."""
        ceiling = LOSS_CEILINGS[loss]
        for name, value in (("loss", self.loss), ("loss2", self.loss2)):
            if value > ceiling:
                raise InputError(f"{REPORT_KEY}.{name}", f"{value:g} is above {ceiling:g}, the most the federation's "
                                 f"'{loss}' training loss can be: not from its training (a changed or faulty site "
                                 "program)")


def encode_update(pair: Mapping[str, torch.Tensor], report: UpdateReport) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in pair.items()}, metadata={REPORT_KEY: report.to_json()})


def tensor_template(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Keys, shapes and dtypes every update must match."""
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}


class LazyUpdate(Mapping[str, torch.Tensor]):
    """A safetensors file as a read-only mapping that reads one tensor at a time.

    Plain ``seek``/``read``, not a memory map: mapped pages of a whole upload would count in the
    server's RSS. Feeding it to ``StreamingAggregate.add`` keeps aggregation at two model-sized
    accumulators plus one tensor, however large the model and however many sites.
    """

    def __init__(self, path: Path):
        self.path = path
        self._entries, _ = read_header(path)
        with open(path, "rb") as handle:
            self._data_start = 8 + int.from_bytes(handle.read(8), "little")

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        begin, end = (int(v) for v in entry["data_offsets"])
        dtype = torch_dtypes().get(entry["dtype"])
        if dtype is None:
            raise InputError(f"tensor '{key}'", f"unsupported dtype {entry['dtype']}")
        with open(self.path, "rb") as handle:
            handle.seek(self._data_start + begin)
            raw = bytearray(handle.read(end - begin))
        if len(raw) != end - begin:
            raise InputError(f"tensor '{key}'", "truncated data")
        if not raw:
            return torch.empty(tuple(entry["shape"]), dtype=dtype)
        return torch.frombuffer(raw, dtype=dtype).reshape(tuple(entry["shape"]))

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every tensor, from the header (nothing read)."""
        return {k: (tuple(e["shape"]), torch_dtypes().get(e["dtype"])) for k, e in self._entries.items()}

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


MAX_RELATIVE_CHANGE = 10.0  # how far, in sizes of the model, an update may move it (a local round: ≈ 0.1)


class ChangeSize:
    """How far an update moves the global model, relative to the model's own size (L2 over its float
    tensors), summed a tensor at a time. Finite but enormous weights (an fp16 overflow clamped to 65504, a
    site whose training diverged, weights not trained from this round's model) pass the NaN check, yet
    one of them outweighs every other site in the average and may overflow it."""

    def __init__(self, reference: Mapping[str, torch.Tensor]):
        self.reference, self.moved, self.size = reference, 0.0, 0.0

    def add(self, key: str, value: torch.Tensor) -> None:
        if value.is_floating_point():
            base = self.reference[key].double()
            self.moved += float(((value.double() - base) ** 2).sum())
            self.size += float((base ** 2).sum())

    def check(self) -> None:
        ratio = math.sqrt(self.moved / self.size) if self.size else 0.0
        if not ratio <= MAX_RELATIVE_CHANGE:
            raise InputError("update", f"moves the model by {ratio:.3g}× its own size (L2), where a round of local "
                                       f"training moves it by well under 1× and at most {MAX_RELATIVE_CHANGE:g}× is "
                                       "accepted: the site's training diverged (too high a learning rate?) or "
                                       "these weights were not trained from this round's global model")


def validate_update_file(path: Path, template: Mapping[str, tuple[tuple[int, ...], str]],
                         reference: Mapping[str, torch.Tensor] | None = None, loss: str | None = None
                         ) -> UpdateReport:
    """Check an uploaded file against the global model: same keys, shapes, dtypes; all finite; a sane report;
    with ``reference`` (the global pair it was trained from), a sane distance from it (``ChangeSize``); with
    ``loss`` (the federation's training loss), losses it can give (``UpdateReport.check_loss``).

    Reads one tensor at a time, so validating costs O(largest tensor), not O(model).
    """
    header, metadata = read_header(path)
    specs = {}
    for key, entry in header.items():
        known = torch_dtypes().get(entry.get("dtype"))
        specs[key] = (tuple(entry.get("shape", ())),
                      str(known).removeprefix("torch.") if known is not None else str(entry.get("dtype")))
    check_specs(specs, template)
    report = UpdateReport.parse(metadata.get(REPORT_KEY))
    if loss is not None:
        report.check_loss(loss)
    change = ChangeSize(reference) if reference is not None else None
    for key, value in LazyUpdate(path).items():
        check_finite(key, value)
        if change is not None:
            change.add(key, value)
    if change is not None:
        change.check()
    return report


def check_specs(specs: Mapping[str, tuple[tuple[int, ...], str]],
                template: Mapping[str, tuple[tuple[int, ...], str]], reference: str = "the global model") -> None:
    """Same keys, shapes and dtypes as ``template`` (``tensor_template``: the global model's, or
    ``pair.pair_layout`` of a checkpoint's config, then ``reference`` names it), or an error naming the tensor."""
    missing, extra = set(template) - set(specs), set(specs) - set(template)
    if missing or extra:
        raise InputError("tensors", f"keys differ from {reference}: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(extra)[:3]}")
    for key, (shape, dtype) in sorted(specs.items()):  # the same tensor named each time
        if (tuple(shape), dtype) != template[key]:
            want_shape, want_dtype = template[key]
            raise InputError(f"tensor '{key}'", f"shape {tuple(shape)} {dtype} differs from {reference} "
                             f"({want_shape} {want_dtype})")


def check_finite(key: str, value: torch.Tensor) -> None:
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise InputError(f"tensor '{key}'", "contains NaN or infinite values")
