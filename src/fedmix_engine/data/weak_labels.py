"""Weak labels from full ones: what a clinician at each level of effort would have marked.

A site given ``mask`` keeps the mask; ``box`` gets one box per connected lesion (with the paper's
annotator margins); ``tag`` gets only "present"/"absent" per class. ``make-sample`` (synthetic
images) and ``make-federation`` (real, fully labelled sites) both build their federations with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from fedmix_engine.data.site_store import Box, SiteStore
from fedmix_engine.errors import InputError

KINDS = ("mask", "box", "tag")


def supervision_plan(sites: int, supervision: Sequence[str] | None, mix: Sequence[float] | None) -> list[str | None]:
    """One kind per site (default mask, box, tag, mask …), or None for every site when ``mix`` gives
    the fractions of mask, box and tag images within each site."""
    if mix is not None and supervision is not None:
        raise InputError("--mix", "give either --supervision (one kind per site) or --mix (fractions), not both")
    if mix is not None:
        if len(mix) != 3 or not all(0 <= f <= 1 for f in mix) or abs(sum(mix) - 1.0) > 1e-6:  # NaN fails too
            raise InputError("--mix", f"three non-negative fractions (mask,box,tag) summing to 1, got {list(mix)}")
        return [None] * sites
    kinds = list(supervision) if supervision else [KINDS[i % 3] for i in range(sites)]
    if len(kinds) != sites:
        raise InputError("--supervision", f"names {len(kinds)} kind(s) ({','.join(kinds)}) for {sites} site(s): "
                                          "give one kind per site, in site order (e.g. mask,box,tag)")
    for k in kinds:
        if k not in KINDS:
            raise InputError("--supervision", f"unknown kind '{k}'; use mask, box or tag")
    return kinds


def boxes_from_mask(mask: np.ndarray, classes: Sequence[str], rng: np.random.Generator) -> list[Box]:
    """One box per connected lesion, each side widened by a random margin: 1–9 px at 256² (the paper's
    margins), scaled with the image size — unscaled, 1–9 px around a 10 px lesion of a 64² image makes
    a box that even a perfect prediction fills to Dice ≈ 0.4, below the 0.5 box-fill check."""
    height, width = mask.shape
    scale = max(height, width) / 256
    boxes = []
    for index, name in enumerate(classes, start=1):
        labelled, _ = ndimage.label(mask == index)
        for sl in ndimage.find_objects(labelled):
            if sl is None:
                continue
            m = np.rint(rng.integers(1, 10, size=4) * scale).astype(int)
            boxes.append(Box(name, max(0, sl[0].start - int(m[0])), max(0, sl[1].start - int(m[1])),
                             min(height, sl[0].stop + int(m[2])), min(width, sl[1].stop + int(m[3]))))
    return boxes


def store_ground_truth(store: SiteStore, image_id: str, mask: np.ndarray) -> None:
    """Full ground truth: the mask when there is a lesion, else every class tagged absent."""
    if mask.any():
        store.set_mask(image_id, mask)
    for index, name in enumerate(store.config.classes, start=1):
        store.set_tag(image_id, name, bool((mask == index).any()))


def annotate(store: SiteStore, image_id: str, mask: np.ndarray, kind: str, rng: np.random.Generator) -> None:
    """Record only what a clinician with this level of effort would have marked."""
    classes = store.config.classes
    if kind == "mask":
        store_ground_truth(store, image_id, mask)
    elif kind == "box":
        boxes = boxes_from_mask(mask, classes, rng)
        if boxes:
            store.set_boxes(image_id, boxes)
        else:  # nothing to box: the clinician says so with tags
            for name in classes:
                store.set_tag(image_id, name, False)
    elif kind == "tag":
        for index, name in enumerate(classes, start=1):
            store.set_tag(image_id, name, bool((mask == index).any()))
    else:
        raise InputError("supervision", f"unknown supervision kind '{kind}'; use mask, box or tag")


def kinds_for_site(n: int, site_kind: str | None, mix: Sequence[float] | None,
                    rng: np.random.Generator) -> list[str]:
    if mix is None:
        return [site_kind or "mask"] * n
    counts = [round(f * n) for f in mix]
    counts[-1] = n - sum(counts[:-1])
    kinds = [k for k, c in zip(KINDS, counts, strict=True) for _ in range(max(c, 0))]
    rng.shuffle(kinds)
    return kinds


def supervision_counts(summary: dict[str, int]) -> str:
    """"12 mask, 0 box, 3 tag": a site's ``SiteStore.summary()`` as a person reads it."""
    return f"{summary['mask']} mask, {summary['box']} box, {summary['tag']} tag"


def add_training_image(site: SiteStore, oracle: SiteStore, image_id: str, image: np.ndarray, truth: np.ndarray,
                       kind: str, rng: np.random.Generator, author: str,
                       spacing: tuple[float, float] | None = None) -> None:
    """One training image: its site keeps only the supervision ``kind``; the oracle store (read by the
    supervised upper bound alone) keeps the full truth."""
    site.add_image(image, image_id, author=author, spacing=spacing)
    annotate(site, image_id, truth, kind, rng)
    oracle.add_image(image, image_id, author=author, spacing=spacing)
    store_ground_truth(oracle, image_id, truth)
