"""A federation's settings (``ServerConfig``): what every site must agree on, stored in the state
directory's ``server.json`` when it is created; a restart may change only ``ADJUSTABLE``. Plain data
without torch: ``status``, ``token add`` and the admin page read it without loading the trainer."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmix_engine.config_diff import changed_fields
from fedmix_engine.data.site_store import check_class_names
from fedmix_engine.errors import InputError
from fedmix_engine.fedmix.train_config import TrainConfig
from fedmix_engine.fedmix.weights import AggregationRule
from fedmix_engine.json_values import is_text_list, kind_wanted, of_kind, parse_json
from fedmix_engine.model import ModelConfig
from fedmix_engine.seeds import check_seed
from fedmix_engine.strict_json import strict_dumps

CONFIG_FILE = "server.json"  # in the state directory

# What an admin may change when restarting a federation: how long it runs, with how many sites, how
# long a round waits and how large an update may be. What every site trains and how updates are
# weighed stay fixed: changing them mid-way would mix two experiments in one round history.
ADJUSTABLE = ("sites", "min_sites", "round_timeout", "rounds", "max_upload_mb", "keep_models")


def parse_class_names(text: str) -> tuple[str, ...]:
    """``"lesion, cyst"`` → ``("lesion", "cyst")``: how ``--class-names`` and Flower's ``class-names`` are written."""
    return tuple(name.strip() for name in text.split(","))


@dataclass(frozen=True)
class ServerConfig:
    """Everything every site must agree on, stored when the state directory is created (a restart may change
    only ``ADJUSTABLE``)."""

    sites: int = 3
    min_sites: int = 2
    round_timeout: float = 600.0
    rounds: int = 10
    method: str = "fedmix"
    lam: float = 10.0
    beta: float = 1.5
    seed: int = 0
    max_upload_mb: float = 512.0
    # rounds whose global model stays on disk: the last K (and the one the sites' held-out scores rate best so
    # far); 0: every round's. Each round's record stays. A pair at the reference width is 138 MB a round.
    keep_models: int = 0
    model: ModelConfig = field(default_factory=lambda: ModelConfig(base_width=16))
    train: TrainConfig = field(default_factory=TrainConfig)
    # the classes in label order: label k must mean the same class at every site, so a site whose names
    # or order differ is refused at joining (empty: only the count is checked, as before names were stored)
    class_names: tuple[str, ...] = ()

    def validate(self) -> None:
        """Refuse bad settings, each named by its field (``min_sites``); a front end names it as its user
        typed it (``--min-sites``, Flower's ``min-sites``)."""
        for name in ("sites", "rounds", "round_timeout", "max_upload_mb"):
            if not getattr(self, name) > 0:
                raise InputError(name, f"must be positive, not {getattr(self, name)}")
        if self.max_upload_mb == math.inf:  # a limit in bytes: int(inf) ended the server's start in a traceback
            raise InputError("max_upload_mb", "must be a finite number of MB, not inf")
        if not (isinstance(self.keep_models, int) and self.keep_models >= 0):
            raise InputError("keep_models", f"must be a whole number ≥ 0 (0: every round's model), not "
                                            f"{self.keep_models}")
        check_seed(self.seed)
        if not 1 <= self.min_sites <= self.sites:
            raise InputError("min_sites", f"need 1 ≤ min-sites ({self.min_sites}) ≤ sites ({self.sites})")
        AggregationRule.for_method(self.method, self.lam, self.beta)
        self.model.validate()
        self.train.validate()
        if self.class_names and (len(self.class_names) != self.model.num_classes
                                 or len(set(self.class_names)) != len(self.class_names) or not all(self.class_names)):
            raise InputError("class_names", f"{', '.join(self.class_names) or '(none)'}: give the model's "
                                            f"{self.model.num_classes} class(es), each once, in label order")
        if self.class_names:  # as a site names its classes: a name no site may have ('background') admits no site
            check_class_names(self.class_names, "class_names")

    def checkpoint_meta(self, round_index: int) -> dict[str, Any]:
        """What a global checkpoint of this federation carries besides its weights: the size its images were
        trained at (prediction resizes to it) and, when fixed, the label names (DICOM SEG segments)."""
        meta: dict[str, Any] = {"round": round_index, "image_size": self.train.image_size}
        if self.class_names:
            meta["classes"] = list(self.class_names)
        return meta

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        """server.json's text: strict JSON, which has no Infinity, so ``--round-timeout inf`` (no deadline)
        is written as null (jq, a browser, a monitoring script read it)."""
        return (strict_dumps(self.to_dict(), indent=2) + "\n").encode()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ServerConfig:
        raw = dict(raw)
        if "round_timeout" in raw and raw["round_timeout"] is None:  # null: no deadline (see to_json)
            raw["round_timeout"] = math.inf
        model = ModelConfig.from_dict(raw.pop("model"))
        train = TrainConfig.from_dict(raw.pop("train"))
        names = raw.pop("class_names", [])  # a server.json from before names: none
        if not is_text_list(names):
            raise InputError("class_names", f"must be a list of class names, not {names!r}")
        default = cls()
        for name, value in raw.items():  # a hand edit's "lam": [] failed as a TypeError in the weights' checks
            kept = getattr(default, name, None)
            if kept is not None and not (of_kind(value, kept) or (name == "round_timeout" and value == math.inf)):
                raise InputError(name, f"must be {kind_wanted(kept)}, not {value!r}")
        return cls(**raw, model=model, train=train, class_names=tuple(names))


def setting_changes(stored: ServerConfig, new: ServerConfig) -> tuple[list[tuple[str, Any, Any]],
                                                                       list[tuple[str, Any, Any]]]:
    """The settings that differ, each as (name, stored, new), split into (adjustable, fixed)."""
    changes = changed_fields(stored.to_dict(), new.to_dict())
    return [c for c in changes if c[0] in ADJUSTABLE], [c for c in changes if c[0] not in ADJUSTABLE]


def load_server_config(path: Path) -> ServerConfig:
    """A state directory's server.json, or an error naming it."""
    try:
        return ServerConfig.from_dict(parse_json(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InputError(path, f"unreadable federation settings ({type(exc).__name__}: {exc})") from None
