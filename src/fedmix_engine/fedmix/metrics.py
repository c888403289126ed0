"""Segmentation metrics per class on binary masks (NumPy), with explicit empty-mask conventions.

Conventions (documented in docs/engine.md and tested):

- Dice and IoU: both prediction and truth empty → 1.0 (a correct "nothing here"); exactly one
  empty → 0.0.
- HD95 (95th percentile of the symmetric surface distance, in pixels): both empty → 0.0; exactly
  one empty → ``nan`` (undefined; excluded from means, and counted separately).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = pred.astype(bool), truth.astype(bool)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = pred.astype(bool), truth.astype(bool)
    union = int(np.logical_or(pred, truth).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, truth).sum()) / union


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: float | tuple[float, float] = 1.0) -> float:
    """95th-percentile symmetric Hausdorff distance between the two masks' surfaces, in pixels or, with
    ``spacing`` (one number, or per axis: row, column), in its unit."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return float("nan")
    sp, st = _surface(pred), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    distances = np.concatenate([to_truth[sp], to_pred[st]])
    return float(np.percentile(distances, 95))


def per_class_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, list[float]]:
    """Dice, IoU and HD95 for each class channel of bool ``K×H×W`` arrays."""
    return {
        "dice": [dice(p, t) for p, t in zip(pred, truth, strict=True)],
        "iou": [iou(p, t) for p, t in zip(pred, truth, strict=True)],
        "hd95": [hd95(p, t) for p, t in zip(pred, truth, strict=True)],
    }
