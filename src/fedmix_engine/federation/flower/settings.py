"""The Flower run configuration (``[tool.flwr.app.config]``) of a FedMix run, checked once.

Keys are Flower-style (``kebab-case``); ``flwr run … --run-config 'key=value'`` overrides them.
Defaults match ``fedmix-engine serve``. Bad values fail before round 1, naming the key.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fedmix_engine.errors import InputError
from fedmix_engine.fedmix.aggregation import METHODS, AggregationRule
from fedmix_engine.fedmix.local_update import TrainConfig
from fedmix_engine.model import ModelConfig

# run-config key → TrainConfig field (what every site trains with)
TRAIN_KEYS = {"image-size": "image_size", "crop-size": "crop_size", "batch-size": "batch_size", "lr": "lr",
              "local-epochs": "epochs", "tau": "tau", "loss": "loss", "pl-warmup": "pl_warmup_rounds"}
MODEL_KEYS = {"model-width": "base_width", "num-classes": "num_classes", "in-channels": "in_channels"}


@dataclass(frozen=True)
class FlowerRunSettings:
    rounds: int = 10
    method: str = "fedmix"
    lam: float = 10.0
    beta: float = 1.5
    seed: int = 0
    min_sites: int = 2
    round_timeout: float = 3600.0
    out_dir: str = "fedmix-flower-run"
    keep_updates: bool = False
    model: ModelConfig = field(default_factory=lambda: ModelConfig(base_width=16))
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def rule(self) -> AggregationRule:
        return AggregationRule.for_method(self.method, self.lam, self.beta)

    @classmethod
    def from_run_config(cls, raw: dict[str, Any]) -> FlowerRunSettings:
        known = {"num-server-rounds", "method", "lam", "beta", "seed", "min-sites", "round-timeout", "out-dir",
                 "keep-updates", *TRAIN_KEYS, *MODEL_KEYS}
        unknown = set(raw) - known
        if unknown:
            raise InputError("run config", f"unknown key(s) {sorted(unknown)}; known: {sorted(known)}")

        def get(key: str, kind: type, default: Any) -> Any:
            value = raw.get(key, default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise InputError(f"run config '{key}'", f"must be {kind.__name__}, not {value!r}")
            return value

        base = cls()
        train = TrainConfig(**{field: get(key, type(getattr(base.train, field)), getattr(base.train, field))
                               for key, field in TRAIN_KEYS.items()})
        train.validate()
        model = ModelConfig.from_dict({**asdict(base.model), **{
            field: get(key, int, getattr(base.model, field)) for key, field in MODEL_KEYS.items()}})
        settings = cls(rounds=get("num-server-rounds", int, base.rounds), method=get("method", str, base.method),
                       lam=get("lam", float, base.lam), beta=get("beta", float, base.beta),
                       seed=get("seed", int, base.seed), min_sites=get("min-sites", int, base.min_sites),
                       round_timeout=get("round-timeout", float, base.round_timeout),
                       out_dir=get("out-dir", str, base.out_dir), keep_updates=get("keep-updates", bool, False),
                       model=model, train=train)
        if settings.method not in METHODS:
            raise InputError("run config 'method'", f"'{settings.method}' is not one of {', '.join(METHODS)}")
        settings.rule  # noqa: B018 - validates λ and β
        if settings.rounds < 1 or settings.min_sites < 1 or settings.round_timeout <= 0:
            raise InputError("run config", "num-server-rounds and min-sites must be ≥ 1, round-timeout > 0")
        return settings

    def site_config(self) -> dict[str, str | int]:
        """What each site receives every round (a Flower ConfigRecord: strings and numbers only)."""
        return {"fedmix-model": self.model.to_json(), "fedmix-train": json.dumps(asdict(self.train), sort_keys=True),
                "fedmix-seed": self.seed}

    def out_path(self) -> Path:
        return Path(self.out_dir).expanduser().resolve()


def parse_site_config(config: dict[str, Any]) -> tuple[ModelConfig, TrainConfig, int, int]:
    """(model, training settings, federation seed, round) from the ConfigRecord a site received."""
    try:
        model = ModelConfig.from_json(str(config["fedmix-model"]))
        raw = json.loads(str(config["fedmix-train"]))
        unknown = set(raw) - {f.name for f in fields(TrainConfig)}
        if unknown:
            raise InputError("fedmix-train", f"unknown field(s) {sorted(unknown)}: update napari-fedmix on this site")
        train = TrainConfig(**raw)
        train.validate()
        return model, train, int(config["fedmix-seed"]), int(config["server-round"])
    except KeyError as exc:
        raise InputError("config from the SuperLink", f"missing {exc}: is the server running the FedMix app?") from None
