"""Checkpoints whose predictions are known without training, for tests of what is done with them."""

from __future__ import annotations

from pathlib import Path

from fedmix_engine.checkpoint import save_checkpoint
from fedmix_engine.fedmix.pair import init_pair
from fedmix_engine.model import ModelConfig

TINY = ModelConfig(base_width=4)


def all_lesion_checkpoint(path: Path, image_size: int = 32, classes: tuple[str, ...] = ("lesion",)) -> Path:
    """A width-4 pair that calls every pixel lesion (output weights 0, bias +5): its masks are all
    foreground, so HD95 is defined on every labelled image and areas are the image's."""
    pair = init_pair(TINY, 0)
    for net in ("net1", "net2"):
        pair[f"{net}.outc.conv.weight"].zero_()
        pair[f"{net}.outc.conv.bias"].fill_(5.0)
    return save_checkpoint(path, pair, TINY, {"image_size": image_size, "classes": list(classes)})
