"""A site's local training settings (``TrainConfig``): what every site of a federation must agree on,
stored in the server's settings and a simulation's record. Plain data without torch, so that reading
them (``status``, the admin page, Flower's run config) loads no training code."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from fedmix_engine.errors import InputError
from fedmix_engine.json_values import kind_wanted, of_kind

LOSS_NAMES = ("dice", "dice+bce")  # the reference's soft Dice, or Dice + BCE (``losses.LOSSES`` has their code)


def default_crop_size(image_size: int) -> int:
    """The training crop for an image side when none is given: 7/8 of it (the paper's 224 of 256), rounded
    down to a multiple of 16, so that setting only the image size is a valid configuration."""
    return max(16, image_size * 7 // 8 // 16 * 16)


MAX_IMAGE_SIZE = 2048  # px a side that sites train at; every image is resized to it, in memory


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings (reference values in comments; defaults sized for CPU)."""

    image_size: int = 128  # reference: 256
    crop_size: int = 112  # reference: 224
    batch_size: int = 8  # reference: 16
    lr: float = 1e-3  # reference: Adam 1e-3
    weight_decay: float = 1e-4  # reference: 1e-4
    epochs: int = 1  # local epochs per round (reference: 1)
    tau: float = 0.9  # agreement threshold for pseudo-labels
    min_box_fill: float = 0.5  # Dice(P¹, B) needed for a box pseudo-label
    loss: str = "dice"  # "dice" (reference) or "dice+bce"
    pseudo_labels: bool = True  # False: train on pixel masks only (baselines)
    flip: bool = True  # horizontal flips (vertical flips would put the skin line at the bottom)
    intensity: float = 0.1  # random gain/gamma jitter amplitude
    pl_batch_size: int = 0  # pseudo-label and evaluation batch; 0: chosen per device (see device.plan_device)
    pl_warmup_rounds: int = 0  # rounds (1-based) before pseudo-labels; until then masks (+ negatives beside them)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "train") -> TrainConfig:
        """Settings that another program wrote (a server's config to its sites, a Flower run's record,
        ``server.json``), checked before anything trains with them: a setting this version does not know
        (a newer server) is named, not a TypeError, and each value must have its setting's type (``"lr":
        "1e-3"`` failed deep in torch, ``"flip": "no"`` was true)."""
        if not isinstance(raw, dict):
            raise InputError(where, f"must be an object of training settings, not {type(raw).__name__}")
        defaults = {f.name: f.default for f in fields(cls)}
        unknown = set(raw) - set(defaults)
        if unknown:
            raise InputError(where, f"unknown setting(s) {sorted(unknown)}: written by a newer napari-fedmix? "
                                    "Update it here")
        values = {}
        for name, value in raw.items():
            if not of_kind(value, defaults[name]):
                raise InputError(f"{where}.{name}", f"must be {kind_wanted(defaults[name])}, not {value!r}")
            values[name] = float(value) if isinstance(defaults[name], float) else value
        config = cls(**values)
        try:
            config.validate()
        except InputError as exc:
            raise InputError(f"{where}.{exc.where}", exc.reason) from None
        return config

    def validate(self) -> None:
        """Refuse a setting that would fail late or train silently wrong; the error names its field."""
        if not self.image_size >= 16:  # else the crop's default (16) was named: "must be at most the image size (8 px)"
            raise InputError("image_size", f"must be ≥ 16 (four 2× poolings), not {self.image_size}")
        if self.image_size > MAX_IMAGE_SIZE:  # a site would resize every image to it, and run out of memory
            raise InputError("image_size", f"must be at most {MAX_IMAGE_SIZE} px, not {self.image_size}")
        if self.crop_size > self.image_size:
            raise InputError("crop_size", f"must be at most the image size ({self.image_size} px), "
                                          f"not {self.crop_size}")
        if self.crop_size % 16:
            raise InputError("crop_size", f"must be a multiple of 16 (four 2× poolings), not {self.crop_size}")
        if self.loss not in LOSS_NAMES:
            raise InputError("loss", f"'{self.loss}' is not one of {', '.join(LOSS_NAMES)}")
        ranges = {  # each written as the condition that holds, so that NaN fails it too
            "tau": (0 < self.tau <= 1, "in (0, 1]"),
            "min_box_fill": (0 <= self.min_box_fill <= 1, "in [0, 1]"),
            "lr": (0 < self.lr < math.inf, "a finite number > 0"),
            "weight_decay": (0 <= self.weight_decay < math.inf, "a finite number ≥ 0"),
            "intensity": (0 <= self.intensity < math.inf, "a finite number ≥ 0"),  # NaN: every image NaN
            "batch_size": (self.batch_size >= 1, "≥ 1"),
            "epochs": (self.epochs >= 1, "≥ 1"),
            "pl_batch_size": (self.pl_batch_size >= 0, "≥ 0 (0: chosen per device)"),
            "pl_warmup_rounds": (self.pl_warmup_rounds >= 0, "≥ 0"),
        }
        for name, (holds, requirement) in ranges.items():
            if not holds:
                raise InputError(name, f"must be {requirement}, not {getattr(self, name)}")
