"""A model's quality on a labelled site: the simulator's per-round validation, the Train widget's
validation Dice, and ``fedmix-engine evaluate``'s per-image table.

An image counts when its ground truth is full: a mask, or every class tagged absent (then its truth
is empty). Predictions are compared at the image's own size.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from fedmix_engine.atomic import atomic_write_bytes
from fedmix_engine.data.dicom_seg import default_class_names
from fedmix_engine.data.site_store import ImageRecord, SiteStore
from fedmix_engine.data.tensors import label_to_channels, resize_image
from fedmix_engine.errors import InputError
from fedmix_engine.fedmix.metrics import dice, hd95, per_class_metrics
from fedmix_engine.predict import Predictor, probabilities_to_labels
from fedmix_engine.steps import run_steps, shifted


@dataclass
class EvalSet:
    """A labelled store preloaded for repeated evaluation (e.g. every round of a simulation)."""

    name: str
    ids: list[str]
    images: torch.Tensor  # N×C×S×S at the training size
    truths: list[np.ndarray]  # bool K×H×W at the original size
    spacings: list[tuple[float, float] | None] | None = None  # per image, (row, column) mm when imported with one
    classes: tuple[str, ...] = ()  # the store's class names, label order (names ``dice_per_class``)

    @classmethod
    def from_store(cls, path: str | Path, image_size: int, num_classes: int, channels: int) -> EvalSet:
        """The store's fully labelled images, for a model of ``num_classes`` classes and ``channels`` inputs."""
        with SiteStore.open(path, readonly=True) as store:
            _check_fits(store, path, num_classes, channels)
            records = full_truth_records(store)
            if not records:
                raise InputError(path, NO_FULL_TRUTH)
            return cls.from_records(store, records, image_size)

    @classmethod
    def from_records(cls, store: SiteStore, records: Sequence[ImageRecord], image_size: int) -> EvalSet:
        """These fully labelled images of an open store (a part of a site scored a few at a time)."""
        images, truths, spacings = [], [], []
        for rec in records:
            mask = store.read_mask(rec.id)
            if mask is None:  # every class tagged absent: its truth is empty
                mask = np.zeros((rec.height, rec.width), np.uint8)
            images.append(resize_image(store.load_image(rec.id), image_size))
            truths.append(label_to_channels(mask, len(store.config.classes)))
            spacings.append(store.spacing(rec.id))
        return cls(store.root.parent.name, [rec.id for rec in records], torch.stack(images), truths, spacings,
                   tuple(store.config.classes))


NO_FULL_TRUTH = "no image with full ground truth (a mask, or every class tagged absent)"
SCORED_AT_ONCE = 32  # images a site's scoring holds at once: its memory does not grow with the site


def own_model_note(model: str | Path, site: str | Path) -> str | None:
    """A note when ``model`` is the scored site's own (it lives in the site's folder: the site trained it,
    or took part in the federation that did, on these images): such scores flatter the model. Said, not
    refused: how well a model fits its training images is a fair question too."""
    if Path(site).resolve() not in Path(model).resolve().parents:
        return None
    return (f"{site}: the model is this site's own ({Path(model).name} in its folder), trained on these images: "
            "these scores flatter it; for how it does on new cases, score a labelled folder it was not trained on")


def shared_images(held_out: SiteStore, site: SiteStore) -> list[tuple[str, str]]:
    """The held-out images that are also in the site, by pixels: (held-out id, site id). Such a copy (the
    same scans imported into both folders) is scored on a model trained on it, and flatters it."""
    trained = {digest: image_id for image_id, digest in site.pixel_digests().items()}
    return [(image_id, trained[digest]) for image_id, digest in held_out.pixel_digests().items() if digest in trained]


def full_truth_records(store: SiteStore) -> list[ImageRecord]:
    """The images whose ground truth is full: a mask, or every class tagged absent (one class tagged
    absent and another unknown is not: the unknown class's truth would be scored as empty)."""
    classes = set(store.config.classes)
    return [rec for rec in store.records() if rec.has_mask or (set(rec.tags) == classes and not any(rec.tags.values()))]


def left_out_note(site: str | Path, scored: int) -> str | None:
    """How many of a site's images its scores (of ``scored`` images) leave out, when some: scores of 2 images
    of a site of 8 say so, rather than leave their reader to guess why (a box, a tag of a present class or no
    label at all gives no mask to score a prediction against)."""
    with SiteStore.open(site, readonly=True) as store:
        total = len(store)
    if scored >= total:
        return None
    return (f"{total - scored} of its {total} images left out: a box, a tag of a present class or no label "
            "gives no mask to score against")


