"""A site's annotations out of the site, in the formats ``site import`` reads: the clinic's work (weeks of
masks, boxes and tags drawn in napari) kept in files every tool opens, for an archive, a research partner or
another segmentation tool, and imported again as they were (masks, boxes and tags with who annotated them and
when).

``OUT/masks/<id>_mask.tif`` (of the images with a mask; label images: value k is the k-th class),
``OUT/boxes.csv`` and ``OUT/tags.csv`` (with who annotated and when, and where the site's image came from;
``OUT/masks.csv`` says the same of each mask),
``OUT/annotations.json`` (the masks and boxes as COCO, which annotation tools open: CVAT, Label Studio, and
``site import --coco``), and with ``images`` ``OUT/images/<id>.tif`` (the site's copies, pixel spacing kept).
The folder appears whole or not at all: it is written beside ``OUT`` and renamed into place at the end, so a
stopped export leaves nothing to be taken for a complete one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np

from fedmix_engine.atomic import atomic_write_bytes, make_folder
from fedmix_engine.data.imageio import tiff_bytes
from fedmix_engine.data.site_store import LOGS, Box, ImageRecord, SiteStore, log_stamp
from fedmix_engine.errors import InputError
from fedmix_engine.steps import run_steps

BOX_HEADER = ("image", "class", "y0", "x0", "y1", "x1", "author", "annotated_at", "source")
TAG_HEADER = ("image", "class", "present", "author", "annotated_at", "source")
MASK_HEADER = ("image", "file", "author", "annotated_at", "source")  # who drew each mask, and when
MASKS_TABLE = "masks.csv"  # beside the masks/ folder: import reads it with --masks OUT/masks
COCO_FILE = "annotations.json"
KEY_SUFFIX = "-key.csv"  # SITE/logs/export-<time>-key.csv: a pseudonymised export's names → the site's images
KEY_HEADER = ("name", "image", "source")


@dataclass
class ExportReport:
    """What :func:`export_site` wrote."""

    out: Path
    images: int = 0  # image files written (with ``images`` only)
    masks: int = 0
    boxes: int = 0
    tags: int = 0
    with_images: bool = False
    pseudonymised: bool = False
    key: Path | None = None  # where a pseudonymised export's key went (None: it could not be written)
    key_problem: str = ""
    others: list[Path] = field(default_factory=list)  # unfinished folders of other exports to the same name
    problems: list[str] = field(default_factory=list)  # images left out, each with its damaged file

    def lines(self) -> list[str]:
        written = f"images: {self.images}  " if self.with_images else ""
        parts = [(option, self.out / name) for option, name, count in (
            ("--images", "images", self.images), ("--masks", "masks", self.masks),
            ("--boxes", "boxes.csv", self.boxes), ("--tags", "tags.csv", self.tags)) if count]
        return [f"exported to {self.out}: {written}masks: {self.masks}  boxes: {self.boxes}  tags: {self.tags}",
                *(["to import it into another site: fedmix-engine site import SITE "
                   + " ".join(f"{option} {path}" for option, path in parts)] if parts else []),
                *([f"for annotation tools (CVAT, Label Studio …): {self.out / COCO_FILE}, the masks and boxes as "
                   "COCO"] if self.masks or self.boxes else []),
                *(self._pseudonym_lines() if self.pseudonymised else []),
                *(f"{other}: the unfinished folder of another export to this name (one running now, or one a "
                  "crash stopped: then delete it, it may hold copies of the site's images)" for other in self.others),
                *([f"{len(self.problems)} image(s) left out (the rest is exported):"] if self.problems else []),
                *(f"  {problem}" for problem in self.problems)]

    def _pseudonym_lines(self) -> list[str]:
        said = ("pseudonymised: images named case-…, dealt at random; no source file names (the annotators' names "
                "are kept)")
        if self.key is not None:
            return [said, f"the key from those names to the site's images: {self.key} (it stays at the site, readable "
                          "by you only; site remove deletes a removed image's line)"]
        return [said, f"the key from those names to the site's images could not be written ({self.key_problem}): "
                      "the export cannot be linked back to the site's images"]


@dataclass(frozen=True)
class ExportProgress:
    """``done`` of ``total`` images exported."""

    done: int
    total: int
    stage: str = "export"


def export_site(store: SiteStore, out: str | Path, images: bool = False,
                progress: Callable[[ExportProgress], None] | None = None,
                pseudonymise: bool = False) -> ExportReport:
    """Write the site's annotations (and with ``images`` its images) to the new folder ``out``.

    ``pseudonymise``: for a folder that leaves the clinic (a research partner), the images are named
    ``case-001`` … in a random order instead of by their ids (often a patient's file name), and no source file
    is named; the key from those names to the site's images is written to ``SITE/logs/export-<time>-key.csv``
    (mode 600), where ``site remove`` finds it."""
    return run_steps(export_steps(store, out, images, pseudonymise), progress)


def export_steps(store: SiteStore, out: str | Path, images: bool = False, pseudonymise: bool = False
                 ) -> Generator[ExportProgress, None, ExportReport]:
    """:func:`export_site` as steps, one per image, that a GUI worker can show and stop. ``out`` must not
    exist or be an empty folder (an export never writes over files): refused here, before the first step."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(out, "exists and is not an empty folder; an export writes a new folder (choose another "
                              "name, or remove this one)")
    if out.resolve().is_relative_to(store.root.resolve()):
        raise InputError(out, f"is inside the site {store.root}; export to a folder outside it")
    return _export(store, out, images, pseudonymise)


def _export(store: SiteStore, out: Path, images: bool, pseudonymise: bool
            ) -> Generator[ExportProgress, None, ExportReport]:
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)  # this process's own leftover, if any: pids are not reused at once
    try:
        make_folder(partial)
    except InputError as exc:  # the folder named as the user gave it, not by our partial one; a blocker by itself
        raise InputError(out, exc.reason) if exc.where == str(partial) else exc from None
    report = ExportReport(out, with_images=images, pseudonymised=pseudonymise,
                          others=sorted(p for p in out.parent.glob(f".{out.name}.partial-*") if p != partial))
    boxes, tags, masks = _table(BOX_HEADER), _table(TAG_HEADER), _table(MASK_HEADER)
    coco = _Coco(store.config.classes)
    try:
        records = store.records()
        names = _pseudonyms(records) if pseudonymise else {record.id: record.id for record in records}
        if pseudonymise:  # the tables' rows, COCO's image ids and the files' times in import order would undo it
            records.sort(key=lambda record: names[record.id])
        for n, record in enumerate(records, start=1):
            name, source = names[record.id], "" if pseudonymise else record.source
            try:  # a damaged file leaves its image out, said, not the whole site
                pixels = (store.read_image(record.id), store.spacing(record.id)) if images else None
                mask = store.read_mask(record.id) if record.has_mask else None
            except InputError as exc:
                report.problems.append(str(exc))
                yield ExportProgress(n, len(records))
                continue
            if pixels is not None:
                atomic_write_bytes(partial / "images" / f"{name}.tif", tiff_bytes(*pixels))
                report.images += 1
            drawn = store.mask_author(record.id) if mask is not None else None
            if mask is not None and drawn is not None:  # both: napari may clear it meanwhile
                atomic_write_bytes(partial / "masks" / f"{name}_mask.tif", tiff_bytes(mask))
                masks[1].writerow([name, f"masks/{name}_mask.tif", *drawn, source])
                report.masks += 1
            held = store.boxes(record.id)
            copy = f"images/{name}.tif" if images else f"{name}.tif" if pseudonymise else _file_name(record)
            coco.add(record, copy, mask if drawn else None, held)
            for box in held:
                boxes[1].writerow([name, box.class_name, box.y0, box.x0, box.y1, box.x1, box.author,
                                   box.created_at, source])
                report.boxes += 1
            for class_name, present, author, created_at in store.tag_rows(record.id):
                tags[1].writerow([name, class_name, "present" if present else "absent", author, created_at,
                                  source])
                report.tags += 1
            yield ExportProgress(n, len(records))
        atomic_write_bytes(partial / "boxes.csv", boxes[0].getvalue().encode())
        atomic_write_bytes(partial / "tags.csv", tags[0].getvalue().encode())
        atomic_write_bytes(partial / MASKS_TABLE, masks[0].getvalue().encode())
        atomic_write_bytes(partial / COCO_FILE, json.dumps(coco.data, ensure_ascii=False).encode())
        if pseudonymise:  # before the folder appears: a kill between the two leaves no export without its key
            _write_key(store.root, names, records, report)
        if out.exists():
            out.rmdir()  # empty (checked above): a rename onto it fails on Windows
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if report.key is not None:  # the key of an export that did not happen
            report.key.unlink(missing_ok=True)
        raise
    return report


