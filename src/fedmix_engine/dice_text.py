"""How a Dice figure is written, with each class's for a model of several, and a site's training loss: by
simulate, the server's status and log, a site's held-out line, Flower's log and napari's Train panel
alike. Plain text: the server's ``status`` loads nothing more for it (the evaluation module, where the
Dice's was, took 0.3 s; the local update, where the loss's was, imported torch: 1.4 s)."""

from __future__ import annotations

from collections.abc import Mapping


def per_class_text(dice: Mapping[str, float]) -> str:
    """``lesion 0.800 · cyst 0.200``: each class's Dice for a model of several classes, whose mean hides a
    class it misses; "" for one class (its Dice is the mean already given)."""
    return " · ".join(f"{name} {value:.3f}" for name, value in dice.items()) if len(dice) > 1 else ""


def dice_text(dice: float, per_class: Mapping[str, float]) -> str:
    """``0.500 (lesion 0.800 · cyst 0.200)``, or ``0.500`` for one class: a Dice as every scored line gives it."""
    each = per_class_text(per_class)
    return f"{dice:.3f} ({each})" if each else f"{dice:.3f}"


def shown_loss(n: int, loss: float) -> str:
    """ℓ_k as people read it: '—' for a site that trained on nothing this round (n = 0: no masks, and no
    pseudo-label kept), which reports 0.0 so that its update stays finite, not a perfect fit."""
    return f"{loss:.3f}" if n else "—"