def _check_fits(store: SiteStore, path: str | Path, num_classes: int, channels: int) -> None:
    if len(store.config.classes) != num_classes:  # label_to_channels would drop or invent classes
        raise InputError(path, f"labelled for {len(store.config.classes)} class(es) "
                               f"({', '.join(store.config.classes)}); the model predicts {num_classes}")
    if store.config.channels != channels:  # found now, not by the network after a round of training
        raise InputError(path, f"holds {store.config.channels}-channel images; the model takes {channels}")


def _predicted_masks(predictor: Predictor, data: EvalSet, threshold: float = 0.5
                     ) -> Iterator[tuple[int, str, np.ndarray, np.ndarray]]:
    """(index, image id, predicted bool K×H×W, truth K×H×W) per image, the prediction at the truth's size:
    the label mask predict writes, one class per pixel (the classes' sigmoid channels may overlap; scored
    channel by channel, a pixel above the threshold for two classes counted for both, and a model of
    several classes was scored on masks nobody gets). Probability > ``threshold`` is compared as a logit
    (0.5: logit > 0); the rule is monotone, so predict's takes logits as they are."""
    cut = math.log(threshold / (1 - threshold))
    z = predictor.logits(data.images)
    classes = np.arange(1, z.shape[1] + 1)[:, None, None]
    for k, (image_id, truth) in enumerate(zip(data.ids, data.truths, strict=True)):
        zk = F.interpolate(z[k:k + 1], size=truth.shape[-2:], mode="bilinear", align_corners=False)[0]
        yield k, image_id, probabilities_to_labels(zk.numpy(), cut) == classes, truth


def evaluate(predictor: Predictor, data: EvalSet) -> dict:
    """Mean per-image Dice (per-class Dice averaged; both empty → 1), the mean over lesion images, and
    each class's mean Dice over the images (``dice_per_class``, class name → Dice in label order: which
    class a model of several learns, which one it misses)."""
    scores, lesion_scores, per_class = [], [], []
    for _, _, pred, truth in _predicted_masks(predictor, data):
        each = [dice(p, t) for p, t in zip(pred, truth, strict=True)]
        per_class.append(each)
        scores.append(float(np.mean(each)))
        if truth.any():
            lesion_scores.append(scores[-1])
    class_means = [float(v) for v in np.mean(per_class, axis=0)] if per_class else []
    names = data.classes or default_class_names(len(class_means))
    return {"dice": float(np.mean(scores)), "dice_lesion_images": float(np.mean(lesion_scores or [np.nan])),
            "images": len(scores), "dice_per_class": dict(zip(names, class_means, strict=True))}


@dataclass(frozen=True)
class ImageScore:
    """One image's metrics for one class (docs/engine.md: the empty-mask conventions)."""

    image: str
    label: str  # the class
    lesion: bool  # the truth holds this class
    dice: float
    iou: float
    hd95: float  # pixels at the image's own size; nan when exactly one of the two masks is empty
    hd95_mm: float = float("nan")  # in mm, for an image with a pixel spacing (else nan, as when undefined)
    spacing: tuple[float, float] | None = None  # the image's (row, column) mm, when it has one


def iter_score_images(predictor: Predictor, data: EvalSet, classes: Sequence[str], threshold: float = 0.5
                      ) -> Generator[tuple[int, int], None, list[ImageScore]]:
    """Dice, IoU and HD95 of every image and class: the detail behind :func:`evaluate`'s mean; HD95 in
    mm too where the image has a pixel spacing (anisotropic spacing measured as such, not scaled after).
    Masks are cut at ``threshold`` (a clinic's chosen operating point; simulate and training use 0.5).
    Yields (images done, images) after each image (HD95's distance transforms take a while on large
    images), so a GUI can show progress and stop; returns the rows."""
    rows = []
    for k, image_id, pred, truth in _predicted_masks(predictor, data, threshold):
        metrics = per_class_metrics(pred, truth)
        spacing = data.spacings[k] if data.spacings else None
        in_mm = [hd95(p, t, spacing) for p, t in zip(pred, truth, strict=True)] if spacing else None
        rows.extend(ImageScore(image_id, name, bool(truth[c].any()), metrics["dice"][c], metrics["iou"][c],
                               metrics["hd95"][c], in_mm[c] if in_mm else float("nan"), spacing)
                    for c, name in enumerate(classes))
        yield k + 1, len(data.ids)
    return rows


