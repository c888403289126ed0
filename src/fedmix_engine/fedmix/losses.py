"""Training losses. The reference trains with a soft Dice loss; Dice + BCE is offered as an option."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from fedmix_engine.fedmix.train_config import LOSS_NAMES

SMOOTH = 1.0


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    """1 − soft Dice per class over the whole batch, averaged over classes.

    Summing over the batch (not per image) keeps single images without foreground from adding a
    degenerate 0/0 term. For a class with *no* foreground anywhere in the batch (e.g. a batch of
    images tagged "absent"), Dice is ≈ 1 − 1/(Σp + 1) ≈ 1 whatever the prediction, which would
    make a site that only sees negatives look maximally "hard" to the adaptive aggregation; there
    the loss is the mean foreground probability instead (0 when the model is right), same [0, 1]
    scale.
    """
    prob = torch.sigmoid(logits.float())
    target = target.float()
    dims = (0, 2, 3)
    intersection = (prob * target).sum(dims)
    target_sum = target.sum(dims)
    denominator = prob.sum(dims) + target_sum
    dice_loss = 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)
    empty_loss = prob.mean(dims)
    return torch.where(target_sum > 0, dice_loss, empty_loss).mean()


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice + binary cross-entropy (each class an independent sigmoid)."""
    return soft_dice_loss(logits, target) + F.binary_cross_entropy_with_logits(logits.float(), target.float())


LOSSES = dict(zip(LOSS_NAMES, (soft_dice_loss, dice_bce_loss), strict=True))  # as TrainConfig names them
# The most each loss can be: the soft Dice lies in [0, 1] (both of its branches do); BCE has no ceiling.
LOSS_CEILINGS = {"dice": 1.0, "dice+bce": math.inf}
