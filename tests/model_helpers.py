"""Checkpoints whose predictions are known without training, for tests of what is done with them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from fedmix_engine.checkpoint import save_checkpoint
from fedmix_engine.fedmix.pair import init_pair
from fedmix_engine.model import ModelConfig

TINY = ModelConfig(base_width=4)


def all_lesion_checkpoint(path: Path, image_size: int = 32, classes: tuple[str, ...] = ("lesion",)) -> Path:
    """A width-4 pair that calls every pixel lesion (output weights 0, bias +5): its masks are all
    foreground, so HD95 is defined on every labelled image and areas are the image's."""
    return constant_checkpoint(path, 5.0, image_size, classes)


def no_lesion_checkpoint(path: Path, image_size: int = 32, in_channels: int = 1) -> Path:
    """A width-4 pair that calls every pixel background (bias -5: probability 0.007 everywhere); grey, or
    colour (``in_channels=3``)."""
    return constant_checkpoint(path, -5.0, image_size, ("lesion",), in_channels)


def constant_checkpoint(path: Path, logit: float, image_size: int, classes: tuple[str, ...],
                        in_channels: int = 1) -> Path:
    """Every output channel the same logit: with several classes, argmax gives the first."""
    config = replace(TINY, num_classes=len(classes), in_channels=in_channels)
    pair = init_pair(config, 0)
    for net in ("net1", "net2"):
        pair[f"{net}.outc.conv.weight"].zero_()
        pair[f"{net}.outc.conv.bias"].fill_(logit)
    return save_checkpoint(path, pair, config, {"image_size": image_size, "classes": list(classes)})