def validation_scores(checkpoint: bytes | str | Path, data: EvalSet, device: str = "auto") -> dict:
    """:func:`evaluate`'s figures of a saved pair (file or safetensors bytes) on a labelled store, once a round."""
    return evaluate(Predictor.from_checkpoint(checkpoint, device), data)


def iter_score_site(predictor: Predictor, site: str | Path, threshold: float = 0.5
                    ) -> Generator[tuple[int, int], None, list[ImageScore]]:
    """:func:`iter_score_images` on a site folder's fully labelled images, ``SCORED_AT_ONCE`` at a time
    (a site of any size); a site whose classes are named in another order than the model's is refused
    (its label k would be scored as the model's class k)."""
    config = predictor.model_config
    with SiteStore.open(site, readonly=True) as store:
        classes = tuple(store.config.classes)
        _check_fits(store, site, config.num_classes, config.in_channels)
        if predictor.classes and tuple(predictor.classes) != classes:
            raise InputError(site, f"labels {', '.join(classes)}; the model was trained on "
                                   f"{', '.join(predictor.classes)}, in this label order")
        records = full_truth_records(store)
        if not records:
            raise InputError(site, NO_FULL_TRUTH)
        rows: list[ImageScore] = []
        for start in range(0, len(records), SCORED_AT_ONCE):
            part = EvalSet.from_records(store, records[start:start + SCORED_AT_ONCE], predictor.image_size)
            rows.extend((yield from shifted(iter_score_images(predictor, part, classes, threshold), start,
                                            len(records))))
    return rows


def score_site(predictor: Predictor, site: str | Path,
               progress: Callable[[int, int], None] | None = None, threshold: float = 0.5) -> list[ImageScore]:
    """:func:`iter_score_site` to the end; ``progress(done, total)`` after each image."""
    return run_steps(iter_score_site(predictor, site, threshold), (lambda step: progress(*step)) if progress else None)


@dataclass(frozen=True)
class ClassSummary:
    label: str
    images: int
    lesion_images: int  # images whose truth holds the class
    dice_mean: float
    dice_std: float
    iou_mean: float
    hd95_median: float  # over the images where it is defined (nan if none)
    hd95_undefined: int  # exactly one of prediction and truth empty
    hd95_mm_median: float = float("nan")  # over the images with a pixel spacing where it is defined
    with_spacing: int = 0  # images with a pixel spacing


def summarise(rows: Sequence[ImageScore]) -> list[ClassSummary]:
    """Per class, in the order the rows name them."""
    out = []
    for label in dict.fromkeys(r.label for r in rows):
        mine = [r for r in rows if r.label == label]
        dices, hd = np.array([r.dice for r in mine]), np.array([r.hd95 for r in mine])
        in_mm = np.array([r.hd95_mm for r in mine if not np.isnan(r.hd95_mm)])
        out.append(ClassSummary(label, len(mine), sum(r.lesion for r in mine), float(dices.mean()), float(dices.std()),
                                float(np.mean([r.iou for r in mine])), _median(hd), int(np.isnan(hd).sum()),
                                _median(in_mm), sum(1 for r in mine if r.spacing is not None)))
    return out


def _median(values: np.ndarray) -> float:
    """The median of the defined values (nan if none)."""
    defined = values[~np.isnan(values)]
    return float(np.median(defined)) if defined.size else float("nan")


def mean_image_dice(rows: Sequence[ImageScore]) -> float:
    """The mean over images of each image's class-averaged Dice: :func:`evaluate`'s figure."""
    per_image: dict[str, list[float]] = {}
    for r in rows:
        per_image.setdefault(r.image, []).append(r.dice)
    return float(np.mean([np.mean(scores) for scores in per_image.values()]))


def write_scores(path: str | Path, rows: Sequence[ImageScore], threshold: float = 0.5) -> None:
    """Every image's metrics as CSV (image, class, lesion, dice, iou, hd95_px, hd95_mm, the pixel spacing
    it used, and the threshold the masks were cut at; empty where undefined or unknown), replaced atomically."""

    def number(value: float, digits: int) -> str:
        return "" if np.isnan(value) else f"{value:.{digits}f}"

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "class", "lesion", "dice", "iou", "hd95_px", "hd95_mm", "spacing_row_mm",
                     "spacing_col_mm", "threshold"])
    writer.writerows([r.image, r.label, int(r.lesion), f"{r.dice:.4f}", f"{r.iou:.4f}", number(r.hd95, 2),
                      number(r.hd95_mm, 3), *((f"{v:g}" for v in r.spacing) if r.spacing else ("", "")),
                      f"{threshold:g}"] for r in rows)
    atomic_write_bytes(Path(path), buffer.getvalue().encode())
