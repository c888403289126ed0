"""Pseudo-labels from the global pair (G¹, G²): predict, refine by boxes and tags, select.

For an image with boxes ``B`` (per class) and the global networks' binary predictions
``Yⁱ = [σ(Gⁱ(x)) > 0.5]``:

- refine:  ``Pⁱ = Yⁱ ⊙ B`` (a class with no box is background: boxes are exhaustive);
- select:  keep if ``Dice(P¹, P²) ≥ τ`` (the networks agree) and, for each boxed class,
  ``Dice(P¹_c, B_c) ≥ min_box_fill`` (the prediction fills enough of its box).

For an image with tags ``T`` (present 1 / absent 0 / unknown):

- refine:  ``Pⁱ = Yⁱ ⊙ T`` — an *absent* class is forced to background (a certain target: the
  reference single-class code ignores it; we use it); present and unknown classes keep the prediction;
- select:  keep if ``Dice(P¹, P²) ≥ τ`` and no class tagged *present* is empty in P¹ or P² (two
  empty masks agree perfectly; the reference accepts them and teaches "no lesion" on lesion images).

Cross pseudo supervision: network 1 trains on ``P²``, network 2 on ``P¹``. Pixel-labelled images
train both networks on their mask. Only images whose target depends on the prediction are
predicted (boxes, and tags with a class not tagged absent): a mask is its own target and an
all-absent tag is all background whatever the networks say. They are predicted in batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fedmix_engine.data.tensors import KIND_BOX, KIND_MASK, KIND_TAG, TAG_ABSENT, TAG_PRESENT, SiteTensors
from fedmix_engine.device import DevicePlan, autocast, forward_in_batches, to_device


@torch.no_grad()
def predict_binary(net: nn.Module, images: torch.Tensor, plan: DevicePlan,
                   batch_size: int | None = None) -> torch.Tensor:
    """``[σ(net(x)) > 0.5]`` for ``N×C×H×W`` images, batched on the plan's device; bool, on the CPU."""
    net.eval()

    def step(items: slice) -> torch.Tensor:
        with autocast(plan):
            logits = net(to_device(images[items], plan))
        return (logits > 0).cpu()  # σ(z) > 0.5 ⟺ z > 0

    out, _ = forward_in_batches(step, len(images), batch_size or plan.pl_batch_size, plan)
    if not out:
        return torch.zeros((0, 0, *images.shape[-2:]), dtype=torch.bool)
    return torch.cat(out)


def needs_prediction(data: SiteTensors) -> torch.Tensor:
    """Bool N: images whose pseudo-label depends on the networks (boxes; tags not all absent)."""
    return (data.kinds == KIND_BOX) | ((data.kinds == KIND_TAG) & (data.tags != TAG_ABSENT).any(1))


@torch.no_grad()
def predict_where_needed(net: nn.Module, data: SiteTensors, needed: torch.Tensor, plan: DevicePlan,
                         batch_size: int | None = None) -> torch.Tensor:
    """``predict_binary`` on the ``needed`` images (see ``needs_prediction``); all-background
    elsewhere (bool N×K×H×W).

    Selecting on these is identical to selecting on a prediction of every image: the skipped
    images' targets ignore the prediction. On a site with ⅓ masks it saves ⅓ of the pass."""
    pred = torch.zeros(data.masks.shape, dtype=torch.bool)
    if needed.any():
        pred[needed] = predict_binary(net, data.images[needed], plan, batch_size)
    return pred


def agreement_dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Dice between bool ``N×K×H×W`` masks over all classes; both empty → 1."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    total = a.sum(1) + b.sum(1)
    inter = (a * b).sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def refine(pred: torch.Tensor, kinds: torch.Tensor, boxes: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """Restrict predictions by boxes (box images) and by absent tags (tag images)."""
    refined = pred.clone()
    is_box = kinds == KIND_BOX
    refined[is_box] &= boxes[is_box]
    allowed = (tags != TAG_ABSENT)[:, :, None, None]
    is_tag = kinds == KIND_TAG
    refined[is_tag] &= allowed[is_tag]
    return refined


@dataclass
class PseudoLabels:
    """Targets for each network and which samples were selected, with counts for the report."""

    target1: torch.Tensor  # what network 1 learns from (P², or the mask)
    target2: torch.Tensor  # what network 2 learns from (P¹, or the mask)
    keep: torch.Tensor  # bool N
    counts: dict[str, int] = field(default_factory=dict)


def select_pseudo_labels(pred1: torch.Tensor, pred2: torch.Tensor, data: SiteTensors, tau: float = 0.9,
                         min_box_fill: float = 0.5) -> PseudoLabels:
    """Refine the global pair's predictions by boxes and tags and keep the trustworthy ones."""
    kinds, boxes, tags = data.kinds, data.boxes, data.tags
    p1, p2 = refine(pred1, kinds, boxes, tags), refine(pred2, kinds, boxes, tags)
    agree = agreement_dice(p1, p2) >= tau

    # box fill: Dice(P¹_c, B_c) for every class that has a box; classes without one do not count
    inter = (p1 & boxes).flatten(2).sum(2).float()
    fill = 2 * inter / (p1.flatten(2).sum(2) + boxes.flatten(2).sum(2)).float().clamp_min(1)
    has_box = boxes.flatten(2).any(2)
    box_ok = torch.where(has_box, fill >= min_box_fill, torch.ones_like(has_box)).all(1) & has_box.any(1)

    # tags: a class tagged present must be non-empty in both pseudo-labels
    present = tags == TAG_PRESENT
    nonempty = p1.flatten(2).any(2) & p2.flatten(2).any(2)
    tag_ok = torch.where(present, nonempty, torch.ones_like(present)).all(1)

    is_mask, is_box, is_tag = kinds == KIND_MASK, kinds == KIND_BOX, kinds == KIND_TAG
    keep = is_mask | (is_box & agree & box_ok) | (is_tag & agree & tag_ok)
    masks = data.masks
    target1 = torch.where(is_mask[:, None, None, None], masks, p2)
    target2 = torch.where(is_mask[:, None, None, None], masks, p1)
    counts = {
        "mask": int(is_mask.sum()),
        "box_total": int(is_box.sum()), "box_selected": int((is_box & keep).sum()),
        "box_rejected_agreement": int((is_box & ~agree).sum()),
        "box_rejected_fill": int((is_box & agree & ~box_ok).sum()),
        "tag_total": int(is_tag.sum()), "tag_selected": int((is_tag & keep).sum()),
        "tag_rejected_agreement": int((is_tag & ~agree).sum()),
        "tag_rejected_empty_present": int((is_tag & agree & ~tag_ok).sum()),
    }
    return PseudoLabels(target1, target2, keep, counts)


def kept_summary(counts: dict[str, int]) -> str:
    """For a round's status line: '; pseudo-labels kept: 20 of 25 box, 18 of 31 tag' (the kinds the
    site has; a tag count includes images tagged all-absent, which are always kept), or '' for a site
    without boxes or tags or in a round without pseudo-labels."""
    parts = [f"{counts[f'{kind}_selected']} of {counts[f'{kind}_total']} {kind}" for kind in ("box", "tag")
             if counts.get(f"{kind}_total")]
    return f"; pseudo-labels kept: {', '.join(parts)}" if parts else ""
