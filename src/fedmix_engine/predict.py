"""Model + image(s) → probability map and mask; batch over folders (evaluation: ``evaluation.py``).

Inference uses network 1 of the global pair by default (``inference="net1"``, as in the paper) or
the mean of both networks' probabilities (``"mean"``); ``benchmarks/quality.py`` measures which is
better and docs/benchmarks.md reports it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property, partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

from fedmix_engine import __version__
from fedmix_engine.atomic import atomic_write_bytes, make_folder, refuse_file_in_the_way, remove_interrupted_writes
from fedmix_engine.checkpoint import checkpoint_bytes, pair_from_bytes
from fedmix_engine.data.dicom import dicom_frames
from fedmix_engine.data.dicom_seg import default_class_names, write_dicom_seg
from fedmix_engine.data.imageio import (
    PREDICTABLE_SUFFIXES,
    exif_orientation,
    holds_colour,
    image_stem,
    is_dicom_file,
    is_predictable_path,
    no_images_reason,
    normalise_image,
    read_frames,
    tiff_bytes,
    tiff_pages,
    tiff_stack,
    validate_image,
    visible_files,
)
from fedmix_engine.data.importer import masks_beside_images
from fedmix_engine.data.pixel_spacing import file_spacing, tiff_spacing
from fedmix_engine.data.site_store import check_class_names, refuse_site_folder
from fedmix_engine.data.tensors import resize_image
from fedmix_engine.data.video import is_video_path, open_video
from fedmix_engine.device import DevicePlan, autocast, forward_in_batches, plan_device, to_device
from fedmix_engine.errors import InputError, first_names
from fedmix_engine.fedmix.pair import PairState, build_pair
from fedmix_engine.folder_lock import hold_folder
from fedmix_engine.json_values import parse_json
from fedmix_engine.model import ModelConfig
from fedmix_engine.steps import run_steps

INFERENCE = ("net1", "mean")


@dataclass(frozen=True)
class ModelSource:
    """Where a predictor's weights came from, so a mask can be traced to the exact model that drew it."""

    name: str  # the checkpoint's path, or what it was (a global model just downloaded)
    sha256: str  # of the checkpoint's bytes