def _pseudonyms(records: list[ImageRecord]) -> dict[str, str]:
    """A neutral name per image, ``case-001`` …, dealt in a random order: the import order follows the file
    names, which may be the patients'."""
    order = list(range(len(records)))
    secrets.SystemRandom().shuffle(order)
    width = max(3, len(str(len(records))))
    return {record.id: f"case-{k + 1:0{width}d}" for record, k in zip(records, order, strict=True)}


def _write_key(site: Path, names: dict[str, str], records: list[ImageRecord], report: ExportReport) -> None:
    """The key from a pseudonymised export's names to the site's images, in ``SITE/logs/`` (mode 600: it links
    the export to the patients' files). A site it cannot be written to (read-only) is said in the report."""
    key = site / LOGS / f"export-{log_stamp(time.time())}-{secrets.token_hex(3)}{KEY_SUFFIX}"
    text, writer = _table(KEY_HEADER)
    for record in sorted(records, key=lambda record: names[record.id]):
        writer.writerow([names[record.id], record.id, record.source])
    try:
        make_folder(key.parent)
        atomic_write_bytes(key, text.getvalue().encode(), mode=0o600)
        report.key = key
    except (InputError, OSError) as exc:
        report.key_problem = exc.reason if isinstance(exc, InputError) else f"{exc.strerror or exc}"


