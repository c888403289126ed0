"""The Flower run configuration (``[tool.flwr.app.config]``) of a FedMix run, checked once.

Keys are Flower-style (``kebab-case``); ``flwr run … --run-config 'key=value'`` overrides them.
The federation settings are the built-in server's ``ServerConfig`` (same defaults, same checks);
only where results go is Flower-specific. Bad values fail before round 1, naming the key.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from fedmix_engine.errors import InputError
from fedmix_engine.federation.server_config import ServerConfig, parse_class_names
from fedmix_engine.fedmix.train_config import TrainConfig, default_crop_size
from fedmix_engine.fedmix.weights import AggregationRule
from fedmix_engine.json_values import is_int, is_text_list, kind_wanted, of_kind, parse_json
from fedmix_engine.model import ModelConfig

# run-config key → field of ServerConfig, of its ModelConfig, of its TrainConfig
FEDERATION_KEYS = {"num-server-rounds": "rounds", "method": "method", "lam": "lam", "beta": "beta", "seed": "seed",
                   "min-sites": "min_sites", "round-timeout": "round_timeout"}
MODEL_KEYS = {"model": "name", "model-width": "base_width", "num-classes": "num_classes", "in-channels": "in_channels"}
TRAIN_KEYS = {"image-size": "image_size", "crop-size": "crop_size", "batch-size": "batch_size", "lr": "lr",
              "local-epochs": "epochs", "tau": "tau", "loss": "loss", "pl-warmup": "pl_warmup_rounds"}
APP_KEYS = {"out-dir": "out_dir", "keep-updates": "keep_updates", "fraction-evaluate": "fraction_evaluate"}
CLASS_NAMES_KEY = "class-names"  # ServerConfig.class_names, comma-separated ("" = only the count is checked)
NO_DEADLINE_KEY = "round-timeout"  # may be inf (TOML's inf): every round waits for its sites, as `serve` allows


@dataclass(frozen=True)
class FlowerRunSettings:
    federation: ServerConfig = field(default_factory=ServerConfig)
    out_dir: str = "fedmix-flower-run"
    keep_updates: bool = False  # also keep every accepted update per round (audits, tests)
    fraction_evaluate: float = 0.0  # of the sites asked each round to score the new model on their held-out images

    @property
    def rule(self) -> AggregationRule:
        f = self.federation
        return AggregationRule.for_method(f.method, f.lam, f.beta)

    def to_run_config(self) -> dict[str, Any]:
        f = self.federation
        return {**{key: getattr(f, name) for key, name in FEDERATION_KEYS.items()},
                **{key: getattr(f.model, name) for key, name in MODEL_KEYS.items()},
                **{key: getattr(f.train, name) for key, name in TRAIN_KEYS.items()},
                **{key: getattr(self, name) for key, name in APP_KEYS.items()},
                CLASS_NAMES_KEY: ",".join(f.class_names)}

    @classmethod
    def from_run_config(cls, raw: dict[str, Any]) -> FlowerRunSettings:
        defaults = cls().to_run_config()
        unknown = set(raw) - set(defaults)
        if unknown:  # a mistyped key, named with the nearest one, as the command line's options are
            hints = "".join(f"; {key}: did you mean {near[0]}?" for key in sorted(unknown)
                            if (near := difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.6)))
            raise InputError("run config", f"unknown key(s) {sorted(unknown)}{hints}; known: {sorted(defaults)}")
        values = {}
        for key, default in defaults.items():
            value = raw.get(key, default)
            no_deadline = key == NO_DEADLINE_KEY and value == math.inf
            if not (no_deadline or of_kind(value, default)):
                wanted = "a number of seconds, or inf for no deadline" if key == NO_DEADLINE_KEY else \
                    kind_wanted(default)
                raise InputError(f"run config '{key}'", f"must be {wanted}, not {value!r}")
            values[key] = float(value) if isinstance(default, float) else value

        def pick(table: dict[str, str]) -> dict[str, Any]:
            return {name: values[key] for key, name in table.items()}

        names = parse_class_names(values[CLASS_NAMES_KEY]) if values[CLASS_NAMES_KEY] else ()
        model = pick(MODEL_KEYS)
        if names and "num-classes" not in raw:  # the names say how many classes there are
            model["num_classes"] = len(names)
        train = pick(TRAIN_KEYS)
        if "image-size" in raw and "crop-size" not in raw:  # the crop follows a given image size
            train["crop_size"] = default_crop_size(train["image_size"])
        base = ServerConfig()
        federation = replace(base, **pick(FEDERATION_KEYS), model=replace(base.model, **model),
                             train=replace(base.train, **train), class_names=names)
        federation = replace(federation, sites=max(federation.sites, federation.min_sites))
        try:
            federation.validate()
        except InputError as exc:  # named by the key written, not by the ServerConfig field it sets
            keys = {name: key for table in (FEDERATION_KEYS, MODEL_KEYS, TRAIN_KEYS) for key, name in table.items()}
            key = {**keys, "class_names": CLASS_NAMES_KEY}.get(exc.where.removeprefix("model."))
            raise InputError(f"run config '{key}'" if key else "run config", exc.reason if key else str(exc)) from None
        app = pick(APP_KEYS)
        if not 0.0 <= app["fraction_evaluate"] <= 1.0:
            raise InputError("run config 'fraction-evaluate'", f"must be from 0 to 1, not {app['fraction_evaluate']}")
        return cls(federation, **app)

    @property
    def timeout(self) -> float | None:
        """The round timeout as Flower's ``send_and_receive`` takes it: None (no time limit) for inf."""
        timeout = self.federation.round_timeout
        return None if math.isinf(timeout) else timeout

    def site_config(self) -> dict[str, str | int]:
        """What each site receives every round (a Flower ConfigRecord: strings and numbers only)."""
        f = self.federation
        return {"fedmix-model": f.model.to_json(), "fedmix-train": json.dumps(asdict(f.train), sort_keys=True),
                "fedmix-seed": f.seed, "fedmix-classes": json.dumps(list(f.class_names))}

    def out_path(self) -> Path:
        return Path(self.out_dir).expanduser().resolve()