class Predictor:
    """Probabilities from the global pair for images of any size (resized to the training size and back)."""

    def __init__(self, pair: PairState, model_config: ModelConfig, image_size: int, plan: DevicePlan | None = None,
                 inference: str = "net1", batch_size: int | None = None, classes: Sequence[str] | None = None,
                 trained_round: int | None = None, source: ModelSource | None = None):
        if inference not in INFERENCE:
            raise InputError("inference", f"'{inference}' is not one of {', '.join(INFERENCE)}")
        self.classes = tuple(classes) if classes else None  # the label names, when the checkpoint has them
        self.trained_round = trained_round  # the round the checkpoint holds, when it says
        self.source = source  # the checkpoint's file and digest, when made from one
        self.plan = plan or plan_device("auto")
        self.model_config = model_config
        self.image_size = image_size
        self.inference = inference
        self.batch_size = batch_size or self.plan.pl_batch_size
        self.net1, self.net2 = build_pair(model_config, pair, self.plan.device)
        self.net1.eval()
        self.net2.eval()

    @classmethod
    def from_checkpoint(cls, source: str | Path | bytes, device: str = "auto",
                        inference: str | None = None) -> Predictor:
        """From a checkpoint file, or its bytes (e.g. a global model just downloaded)."""
        if isinstance(source, bytes):
            data, where, name = source, "checkpoint", "checkpoint (received, not a file)"
        else:
            data, where, name = checkpoint_bytes(source), source, str(Path(source).resolve())
        pair, model_config, meta = pair_from_bytes(data, where)
        return cls.from_pair(pair, model_config, meta, plan_device(device), inference,
                             ModelSource(name, hashlib.sha256(data).hexdigest()))

    @classmethod
    def from_pair(cls, pair: PairState, model_config: ModelConfig, meta: dict[str, Any], plan: DevicePlan,
                  inference: str | None = None, source: ModelSource | None = None) -> Predictor:
        """From a checkpoint already decoded (``pair_from_bytes``): its metadata gives the training size,
        the inference, the class names and the round."""
        return cls(pair, model_config, int(meta.get("image_size", 128)), plan,
                   inference or meta.get("inference", "net1"), classes=meta.get("classes"),
                   trained_round=meta.get("round"), source=source)

    def sees_in_grey(self, image: np.ndarray) -> bool:
        """Whether this model, trained on grey images, sees only the luma of ``image``, a colour one
        (``holds_colour``): what its colour shows (Doppler flow) plays no part in the prediction, which its user
        should be told. False for an array that is no image, which prediction refuses by name."""
        if self.model_config.in_channels != 1:
            return False
        try:
            return holds_colour(validate_image(np.asarray(image), "image"))
        except InputError:
            return False

    def class_names(self) -> list[str]:
        """The label names: the checkpoint's (one per output, as loading checks), else FedMix's defaults."""
        return list(self.classes or default_class_names(self.model_config.num_classes))

    def describe(self) -> str:
        """What a user should know of the model predicting: its round, classes, training size and device."""
        parts = [f"round {self.trained_round}"] if self.trained_round is not None else []
        classes = ", ".join(self.classes) if self.classes else f"{self.model_config.num_classes} class(es)"
        device = f"on {self.plan.device}" + (f" ({self.plan.note})" if self.plan.gpu_not_used else "")
        return ", ".join([*parts, classes, f"trained at {self.image_size} px", device])

    def provenance(self) -> dict[str, Any]:
        """The model as a prediction's record names it: checkpoint and digest, round, classes, settings."""
        return {"checkpoint": self.source.name if self.source else None,
                "sha256": self.source.sha256 if self.source else None,
                "round": self.trained_round, "classes": list(self.classes) if self.classes else None,
                "trained_at_px": self.image_size, "inference": self.inference, "device": str(self.plan.device),
                "model": parse_json(self.model_config.to_json())}

    @torch.no_grad()
    def logits(self, images: torch.Tensor, network: str | None = None) -> torch.Tensor:
        """Logits for ``N×C×S×S`` images at the training size (CPU tensor out): of the predictor's
        ``inference`` (network 1, or the mean of both), or of one ``network`` ("net1", "net2")."""
        def step(items: slice) -> torch.Tensor:
            batch = to_device(images[items], self.plan)
            with autocast(self.plan):
                if network == "net2":
                    return self.net2(batch).float().cpu()
                z1 = self.net1(batch).float()
                if self.inference == "mean" and network is None:
                    p = (torch.sigmoid(z1) + torch.sigmoid(self.net2(batch).float())) / 2
                    z1 = torch.logit(p.clamp(1e-6, 1 - 1e-6))
            return z1.cpu()

        out, self.batch_size = forward_in_batches(step, len(images), self.batch_size, self.plan)
        return torch.cat(out) if out else torch.zeros((0, self.model_config.num_classes, 1, 1))

    def probabilities(self, image: np.ndarray, where: str | Path = "image") -> np.ndarray:
        """float32 ``K×H×W`` class probabilities for one 2-D image (H×W, H×W×3 or H×W×4).

        The array is validated here (a napari layer may hold a stack or NaNs); ``where`` names it."""
        image = validate_image(image, where)
        return run_steps(self.iter_stack_probabilities(image[None], image.ndim == 3, where))[:, 0]  # one frame

    def iter_stack_probabilities(self, stack: np.ndarray, rgb: bool,
                                 where: str | Path = "stack") -> Generator[tuple[int, int], None, np.ndarray]:
        """Probabilities for every 2-D frame of a stack (a cine loop, a volume's slices, a time series),
        one batch of frames at a time: yields (frames done, frames), returns float32 ``K×…×H×W`` with
        the stack's leading axes. ``rgb``: the last axis holds colour channels (napari's ``rgb``).

        Each frame is validated and normalised on its own, as the same frame exported as a 2-D image
        would be; a bad frame is refused by its index. Stopping between yields (a GUI's Stop) costs
        at most one batch."""
        return (yield from self._iter_stack(stack, rgb, where, self._chunk_probabilities))

    def disagreement(self, image: np.ndarray, where: str | Path = "image") -> np.ndarray:
        """float32 ``K×H×W``: how far the pair's two networks disagree, ``|p¹ − p²|`` per class, for one 2-D
        image (validated as in :meth:`probabilities`)."""
        image = validate_image(image, where)
        return run_steps(self.iter_stack_disagreement(image[None], image.ndim == 3, where))[:, 0]

    def iter_stack_disagreement(self, stack: np.ndarray, rgb: bool,
                                where: str | Path = "stack") -> Generator[tuple[int, int], None, np.ndarray]:
        """``|p¹ − p²|`` per class for every frame of a stack, as :meth:`iter_stack_probabilities` steps
        through it: per pixel, what FedMix's agreement rule measures when it selects pseudo-labels. As a
        map of the errors it does no better than the probability's closeness to the threshold on the
        synthetic benchmark (``benchmarks/disagreement.py``)."""
        return (yield from self._iter_stack(stack, rgb, where, self._chunk_disagreement))

    def _iter_stack(self, stack: np.ndarray, rgb: bool, where: str | Path,
                    chunk: Callable[..., np.ndarray]) -> Generator[tuple[int, int], None, np.ndarray]:
        """``chunk``'s float32 ``K×B×H×W`` maps of a stack's frames, a batch at a time, as ``K×…×H×W``."""
        frames, leading = stack_frames(stack, rgb, where)
        height, width = frames.shape[1:3]
        out = np.empty((self.model_config.num_classes, len(frames), height, width), np.float32)
        name = partial(_frame_index, leading=leading)
        for start in range(0, len(frames), self.batch_size):
            stop = min(start + self.batch_size, len(frames))
            out[:, start:stop] = chunk(np.asarray(frames[start:stop]), start, where, name)  # a lazy stack: read now
            yield stop, len(frames)
        return out.reshape((out.shape[0], *leading, height, width))

    def iter_label_chunks(self, frames: Iterable[np.ndarray], threshold: float = 0.5, where: str | Path = "stack",
                          frame_name: Callable[[int], str] = str) -> Iterator[np.ndarray]:
        """Label masks (uint8 ``B×H×W``) of a stream of 2-D frames of one size, ``batch_size`` frames at a
        time, taking frames from ``frames`` only as they are needed: a video is never held whole. Each
        frame is validated and normalised as in :meth:`iter_stack_probabilities`; ``frame_name(i)``
        names frame *i* in a refusal."""
        chunk: list[np.ndarray] = []
        start = 0
        for frame in frames:
            chunk.append(frame)
            if len(chunk) == self.batch_size:
                yield probabilities_to_labels(self._chunk_probabilities(chunk, start, where, frame_name), threshold)
                start, chunk = start + len(chunk), []
        if chunk:
            yield probabilities_to_labels(self._chunk_probabilities(chunk, start, where, frame_name), threshold)

    def _chunk_inputs(self, frames: Sequence[np.ndarray], start: int, where: str | Path,
                      frame_name: Callable[[int], str]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Consecutive frames ``start``, ``start + 1``, … of one size, validated and normalised, at the
        training size; and their own size."""
        normalised = [normalise_image(validate_image(frame, f"{where}, frame {frame_name(start + k)}"),
                                      self.model_config.in_channels) for k, frame in enumerate(frames)]
        return torch.stack([resize_image(n, self.image_size) for n in normalised]), normalised[0].shape[-2:]

    def _probabilities_at(self, inputs: torch.Tensor, size: tuple[int, int], network: str | None = None
                          ) -> np.ndarray:
        """float32 ``K×B×H×W`` probabilities at the frames' ``size`` (of the inference, or of one ``network``)."""
        z = F.interpolate(self.logits(inputs, network), size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(z).numpy().transpose(1, 0, 2, 3)

    def _chunk_probabilities(self, frames: Sequence[np.ndarray], start: int, where: str | Path,
                             frame_name: Callable[[int], str]) -> np.ndarray:
        return self._probabilities_at(*self._chunk_inputs(frames, start, where, frame_name))

    def _chunk_disagreement(self, frames: Sequence[np.ndarray], start: int, where: str | Path,
                            frame_name: Callable[[int], str]) -> np.ndarray:
        inputs, size = self._chunk_inputs(frames, start, where, frame_name)
        return np.abs(self._probabilities_at(inputs, size, "net1") - self._probabilities_at(inputs, size, "net2"))

    def mask(self, image: np.ndarray, threshold: float = 0.5, where: str | Path = "image") -> np.ndarray:
        """uint8 label image (0 = background; overlapping classes: the most probable wins)."""
        return probabilities_to_labels(self.probabilities(image, where), threshold)


def stack_frames(stack: np.ndarray, rgb: bool, where: str | Path = "stack") -> tuple[np.ndarray, tuple[int, ...]]:
    """A stack as ``F×H×W`` (or ``F×H×W×C`` if ``rgb``) frames, and the leading axes they came from. A
    lazy array (dask: a video napari decodes frame by frame) stays lazy; frames are read when sliced."""
    if not (hasattr(stack, "shape") and hasattr(stack, "reshape")):
        stack = np.asarray(stack)
    image_axes = 3 if rgb else 2
    if stack.ndim <= image_axes:
        raise InputError(where, f"not a stack of 2-D frames (shape {tuple(stack.shape)})")
    leading = tuple(stack.shape[:-image_axes])
    if 0 in leading:
        raise InputError(where, f"empty stack (shape {tuple(stack.shape)})")
    return stack.reshape((-1, *stack.shape[-image_axes:])), leading


def _frame_index(flat: int, leading: tuple[int, ...]) -> str:
    """A frame's position as napari's sliders show it: ``12`` in a loop, ``(3, 12)`` in a 4-D stack."""
    index = np.unravel_index(flat, leading)
    return str(int(index[0])) if len(index) == 1 else str(tuple(int(i) for i in index))


def probabilities_to_labels(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint8 label mask of ``K×…`` per-class scores: 0 where no class is above ``threshold``, else the
    most probable class (1..K; a tie: the first). Scores may be logits with the threshold as a logit."""
    fg = prob > threshold
    labels = (np.argmax(prob, axis=0) + 1).astype(np.uint8)
    labels[~fg.any(axis=0)] = 0
    return labels


@dataclass(frozen=True)
class FrameStep:
    """A batch predicting a stack (a cine loop, a multi-page TIFF, a video) has done ``done`` of its
    ``frames`` (0: unknown, a video whose container does not state its count)."""

    file: Path
    done: int
    frames: int


@dataclass(frozen=True)
class BatchRow:
    file: str
    height: int
    width: int
    foreground_fraction: float
    status: str
    mask_file: str = ""  # the mask written for ``file`` ("" when none was)
    frames: int = 0  # 1 for a 2-D image, the frame count of a stack (0 when not predicted)
    seg_file: str = ""  # the DICOM SEG written beside the mask, or "not written: <reason>"; "" when not asked
    spacing: tuple[float, float] | None = None  # the image's pixel spacing (row, column mm), when it states one
    class_fractions: tuple[float, ...] = ()  # each class's share of the pixels (label k = class k), when predicted
    exif_orientation: int | None = None  # a photo's EXIF orientation (2–8) when photo viewers show it turned
    colour_as_grey: bool = False  # a colour image (holds_colour; a stack's first frame) a grey model saw by its luma

    @property
    def foreground_mm2(self) -> float:
        """The foreground's area in mm² (a stack's: per frame, averaged); nan without a pixel spacing."""
        return self._mm2(self.foreground_fraction)

    @property
    def class_mm2(self) -> tuple[float, ...]:
        """Each class's area in mm², as ``foreground_mm2``: what a two-class report needs per class."""
        return tuple(self._mm2(share) for share in self.class_fractions)

    def _mm2(self, fraction: float) -> float:
        if self.spacing is None or not self.frames:
            return float("nan")
        return round(fraction * self.height * self.width * self.spacing[0] * self.spacing[1], 4)

    @property
    def spacing_row_mm(self) -> float | None:
        return self.spacing[0] if self.spacing else None

    @property
    def spacing_col_mm(self) -> float | None:
        return self.spacing[1] if self.spacing else None

    @property
    def failed(self) -> bool:
        """An image that could not be predicted (unreadable, a bad frame); not a file that is no image to
        predict (a report, a PACS export's DICOMDIR, a dataset's own mask beside its image)."""
        return self.status != "ok" and not self.status.startswith((NOT_AN_IMAGE, MASK_BESIDE))


RECORD_FILE = "prediction.json"  # which model, settings and input made a folder's masks, and when
SUMMARY_FILE = "summary.csv"  # a row per input file: its mask, size, foreground and status
SUMMARY_COLUMNS = ("file", "mask_file", "frames", "height", "width", "foreground_fraction", "foreground_mm2",
                   "spacing_row_mm", "spacing_col_mm", "status", "seg_file", "exif_orientation",
                   "colour_as_grey")
NOT_RUN = "not run: the batch was stopped before this file"
SUMMARY_EVERY = 10.0  # seconds between rewrites of a running batch's summary.csv (each rewrite is O(files))
NOT_AN_IMAGE = "skipped: not an image"
MASK_BESIDE = "skipped: a mask beside its image, not an image"


MASK_SUFFIX, SEG_SUFFIX = "_mask.tif", "_seg.dcm"  # a batch's outputs: <stem>_mask.tif, and its DICOM SEG
WHOLE_IMAGE = 0.99  # a mask covering this share of its image or more: a lesion rarely does


def batch_notes(rows: Sequence[BatchRow], unread: Sequence[str] = (), earlier: Sequence[str] = ()) -> list[str]:
    """What a finished batch should tell its user although it succeeded: sub-folders of images it did not
    read (``unread``: :func:`unread_subfolders`), masks in its folder that are not its own (``earlier``:
    :func:`earlier_masks`), masks covering whole images, photos that photo viewers show turned, and colour
    images a grey model saw in grey (each a sentence, none when there is nothing to say)."""
    predicted = [r for r in rows if r.status == "ok"]
    notes = (_unread_note(unread), _earlier_note(earlier), _whole_image_note(predicted),
             _turned_photos_note(predicted), _colour_as_grey_note(predicted))
    return [note for note in notes if note]


def earlier_masks(out: str | Path, rows: Sequence[BatchRow]) -> list[str]:
    """The masks and DICOM SEGs in a batch's folder ``out`` that the batch (``rows``) neither wrote nor kept,
    as paths below it: an earlier batch's, for images this one did not predict (another input folder, a file
    now skipped). The folder holds them beside this batch's masks while its summary.csv lists only this
    batch's, so whoever collects the folder's masks would take them for this batch's."""
    out = Path(out)
    ours = {name for r in rows if r.status == "ok" for name in (r.mask_file, r.seg_file) if name}
    found = []
    for root, folders, files in os.walk(out):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        found += [name for f in sorted(files) if f.endswith((MASK_SUFFIX, SEG_SUFFIX)) and not f.startswith(".")
                  and (name := (Path(root) / f).relative_to(out).as_posix()) not in ours]
    return found


def _earlier_note(earlier: Sequence[str]) -> str:
    if not earlier:
        return ""
    return (f"{len(earlier)} mask file(s) in the output folder are not this batch's ({first_names(list(earlier))}): "
            "an earlier batch wrote them, for images this one did not predict, and summary.csv lists this batch's "
            "only; move them away, or predict into an empty folder, for a folder of this batch's masks alone")


def unread_subfolders(source: str | Path, out: str | Path | None = None) -> list[str]:
    """The sub-folders of a folder that hold images or videos (at any depth) which a batch without ``recursive``
    does not read, or []. A folder with images at its top and a series or two in sub-folders was predicted in
    part, and nothing said so (only a folder with none at its top was refused, naming --recursive). The
    output folder, an earlier batch's output and hidden folders are left out, as ``batch_files`` leaves them."""
    source = Path(source)
    if not source.is_dir():
        return []
    skip = Path(out).resolve() if out is not None else None

    def holds_images(top: Path) -> bool:
        for root, folders, files in os.walk(top):
            folders[:] = [f for f in folders if _read_below(Path(root) / f, skip)]
            if any(not f.startswith(".") and is_predictable_path(Path(root) / f) for f in files):
                return True
        return False

    return [d.name for d in sorted(source.iterdir()) if d.is_dir() and _read_below(d, skip) and holds_images(d)]


def _unread_note(unread: Sequence[str]) -> str:
    if not unread:
        return ""
    return (f"{len(unread)} sub-folder(s) hold images this batch did not read ({first_names(list(unread))}): "
            "--recursive (in napari: include sub-folders) predicts them too")


def _whole_image_note(predicted: Sequence[BatchRow]) -> str:
    """A note when predicted masks cover (nearly) their whole image, or "". A lesion rarely fills its image, so
    such masks most likely come from a model that has not learnt the lesions yet (a federation's first rounds),
    images unlike those it trained on, or a threshold too low; the batch still succeeded, so a clinician would
    not otherwise be told."""
    whole = [r.file for r in predicted if r.foreground_fraction >= WHOLE_IMAGE]
    if not whole:
        return ""
    return (f"{len(whole)} of {len(predicted)} mask(s) cover {WHOLE_IMAGE:.0%} or more of their image "
            f"({first_names(whole)}), which a lesion rarely does: the model may not have learnt the lesions yet "
            "(too few rounds), the images may be unlike those it trained on, or the threshold too low")


def _turned_photos_note(predicted: Sequence[BatchRow]) -> str:
    """A note when predicted photos have an EXIF orientation, or "". Their masks fit the pixels as stored, as
    napari shows them (and as the site's images were imported); a photo viewer turns or mirrors such a photo
    but not its mask TIFF, so the two would not line up there (silently so on a square photo)."""
    turned = [r.file for r in predicted if r.exif_orientation is not None]
    if not turned:
        return ""
    return (f"{len(turned)} of {len(predicted)} image(s) are photos with an EXIF orientation "
            f"({first_names(turned)}): their masks fit the pixels as stored, as napari shows them, but photo "
            "viewers show these photos turned or mirrored, where a mask laid over them will not fit (summary.csv's "
            "exif_orientation column names them all)")


def _colour_as_grey_note(predicted: Sequence[BatchRow]) -> str:
    """A note when a grey model predicted colour images, or "". It sees their luma only, as it was trained on
    grey images, so what their colour shows (a Doppler image's flow, a stain) played no part in their masks; a
    model trained on colour images (a site made for colour) would use it. Grey saved as RGB is not noted."""
    colour = [r.file for r in predicted if r.colour_as_grey]
    if not colour:
        return ""
    return (f"{len(colour)} of {len(predicted)} image(s) are in colour ({first_names(colour)}) and the model "
            "is grey: it saw only their brightness (luma), so what their colour shows, such as Doppler flow, "
            "played no part in their masks (summary.csv's colour_as_grey column names them all)")


def _seg_name(mask_file: str) -> str:
    """The DICOM SEG written beside a mask: ``<name>_seg.dcm`` for ``<name>_mask.tif``."""
    return mask_file.removesuffix(MASK_SUFFIX) + SEG_SUFFIX


def mask_names(files: list[Path]) -> dict[Path, str]:
    """The output name of each input: ``<stem>_mask.tif``, or ``<stem>_<suffix>_mask.tif`` for inputs
    sharing a stem (``scan.png`` and ``scan.tif`` must not overwrite each other's mask).

    Stems are compared case-insensitively: ``Scan.tif`` and ``scan.png`` collide on macOS and Windows."""
    stems = {path: image_stem(path) for path in files}
    shared = Counter(stem.lower() for stem in stems.values())
    return {path: f"{stem}_{path.suffix.lstrip('.').lower()}{MASK_SUFFIX}" if shared[stem.lower()] > 1
            else f"{stem}{MASK_SUFFIX}" for path, stem in stems.items()}


def _read_below(folder: Path, out: Path | None) -> bool:
    """Whether a recursive batch reads a sub-folder: not a hidden one, not its output folder (``out``,
    resolved) and not an earlier batch's (it holds a ``prediction.json``), whose masks are no images."""
    return not folder.name.startswith(".") and folder.resolve() != out and not (folder / RECORD_FILE).is_file()


def batch_files(source: Path, recursive: bool = False, out: Path | None = None) -> list[Path]:
    """The files a batch goes through: the one file given, the files at the top of a folder, or with
    ``recursive`` every file below it (a PACS export's patient/study/series folders), folder by folder in
    name order. Left out: hidden files and folders, the output folder when it lies inside, and any earlier
    batch's output folder (it holds a ``prediction.json``), whose masks are not images to predict."""
    return list(_iter_batch_files(source, recursive, out))


def _iter_batch_files(source: Path, recursive: bool, out: Path | None) -> Iterator[Path]:
    """``batch_files`` one folder at a time: a check that needs one image stops at it, instead of listing a
    whole PACS export (and sniffing every file without a suffix for DICOM) on a network share first."""
    if source.is_file():
        yield source
    elif not recursive:
        yield from visible_files(source)
    else:
        skip = out.resolve() if out is not None else None
        for root, folders, files in os.walk(source):
            folders[:] = sorted(f for f in folders if _read_below(Path(root) / f, skip))
            yield from (Path(root) / f for f in sorted(files) if not f.startswith("."))


def check_batch(source: str | Path, threshold: float = 0.5, out: str | Path | None = None,
                recursive: bool = False) -> None:
    """Refuse a batch whose input (a folder of images, or one image, stack or video file), output folder
    or threshold is wrong, before any work (a GUI calls it before starting its worker)."""
    source = Path(source)
    if source.is_file():
        if not is_predictable_path(source):
            raise InputError(source, f"not an image or a video ({source.suffix or 'no suffix'}); give an image "
                                     "or video file, or a folder of them")
    elif not source.is_dir():
        raise InputError(source, "input folder or file not found")
    elif not any(is_predictable_path(p) for p in _iter_batch_files(source, recursive, Path(out) if out else None)):
        if recursive:
            raise InputError(source, f"no image or video files ({', '.join(PREDICTABLE_SUFFIXES)}) in this folder "
                                     "or its sub-folders")
        nested = any(p.is_dir() and not p.name.startswith(".") for p in source.iterdir())
        raise InputError(source, no_images_reason(source)
                         + (", or include them (--recursive; in napari: include sub-folders)" if nested else ""))
    images_folder = source.parent if source.is_file() else source
    if out is not None:
        refuse_site_folder(out, "the masks")
        refuse_file_in_the_way(out)
    if out is not None and Path(out).resolve() == images_folder.resolve():
        # datasets such as BUSI keep "<name>_mask.png" beside "<name>.png": a prediction would replace it
        raise InputError(out, "is the images folder; write the masks to another folder (a predicted "
                              "<name>_mask.tif could replace a file of the same name among the images)")
    check_threshold(threshold)


def check_threshold(threshold: float) -> None:
    """A probability threshold in (0, 1): 0 or 1 would make every pixel, or none, foreground."""
    if not 0 < threshold < 1:
        raise InputError("threshold", f"a probability threshold must be in (0, 1), not {threshold}")


BATCH_LOCK = "batch.lock"  # Windows: a running batch's lock file in its output folder (POSIX: flock on the folder)
_ANOTHER_BATCH = ("another batch is writing masks into this folder (a terminal's predict, or napari's Batch "
                  "predict); wait for it to end, or give this one another output folder")


class FolderBatch:
    """Every image of a folder (or one file) predicted into ``out``; iterate for (done, total, row) per file and, with
    ``frame_steps``, a :class:`FrameStep` per batch of a stack's frames, so a GUI shows a long cine
    loop's progress and its Cancel stops within the loop (the file is then listed as not run).

    Made eagerly: the checks, the output folder and a ``summary.csv`` listing every file as not run
    happen when the batch is created, so a batch closed before its first image (a GUI's Cancel) still
    leaves a summary of this run, never an earlier one's. The summary is rewritten every
    ``SUMMARY_EVERY`` seconds while the run goes on (a killed run's is at most that old) and as it ends,
    also early (``close()``, an error or Ctrl-C). Unreadable or odd files are skipped with their
    reason in the row; the run never stops on them. Output names: ``mask_names``; with ``recursive``
    the files of sub-folders too (``batch_files``), each mask in the same sub-folder of ``out``.

    ``resume``: continue the stopped batch in ``out`` (the same model, by digest, and settings): a file
    whose mask it wrote is kept, not predicted again (``kept`` counts them).

    ``dicom_seg``: also write each DICOM image's mask as a DICOM SEG, ``<name>_seg.dcm``, with the
    segments named ``classes`` (default: the checkpoint's class names, which simulations and local
    training store; else ``lesion``, or ``class k``), for the PACS and DICOM viewers."""

    def __init__(self, predictor: Predictor, folder: str | Path, out: str | Path, threshold: float = 0.5,
                 dicom_seg: bool = False, classes: Sequence[str] | None = None,
                 frame_steps: bool = False, recursive: bool = False, resume: bool = False) -> None:
        folder, self.out = Path(folder), Path(out)
        check_batch(folder, threshold, self.out, recursive)
        count = predictor.model_config.num_classes
        self.classes = list(classes or predictor.class_names())
        if len(self.classes) != count:
            raise InputError("classes", f"{len(self.classes)} name(s) ({', '.join(self.classes)}) for a model of "
                                        f"{count} class(es)")
        if classes:  # they name summary.csv's columns and the SEG's segments, as a site names its classes
            check_class_names(self.classes, "classes")
        self.dicom_seg = dicom_seg
        self.frame_steps = frame_steps
        # a colour model sees colour: then no image is read again to tell it
        self._sees_in_grey = predictor.sees_in_grey if predictor.model_config.in_channels == 1 else None
        self._record = {"fedmix_engine": __version__, "input": str(folder.resolve()), "recursive": recursive,
                        "threshold": threshold, "dicom_seg": dicom_seg, "model": predictor.provenance(),
                        "started": _now(), "finished": None, "files": {"total": 0}}
        # continuing: the stopped batch's start, after which its masks were written (kept: masks written since)
        self._since = _resumed_start(self.out, self._record) if resume else None
        if self._since is not None:
            self._record["continued"] = self._record["started"]
            self._record["started"] = self._since
        self.kept = 0  # files whose mask the stopped batch had written, not predicted again
        make_folder(self.out)
        # one batch per output folder: a second (a terminal's and napari's) would delete the first's
        # half-written masks as a killed batch's leftovers, and both would write summary.csv
        self._unlock = weakref.finalize(self, hold_folder(self.out, _ANOTHER_BATCH, BATCH_LOCK))
        try:
            remove_interrupted_writes(self.out)  # a killed batch's half-written mask, never renamed into place
            self.files = batch_files(folder, recursive, self.out)
            self.root = folder.parent if folder.is_file() else folder  # rows and masks are named relative to it
            self.total = self._record["files"]["total"] = len(self.files)
            self._refuse_replacing_others()
            self._write_summary([])
            atomic_write_bytes(self.out / RECORD_FILE, _json_bytes(self._record))
        except BaseException:
            self._unlock()
            raise
        self._run = self._rows(predictor, threshold)

    def __iter__(self) -> FolderBatch:
        return self

    def __next__(self) -> tuple[int, int, BatchRow] | FrameStep:
        return next(self._run)

    def close(self) -> None:
        self._run.close()
        self._unlock()  # also for a batch closed before its first image, whose _rows never ran

    def _name(self, path: Path) -> str:
        """A file as the summary names it: its path below the batch's folder (its name, at the top)."""
        return path.relative_to(self.root).as_posix()

    def _refuse_replacing_others(self) -> None:
        """A folder no batch wrote (no ``RECORD_FILE``) keeps its files: chosen by mistake, the folder of the
        hand-drawn masks (``scan_mask.tif``) had them replaced by predictions. An earlier batch's folder is
        predicted into again, its masks replaced, as a second run is asked to."""
        if (self.out / RECORD_FILE).exists() or not any(
                name != BATCH_LOCK for _, _, files in os.walk(self.out) for name in files):
            return  # an earlier batch's folder, or a new one (nothing but this batch's lock): no file to ask after
        masks = self._mask_files[0].values()
        ours = [*masks, *(map(_seg_name, masks) if self.dicom_seg else ()), SUMMARY_FILE]
        if clashes := sorted(name for name in ours if (self.out / name).exists()):
            shown = ", ".join(clashes[:3]) + (f" and {len(clashes) - 3} more" if len(clashes) > 3 else "")
            raise InputError(self.out, f"holds files this batch would replace ({shown}) and was not written by an "
                                       f"earlier batch (no {RECORD_FILE}): choose another output folder")

    @cached_property
    def _mask_files(self) -> tuple[dict[Path, str], set[Path]]:
        """Each image's mask file, in the output's copy of the image's sub-folder, and the files that are
        a dataset's own masks beside their images (BUSI), which are not images to predict; both decided
        folder by folder, as a file's name only clashes with, or belongs to, its neighbours'. Once: a DICOM
        file without a suffix is told by reading it (on a share, a round trip each)."""
        by_folder: dict[Path, list[Path]] = defaultdict(list)
        for path in self.files:
            if is_predictable_path(path):
                by_folder[path.parent].append(path)
        names: dict[Path, str] = {}
        beside: set[Path] = set()
        for folder, images in by_folder.items():
            beside.update(masks_beside_images(images))
            below = folder.relative_to(self.root)
            names.update({path: (below / name).as_posix()
                          for path, name in mask_names([p for p in images if p not in beside]).items()})
        return names, beside

    def _rows(self, predictor: Predictor, threshold: float) -> Iterator[tuple[int, int, BatchRow] | FrameStep]:
        names, beside = self._mask_files
        rows: list[BatchRow] = []
        written = time.monotonic()
        try:
            for done, path in enumerate(self.files, start=1):
                if path in beside:
                    row = BatchRow(self._name(path), 0, 0, float("nan"), MASK_BESIDE)
                elif path not in names:
                    row = BatchRow(self._name(path), 0, 0, float("nan"),
                                   f"{NOT_AN_IMAGE} ({path.suffix or 'no suffix'})")
                elif (kept := self._kept_row(path, names[path])) is not None:
                    row = kept
                    self.kept += 1
                else:
                    try:
                        steps = self._predict_file(predictor, path, names[path], threshold)
                        row = (yield from steps) if self.frame_steps else run_steps(steps)
                    except InputError as exc:  # the reason, and which frame of a stack when it is one frame's
                        frame = str(exc.where).removeprefix(str(path)).removeprefix(", ")
                        row = BatchRow(self._name(path), 0, 0, float("nan"),
                                       f"skipped: {frame + ': ' if frame else ''}{exc.reason}")
                rows.append(row)
                if time.monotonic() - written > SUMMARY_EVERY:  # a killed batch's summary is at most this old
                    self._write_summary(rows)
                    written = time.monotonic()
                yield done, self.total, row
        finally:
            try:
                not_run = self._write_summary(rows)
                self._record["finished"] = _now()
                self._record["files"] = {"total": self.total,
                                         **Counter(r.status.split(":")[0] for r in rows + not_run),
                                         **({"kept": self.kept} if self._since is not None else {})}  # "ok" ones
                atomic_write_bytes(self.out / RECORD_FILE, _json_bytes(self._record))
            finally:
                self._unlock()

    def _write_summary(self, rows: list[BatchRow]) -> list[BatchRow]:
        """``summary.csv`` with the rows done and the other files as not run; returns the not-run rows."""
        not_run = [BatchRow(self._name(p), 0, 0, float("nan"), NOT_RUN) for p in self.files[len(rows):]]
        _write_summary(self.out / SUMMARY_FILE, rows + not_run, self.classes)
        return not_run

    def _kept_row(self, path: Path, mask_file: str) -> BatchRow | None:
        """The row of a file whose mask the stopped batch being continued wrote (after it started, and
        after the image last changed), read from that mask page by page; None when it must be predicted."""
        mask, seg = self.out / mask_file, self.out / _seg_name(mask_file)
        if self._since is None or not mask.is_file():
            return None
        written = mask.stat().st_mtime
        if written < max(datetime.fromisoformat(self._since).timestamp(), path.stat().st_mtime):
            return None
        wants_seg = self.dicom_seg and is_dicom_file(path)
        if wants_seg and not seg.is_file():
            return None
        import tifffile

        try:
            with tifffile.TiffFile(mask) as tiff:
                frames, counts, (height, width) = len(tiff.pages), self._no_pixels(), tiff.pages[0].shape[:2]
                for page in tiff.pages:
                    counts += self._label_counts(page.asarray())
        except Exception:  # damaged since: predicted again
            return None
        return self._ok_row(path, height, width, counts, mask_file, frames, _seg_name(mask_file) if wants_seg else "",
                            tiff_spacing(mask), self._colour_as_grey(path))

    def _predict_file(self, predictor: Predictor, path: Path, mask_file: str,
                      threshold: float) -> Generator[FrameStep, None, BatchRow]:
        """One file's mask into ``mask_file``: a 2-D image at once; a stack (a multi-page TIFF, a DICOM
        cine loop) or a video batch by batch, a step per batch, its pages written as they come, its
        frames read or decoded only as a batch needs them. The mask keeps the image's pixel spacing."""
        spacing = file_spacing(path)
        source = _read_for_prediction(path)
        if isinstance(source, np.ndarray):
            mask = predictor.mask(source, threshold, path)
            atomic_write_bytes(self.out / mask_file, tiff_bytes(mask, spacing))
            return self._ok_row(path, *mask.shape, self._label_counts(mask), mask_file, 1,
                                self._segmentation(path, mask, mask_file), spacing, self._colour_as_grey(path, source))
        frames, count, frame_name, leading = source
        kept: list[np.ndarray] | None = [] if self.dicom_seg and is_dicom_file(path) else None  # a SEG: whole
        done, counts = 0, self._no_pixels()
        with tiff_pages(self.out / mask_file, spacing, leading) as write_page:  # T×Z×H×W read back as such
            for labels in predictor.iter_label_chunks(frames, threshold, path, frame_name):
                for page in labels:
                    write_page(page)
                done += len(labels)
                counts += self._label_counts(labels)
                if kept is not None:
                    kept.append(labels)
                yield FrameStep(path, done, max(count, done) if count else 0)  # a container's count: an estimate
            if not done:
                raise InputError(path, "no frame could be decoded")
        height, width = labels.shape[1:]
        segmentation = "" if kept is None else self._segmentation(path, np.concatenate(kept), mask_file)
        first = frames[0] if isinstance(frames, np.ndarray) else None  # a stack read whole is not read again
        return self._ok_row(path, height, width, counts, mask_file, done, segmentation, spacing,
                            self._colour_as_grey(path, first))

    def _no_pixels(self) -> np.ndarray:
        return np.zeros(len(self.classes) + 1, np.int64)

    def _label_counts(self, labels: np.ndarray) -> np.ndarray:
        """Pixels per label, background first (labels past the classes, from a mask edited by hand: last class)."""
        return np.bincount(np.minimum(labels.ravel(), len(self.classes)), minlength=len(self.classes) + 1)

    def _ok_row(self, path: Path, height: int, width: int, counts: np.ndarray, mask_file: str, frames: int,
                seg_file: str, spacing: tuple[float, float] | None, colour_as_grey: bool) -> BatchRow:
        """A predicted file's row: the foreground and each class's share of its ``frames`` pages' pixels."""
        total = frames * height * width
        return BatchRow(self._name(path), height, width, round(float(counts[1:].sum()) / total, 6), "ok", mask_file,
                        frames, seg_file, spacing, tuple(round(float(c) / total, 6) for c in counts[1:]),
                        exif_orientation(path), colour_as_grey)

    def _colour_as_grey(self, path: Path, image: np.ndarray | None = None) -> bool:
        """Whether the grey model saw only the luma of a colour image (``Predictor.sees_in_grey``): of ``image``,
        the file's 2-D image or first frame when read already, else of its first frame, read for this (a
        stack read a page or frame at a time, a kept mask's image)."""
        if self._sees_in_grey is None:
            return False
        if image is None:
            try:
                source = _read_for_prediction(path)
                image = source if isinstance(source, np.ndarray) else next(iter(source.frames))
            except (InputError, StopIteration):  # a first frame that cannot be read: no colour to tell
                return False
        return self._sees_in_grey(image)

    def _segmentation(self, path: Path, mask: np.ndarray, mask_file: str) -> str:
        """The DICOM SEG of a DICOM image's mask, when asked for: its file name, or why there is none."""
        if not (self.dicom_seg and is_dicom_file(path)):
            return ""
        name = _seg_name(mask_file)
        model = self._record["model"]
        parameters = {"model_sha256": model["sha256"], "model_round": model["round"],
                      "threshold": self._record["threshold"]}
        try:
            write_dicom_seg(path, mask, self.classes, self.out / name,
                            {key: str(value) for key, value in parameters.items() if value is not None})
        except InputError as exc:
            return f"not written: {exc.reason}"
        return name


class _Frames(NamedTuple):
    """A stack's frames, read or decoded as they are asked for; how many (0: unknown); how frame *i* is named
    in a refusal; the stack's axes before a frame's."""

    frames: Iterable[np.ndarray]
    count: int
    name: Callable[[int], str]
    leading: tuple[int, ...]


def _read_for_prediction(path: Path) -> np.ndarray | _Frames:
    """A file's one 2-D image, read and validated, or its frames: a video's, a multi-page TIFF's (a page at a
    time), a multi-frame DICOM's (decoded a frame at a time), or those of a stack read whole."""
    if is_video_path(path):
        video = open_video(path)
        return _Frames(video, video.frames, str, ())
    if (stack := tiff_stack(path)) is not None:
        return _Frames(stack, len(stack), partial(_frame_index, leading=stack.leading), stack.leading)
    if is_dicom_file(path) and (loop := dicom_frames(path)) is not None:
        return _Frames(loop, loop.count, str, ())
    pixels, colour = read_frames(path)
    if pixels.ndim == (3 if colour else 2):
        return pixels
    frames, leading = stack_frames(pixels, colour, path)
    return _Frames(frames, len(frames), partial(_frame_index, leading=leading), leading)


def iter_predict_folder(predictor: Predictor, folder: str | Path, out: str | Path, threshold: float = 0.5,
                        dicom_seg: bool = False, classes: Sequence[str] | None = None,
                        frame_steps: bool = False, recursive: bool = False, resume: bool = False) -> FolderBatch:
    """Predict every image in ``folder`` (or the one file it names; with ``recursive``, in its sub-folders
    too) into ``out``; ``resume`` continues a stopped batch there. See ``FolderBatch`` (checks happen now)."""
    return FolderBatch(predictor, folder, out, threshold, dicom_seg, classes, frame_steps, recursive, resume)


RESUMED_SETTINGS = ("input", "recursive", "threshold", "dicom_seg")  # and the model's digest, inference, device


def _resumed_start(out: Path, record: dict[str, Any]) -> str:
    """When the stopped batch in ``out`` that this one continues started; refused unless that batch had
    this model (by digest), inference, device, input and settings, whose masks are this batch's masks."""
    path = out / RECORD_FILE
    if not path.is_file():
        raise InputError(out, f"no earlier batch to continue here (no {RECORD_FILE}); run it without continuing")
    try:
        earlier = parse_json(path.read_text())
        started = str(earlier["started"])
        datetime.fromisoformat(started)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise InputError(path, f"unreadable ({exc}); run the batch again without continuing") from None
    if record["model"]["sha256"] is None:
        raise InputError("model", "weights held in memory cannot be matched to an earlier batch; load a checkpoint")
    model = earlier.get("model") or {}
    pairs = [(key, earlier.get(key), record[key]) for key in RESUMED_SETTINGS] + [
        (f"model {key}", model.get(key), record["model"][key]) for key in ("sha256", "inference", "device")]
    # each with both values: a clinic continuing in napari must know which threshold to set back
    differs = [f"{name} {_shown(before)} (this one: {_shown(now)})" for name, before, now in pairs if before != now]
    if differs:
        raise InputError(path, f"the earlier batch had {', '.join(differs)}: its masks are not this batch's; "
                               "continue it with the same model and settings, or run without continuing")
    return started


def _shown(value: Any) -> str:
    """A setting in a message: a digest by its first 12 characters, as git shows a commit."""
    return f"{value[:12]}…" if isinstance(value, str) and len(value) == 64 else str(value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _json_bytes(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()


def _write_summary(path: Path, rows: list[BatchRow], classes: Sequence[str]) -> None:
    """``summary.csv``; a model of several classes adds each class's share after the foreground's
    (``foreground_<class>``), and its area after the foreground's area (``foreground_mm2_<class>``)."""
    text = io.StringIO()
    writer = csv.writer(text)
    share_at = SUMMARY_COLUMNS.index("foreground_fraction") + 1
    area_at = SUMMARY_COLUMNS.index("foreground_mm2") + 1
    several = len(classes) > 1
    shares = [f"foreground_{name}" for name in classes] if several else []
    areas = [f"foreground_mm2_{name}" for name in classes] if several else []
    columns = SUMMARY_COLUMNS
    writer.writerow([*columns[:share_at], *shares, *columns[share_at:area_at], *areas, *columns[area_at:]])
    for r in rows:  # an unknown value (no spacing, a file not predicted) and a no are empty cells, a yes "yes"
        values = [getattr(r, column) for column in columns]
        each_share = list(r.class_fractions) if r.class_fractions else [None] * len(shares)
        each_area = list(r.class_mm2) if r.class_fractions else [None] * len(areas)
        cells = [*values[:share_at], *each_share[:len(shares)], *values[share_at:area_at], *each_area[:len(areas)],
                 *values[area_at:]]
        writer.writerow(["yes" if value is True else "" if value is None or value is False
                         or (isinstance(value, float) and math.isnan(value)) else value for value in cells])
    atomic_write_bytes(path, text.getvalue().encode())


def predict_folder(predictor: Predictor, folder: str | Path, out: str | Path, threshold: float = 0.5,
                   progress: Callable[[int, int, BatchRow], None] | None = None, dicom_seg: bool = False,
                   classes: Sequence[str] | None = None,
                   on_frames: Callable[[Path, int, int], None] | None = None,
                   recursive: bool = False, resume: bool = False) -> list[BatchRow]:
    """The whole batch (``FolderBatch``), its rows; ``progress`` per file, ``on_frames`` per batch of a stack."""
    rows = []
    for step in iter_predict_folder(predictor, folder, out, threshold, dicom_seg, classes, on_frames is not None,
                                    recursive, resume):
        if isinstance(step, FrameStep):
            on_frames(step.file, step.done, step.frames)
            continue
        done, total, row = step
        rows.append(row)
        if progress:
            progress(done, total, row)
    return rows
