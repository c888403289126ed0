"""How good the pseudo-labels were, measured against ground truth the sites do not have.

A diagnostic for the simulator only. In a federation built by ``make-sample`` or
``make-federation`` the evaluation tree keeps each site's full truth (``eval/<site>/oracle``);
after a site has selected its pseudo-labels, the simulator compares them with that truth. The
trainer never reads it: the comparison happens after the selection, outside ``local_update``,
and nothing of it flows back into training.

Per supervision kind (box, tag), over the images whose pseudo-label came from the networks:

- ``selected`` / ``rejected``: how many were kept or thrown away by the selection rules;
- ``dice``: mean per-image Dice of the selected P¹ (network 2's target) with the truth;
- ``rejected_dice``: the same for the rejected ones (is the selection throwing away bad ones?);
- ``size_ratio``: foreground pixels of the selected P¹ over the truth's (> 1: over-segmented).

A figure without images to average is ``None``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedmix_engine.data.site_store import SiteStore
from fedmix_engine.data.tensors import KIND_BOX, KIND_NAMES, KIND_TAG, SiteTensors, label_to_masks
from fedmix_engine.fedmix.pseudo_labels import PseudoLabels, agreement_dice, needs_prediction


def load_truth(oracle_dir: Path, data: SiteTensors, image_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The oracle's masks for ``data``'s images, resized like the training masks, and which images the
    oracle holds (bool N); ``None`` when there is no oracle store."""
    if not (oracle_dir / "site.json").exists():
        return None
    truth = torch.zeros(data.masks.shape, dtype=torch.bool)
    with SiteStore.open(oracle_dir, readonly=True) as store, store.training_view() as view:
        records = {rec.id: rec for rec in view.records}
        for row, image_id in enumerate(data.ids):  # masks only: the oracle's images are the site's own
            if image_id in records and records[image_id].has_mask:  # else lesion-free: all background
                truth[row] = label_to_masks(view.mask(image_id), len(data.classes), image_size)
    return truth, torch.tensor([image_id in records for image_id in data.ids], dtype=torch.bool)


def audit_pseudo_labels(labels: PseudoLabels, data: SiteTensors, truth: torch.Tensor,
                        known: torch.Tensor) -> dict[str, dict[str, float | None]]:
    """Per kind (box, tag): counts, mean Dice with the truth of the selected and of the rejected
    pseudo-labels, and the selected ones' size relative to the truth (see the module docstring)."""
    predicted = needs_prediction(data) & known
    p1 = labels.target2  # network 2 learns from P¹
    dice = agreement_dice(p1, truth)
    audit: dict[str, dict[str, float | None]] = {}
    for kind in (KIND_BOX, KIND_TAG):
        of_kind = predicted & (data.kinds == kind)
        if not of_kind.any():
            continue
        selected, rejected = of_kind & labels.keep, of_kind & ~labels.keep
        truth_pixels = int(truth[selected].sum())
        audit[KIND_NAMES[kind]] = {
            "selected": int(selected.sum()),
            "rejected": int(rejected.sum()),
            "dice": round(float(dice[selected].mean()), 4) if selected.any() else None,
            "rejected_dice": round(float(dice[rejected].mean()), 4) if rejected.any() else None,
            "size_ratio": round(int(p1[selected].sum()) / truth_pixels, 4) if truth_pixels else None,
        }
    return audit
