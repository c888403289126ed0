"""Federated evaluation: how good each global model is on the sites' own held-out labelled images.

A site that joins with ``--eval DIR`` scores every global model it receives (each round's, and the
final one) on ``DIR``, a site folder of fully labelled images it does not train on, and sends the
server a few numbers: how many images it scored and their mean Dice and IoU per class. Like the
training report, nothing about any single image leaves the site. The server pools the sites'
figures per round, weighting each site by the images it scored, as a pooled test set would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedmix_engine.errors import InputError
from fedmix_engine.json_values import is_int, is_number

MAX_CLASSES = 64
EVALUATION_BYTES = 64 * 1024  # a report is a few hundred bytes; the server reads no more than this


@dataclass(frozen=True)
class ClassScore:
    images: int
    lesion_images: int  # images whose truth holds the class
    dice: float  # mean over the images
    iou: float


@dataclass(frozen=True)
class EvaluationReport:
    """One site's scores of one global model on its held-out images (what the site sends)."""

    images: int
    dice: float  # mean over images of each image's class-averaged Dice (``evaluation.mean_image_dice``)
    classes: dict[str, ClassScore]

    @classmethod
    def from_scores(cls, rows: Sequence[Any]) -> EvaluationReport:
        """From ``evaluation.score_site``'s rows."""
        from fedmix_engine.evaluation import mean_image_dice, summarise

        if not rows:
            raise InputError("evaluation", "no image was scored")
        summary = summarise(rows)
        return cls(summary[0].images, mean_image_dice(rows),
                   {s.label: ClassScore(s.images, s.lesion_images, s.dice_mean, s.iou_mean) for s in summary})

    def class_dice(self) -> dict[str, float]:
        """Each class's mean Dice, by name."""
        return {label: score.dice for label, score in self.classes.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "dice": self.dice,
                "classes": {k: vars(v) for k, v in self.classes.items()}}

    @classmethod
    def from_dict(cls, raw: Any, class_names: Sequence[str] = (), num_classes: int | None = None
                  ) -> EvaluationReport:
        """Validate a decoded report, naming the field at fault; with ``class_names``, its classes must be
        the federation's, with ``num_classes`` as many as the model's."""
        if not isinstance(raw, dict):
            raise InputError("evaluation", "must be a JSON object")
        images = _count(raw.get("images"), "evaluation.images", minimum=1)
        dice = _fraction(raw.get("dice"), "evaluation.dice")
        classes = raw.get("classes")
        if not isinstance(classes, dict) or not classes or len(classes) > MAX_CLASSES:
            raise InputError("evaluation.classes", f"must be an object of 1 to {MAX_CLASSES} classes")
        if num_classes is not None and len(classes) != num_classes:
            raise InputError("evaluation.classes", f"scores {len(classes)} class(es); the federation's model has "
                                                   f"{num_classes}")
        if class_names and list(classes) != list(class_names):
            raise InputError("evaluation.classes", f"names {', '.join(map(str, classes))}; the federation's classes "
                                                   f"are {', '.join(class_names)}")
        scores = {}
        for label, score in classes.items():
            where = f"evaluation.classes.{label}"
            if not isinstance(score, dict):
                raise InputError(where, "must be an object")
            counted = _count(score.get("images"), f"{where}.images", minimum=1)
            lesion = _count(score.get("lesion_images"), f"{where}.lesion_images", minimum=0)
            if counted != images or lesion > counted:
                raise InputError(where, f"counts {counted} images ({lesion} with the class); the report "
                                        f"scored {images}")
            scores[label] = ClassScore(counted, lesion, _fraction(score.get("dice"), f"{where}.dice"),
                                       _fraction(score.get("iou"), f"{where}.iou"))
        return cls(images, dice, scores)


def pooled(reports: Mapping[str, EvaluationReport]) -> dict[str, Any]:
    """The sites' figures as one held-out set: images, Dice and per-class Dice, each site weighted by
    the images it scored (a site's mean counts as its images' sum). Classes are pooled by label index, as
    the model sees them (a federation without class names checks only their count), and named as the
    first report names them."""
    images = sum(r.images for r in reports.values())
    if not images:
        return {"images": 0, "dice": None, "classes": {}}
    labels = list(next(iter(reports.values())).classes)
    scores = [list(r.classes.values()) for r in reports.values()]
    return {"images": images, "dice": sum(r.dice * r.images for r in reports.values()) / images,
            "classes": {label: sum(site[k].dice * r.images for site, r in zip(scores, reports.values(),
                                                                              strict=True)) / images
                        for k, label in enumerate(labels)}}


def _count(value: Any, where: str, minimum: int) -> int:
    if not is_int(value) or value < minimum:
        raise InputError(where, f"must be an integer ≥ {minimum}, not {value!r}")
    return value


def _fraction(value: Any, where: str) -> float:
    if not is_number(value) or not 0.0 <= value <= 1.0:
        raise InputError(where, f"must be a number from 0 to 1, not {value!r}")
    return float(value)
