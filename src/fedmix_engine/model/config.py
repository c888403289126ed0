"""Model configuration: small, JSON-serialisable, stored with every checkpoint so weights are never
separated from the architecture that reads them."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from fedmix_engine.errors import InputError
from fedmix_engine.json_values import is_int, parse_json

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from torch import nn

MAX_WIDTH = 256  # 16× the reference U-Net's parameters (277 M a network); wider does not fit a GPU to train


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
        if not isinstance(raw, dict):
            raise InputError("model config", f"must be an object of network settings, not {type(raw).__name__}")
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
            return cls.from_dict(parse_json(text))
        except (ValueError, TypeError) as exc:
            raise InputError("model config", f"not a valid model configuration ({exc})") from exc

    def validate(self) -> None:
        # types first: a checkpoint's "num_classes": 1.5 or true passed the ranges below and failed in torch
        if not isinstance(self.name, str):
            raise InputError("model.name", f"must be a network's name, not {self.name!r}")
        for name in ("in_channels", "num_classes", "base_width"):
            value = getattr(self, name)
            if not is_int(value):
                raise InputError(f"model.{name}", f"must be a whole number, not {value!r}")
        if not isinstance(self.bilinear, bool):
            raise InputError("model.bilinear", f"must be true or false, not {self.bilinear!r}")
        model_builder(self.name)  # an unknown network is refused with the names that are known
        if self.in_channels not in (1, 3):
            raise InputError("model.in_channels", f"must be 1 or 3, not {self.in_channels}")
        if not 1 <= self.num_classes <= 255:
            raise InputError("model.num_classes", f"must be 1..255, not {self.num_classes}")
        if self.base_width < 2 or self.base_width % 2:
            raise InputError("model.base_width", f"must be an even number ≥ 2, not {self.base_width}")
        if self.base_width > MAX_WIDTH:  # larger asked for gigabytes at the first torch.empty, and a traceback
            raise InputError("model.base_width", f"must be at most {MAX_WIDTH} (the paper's U-Net: 64), not "
                                                 f"{self.base_width}")


def _unet(config: ModelConfig) -> nn.Module:
    from fedmix_engine.model.unet import UNet

    return UNet(config.in_channels, config.num_classes, config.base_width, config.bilinear)


_REGISTRY: dict[str, Callable[[ModelConfig], nn.Module]] = {"unet": _unet}

# Installed packages offer networks here, as pytest and napari find their plugins: in pyproject.toml,
# [project.entry-points."fedmix_engine.models"] my-net = "my_package.nets:build_my_net"
ENTRY_POINT_GROUP = "fedmix_engine.models"


def register_model(name: str, builder: Callable[[ModelConfig], nn.Module]) -> None:
    """Make another network available as ``ModelConfig(name=...)`` in this process (an installed
    package's entry point in :data:`ENTRY_POINT_GROUP` makes it available in every process).

    ``builder(config)`` returns a module mapping ``B×in_channels×H×W`` images (H, W multiples of 16)
    to ``B×num_classes×H×W`` logits; it may ignore ``base_width`` and ``bilinear``. Training,
    aggregation, the wire and checkpoints work on its state dict unchanged. Every process that builds
    or reads such a model (each site, the server, a predictor) must know it; a checkpoint naming an
    unknown network is refused with the names that are known.
    """
    if not name or name in _REGISTRY:
        raise InputError("model.name", f"'{name}' is empty or already registered")
    _REGISTRY[name] = builder


def _installed() -> dict[str, list[EntryPoint]]:
    """The entry points of :data:`ENTRY_POINT_GROUP` by name (read from the installed packages'
    metadata, nothing imported); a name registered in this process is not taken from them."""
    from importlib.metadata import entry_points

    offered: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            offered.setdefault(ep.name, []).append(ep)
    return offered


def _package(entry: EntryPoint) -> str:
    return f"{entry.dist.name} {entry.dist.version}" if entry.dist else "an installed package"


def known_models() -> list[str]:
    """The networks this process can build: registered here, or offered by an installed package."""
    return [*_REGISTRY, *sorted(_installed())]


def model_builder(name: str) -> Callable[[ModelConfig], nn.Module]:
    """The builder of network ``name``: registered in this process, else loaded (once) from the
    installed package whose entry point offers it. The built-in U-Net never reads package metadata."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    entries = _installed().get(name, [])
    if not entries:
        raise InputError("model.name", f"unknown model '{name}'; known: {', '.join(known_models())} (another "
                                       f"network: install the package that offers it, docs/engine.md)")
    if len({entry.value for entry in entries}) > 1:  # which one a checkpoint's weights were trained on is unknown
        raise InputError("model.name", f"network '{name}' is offered by several installed packages ("
                                       f"{', '.join(f'{_package(e)}: {e.value}' for e in entries)}); uninstall "
                                       "all but the one the federation uses")
    entry = entries[0]
    package = _package(entry)
    try:
        builder = entry.load()
    except Exception as exc:  # its import failed: named with the package, not a bare traceback
        raise InputError("model.name", f"network '{name}' of {package} ({entry.value}) cannot be loaded: "
                                       f"{type(exc).__name__}: {exc}") from exc
    if not callable(builder):
        raise InputError("model.name", f"network '{name}' of {package}: {entry.value} is not a builder "
                                       "(a function of a ModelConfig returning a torch module)")
    _REGISTRY[name] = builder
    return builder


_PROBED: set[ModelConfig] = set()  # another network's configurations seen to keep to the contract, this process


def build_model(config: ModelConfig) -> nn.Module:
    """Instantiate the network a config describes (weights randomly initialised by torch's RNG); another
    network than the U-Net is probed once per configuration (:func:`_probe_output`)."""
    config.validate()
    model = _REGISTRY[config.name](config)
    if config.name != "unet" and config not in _PROBED and _probe_output(model, config):
        _PROBED.add(config)
    return model


def _probe_output(model: nn.Module, config: ModelConfig) -> bool:
    """Refuse a network that does not map ``B×in_channels×H×W`` images to ``B×num_classes×H×W`` logits (a
    stride left in, an encoder without its decoder): it failed mid-round, deep in the loss, with torch's shape
    error. One small batch, without gradients, in eval mode (no BatchNorm statistics move) and on a fork of the
    RNG (training draws the same numbers as without the probe). False: not probed (built on the meta device)."""
    import torch

    weight = next(iter(model.parameters()), None)
    if weight is not None and weight.is_meta:
        return False
    side = 64  # a multiple of 16, as the contract asks, and of 32 and 64: deeper encoders (timm's) take it too
    shape = (2, config.in_channels, side, side)
    wanted = (2, config.num_classes, side, side)
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            out = model(torch.zeros(shape, device=weight.device if weight is not None else "cpu"))
    except Exception as exc:  # the researcher's code: its error, named with the network and the batch
        raise InputError("model.name", f"network '{config.name}' cannot take a {_dims(shape)} batch of images: "
                                       f"{type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    if got != wanted:
        raise InputError("model.name", f"network '{config.name}' maps a {_dims(shape)} batch of images to "
                                       f"{_dims(got) if got else type(out).__name__}; it must return {_dims(wanted)} "
                                       "logits: one channel per class, at the images' size (docs/engine.md)")
    return True


def _dims(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