class _Coco:
    """The export's masks and boxes as a COCO file: a mask's classes each one annotation of their pixels,
    run-length encoded (exact, unlike polygons traced around them); a box an annotation without segmentation,
    as CVAT writes a rectangle. Images are named by their copies (``--images``), else by the files they were
    imported from, which another tool opens."""

    def __init__(self, classes: tuple[str, ...]):
        self.data: dict[str, list] = {"images": [], "annotations": [],
                                      "categories": [{"id": k + 1, "name": name} for k, name in enumerate(classes)]}

    def add(self, record: ImageRecord, file_name: str, mask: np.ndarray | None, boxes: list[Box]) -> None:
        if mask is None and not boxes:
            return
        from pycocotools import mask as coco_mask

        image_id = len(self.data["images"]) + 1
        self.data["images"].append({"id": image_id, "file_name": file_name, "height": record.height,
                                    "width": record.width})
        regions = [(k + 1, mask == k + 1) for k in range(len(self.data["categories"]))] if mask is not None else []
        for label, pixels in regions:
            if pixels.any():
                rle = coco_mask.encode(np.asfortranarray(pixels, dtype=np.uint8))
                self._annotate(image_id, label, [float(v) for v in coco_mask.toBbox(rle)], float(coco_mask.area(rle)),
                               {"size": rle["size"], "counts": rle["counts"].decode("ascii")})
        names = [c["name"] for c in self.data["categories"]]
        for box in boxes:
            width, height = box.x1 - box.x0, box.y1 - box.y0
            self._annotate(image_id, names.index(box.class_name) + 1, [box.x0, box.y0, width, height],
                           width * height, [])

    def _annotate(self, image_id: int, category: int, bbox: list, area: float, segmentation: Any) -> None:
        self.data["annotations"].append({"id": len(self.data["annotations"]) + 1, "image_id": image_id,
                                         "category_id": category, "bbox": bbox, "area": area,
                                         "segmentation": segmentation, "iscrowd": 0})


def _file_name(record: ImageRecord) -> str:
    """The name of the file an image came from (a Windows path's too), or its id for one added from napari."""
    source = record.source
    return PureWindowsPath(source).name if os.path.isabs(source) or PureWindowsPath(source).is_absolute() \
        else f"{record.id}.tif"


def _table(header: tuple[str, ...]) -> tuple[io.StringIO, Any]:
    """A CSV table written in memory (the text, and its csv writer), its header row in: written out whole at the
    end, into the folder that is renamed into place."""
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    return text, writer