class SiteRoundConfig(NamedTuple):
    model: ModelConfig
    train: TrainConfig
    seed: int  # the federation's
    round: int
    class_names: tuple[str, ...]  # empty: the federation fixed only the class count


def parse_site_config(config: dict[str, Any]) -> SiteRoundConfig:
    """What a site needs for one round, from the ConfigRecord it received."""
    try:
        model = ModelConfig.from_json(str(config["fedmix-model"]))
        train = TrainConfig.from_dict(_json_field(config, "fedmix-train"), "fedmix-train")
        names = _json_field(config, "fedmix-classes", "[]")  # absent from a server before names
        if not is_text_list(names):
            raise InputError("fedmix-classes", f"must be a list of class names, not {names!r}")
        seed, round_number = config["fedmix-seed"], config["server-round"]
    except KeyError as exc:
        raise InputError("config from the SuperLink", f"missing {exc}: is the server running the FedMix app?") from None
    for key, value in (("fedmix-seed", seed), ("server-round", round_number)):
        if not is_int(value):
            raise InputError(key, f"must be an integer, not {value!r}: is the server running the FedMix app?")
    return SiteRoundConfig(model, train, seed, round_number, tuple(names))


def _json_field(config: dict[str, Any], key: str, default: str | None = None) -> Any:
    """A ConfigRecord entry that holds JSON text, read; a KeyError when it is absent and has no default."""
    text = config[key] if default is None else config.get(key, default)
    try:
        return parse_json(str(text))
    except ValueError as exc:
        raise InputError(key, f"not JSON ({exc}): is the server running this version of the FedMix app?") from None
