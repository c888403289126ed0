"""Model configuration: small, JSON-serialisable, stored with every checkpoint so weights are never
separated from the architecture that reads them."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from fedmix_engine.errors import InputError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """``base_width=64`` is the reference U-Net (17.3 M parameters); tests and CPU demos use 8–16."""

    name: str = "unet"
    in_channels: int = 1
    num_classes: int = 1
    base_width: int = 64
    bilinear: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise InputError("model config", f"unknown field(s) {sorted(unknown)}")
        config = cls(**raw)
        config.validate()
        return config

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            return cls.from_dict(json.loads(text))
        except (ValueError, TypeError) as exc:
            raise InputError("model config", f"not a valid model configuration ({exc})") from exc

    def validate(self) -> None:
        if self.name not in _REGISTRY:
            raise InputError("model.name", f"unknown model '{self.name}'; known: {', '.join(_REGISTRY)}")
        if self.in_channels not in (1, 3):
            raise InputError("model.in_channels", f"must be 1 or 3, not {self.in_channels}")
        if not 1 <= self.num_classes <= 255:
            raise InputError("model.num_classes", f"must be 1..255, not {self.num_classes}")
        if self.base_width < 2 or self.base_width % 2:
            raise InputError("model.base_width", f"must be an even number ≥ 2, not {self.base_width}")


def _unet(config: ModelConfig) -> nn.Module:
    from fedmix_engine.model.unet import UNet

    return UNet(config.in_channels, config.num_classes, config.base_width, config.bilinear)


_REGISTRY: dict[str, Callable[[ModelConfig], nn.Module]] = {"unet": _unet}


def register_model(name: str, builder: Callable[[ModelConfig], nn.Module]) -> None:
    """Make another network available as ``ModelConfig(name=...)``.

    ``builder(config)`` returns a module mapping ``B×in_channels×H×W`` images (H, W multiples of 16)
    to ``B×num_classes×H×W`` logits; it may ignore ``base_width`` and ``bilinear``. Training,
    aggregation, the wire and checkpoints work on its state dict unchanged. Every process that builds
    or reads such a model (each site, the server, a predictor) must register it first; a checkpoint
    naming an unregistered network is refused with the names that are known.
    """
    if not name or name in _REGISTRY:
        raise InputError("model.name", f"'{name}' is empty or already registered")
    _REGISTRY[name] = builder


def build_model(config: ModelConfig) -> nn.Module:
    """Instantiate the network a config describes (weights randomly initialised by torch's RNG)."""
    config.validate()
    return _REGISTRY[config.name](config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
