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
import shutil
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np

from fedmix_engine.atomic import atomic_write_bytes, make_folder
from fedmix_engine.data.imageio import tiff_bytes
from fedmix_engine.data.site_store import Box, ImageRecord, SiteStore
from fedmix_engine.errors import InputError
from fedmix_engine.steps import run_steps

BOX_HEADER = ("image", "class", "y0", "x0", "y1", "x1", "author", "annotated_at", "source")
TAG_HEADER = ("image", "class", "present", "author", "annotated_at", "source")
MASK_HEADER = ("image", "file", "author", "annotated_at", "source")  # who drew each mask, and when
MASKS_TABLE = "masks.csv"  # beside the masks/ folder: import reads it with --masks OUT/masks
COCO_FILE = "annotations.json"


@dataclass
class ExportReport:
    """What :func:`export_site` wrote."""

    out: Path
    images: int = 0  # image files written (with ``images`` only)
    masks: int = 0
    boxes: int = 0
    tags: int = 0
    with_images: bool = False
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
                *(f"{other}: the unfinished folder of another export to this name (one running now, or one a "
                  "crash stopped: then delete it, it may hold copies of the site's images)" for other in self.others),
                *([f"{len(self.problems)} image(s) left out (the rest is exported):"] if self.problems else []),
                *(f"  {problem}" for problem in self.problems)]


@dataclass(frozen=True)
class ExportProgress:
    """``done`` of ``total`` images exported."""

    done: int
    total: int
    stage: str = "export"


def export_site(store: SiteStore, out: str | Path, images: bool = False,
                progress: Callable[[ExportProgress], None] | None = None) -> ExportReport:
    """Write the site's annotations (and with ``images`` its images) to the new folder ``out``."""
    return run_steps(export_steps(store, out, images), progress)


def export_steps(store: SiteStore, out: str | Path, images: bool = False
                 ) -> Generator[ExportProgress, None, ExportReport]:
    """:func:`export_site` as steps, one per image, that a GUI worker can show and stop. ``out`` must not
    exist or be an empty folder (an export never writes over files): refused here, before the first step."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(out, "exists and is not an empty folder; an export writes a new folder (choose another "
                              "name, or remove this one)")
    if out.resolve().is_relative_to(store.root.resolve()):
        raise InputError(out, f"is inside the site {store.root}; export to a folder outside it")
    return _export(store, out, images)


def _export(store: SiteStore, out: Path, images: bool) -> Generator[ExportProgress, None, ExportReport]:
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)  # this process's own leftover, if any: pids are not reused at once
    try:
        make_folder(partial)
    except InputError as exc:  # the folder named as the user gave it, not by our partial one; a blocker by itself
        raise InputError(out, exc.reason) if exc.where == str(partial) else exc from None
    report = ExportReport(out, with_images=images, others=sorted(p for p in out.parent.glob(f".{out.name}.partial-*")
                                                                 if p != partial))
    boxes, tags, masks = _table(BOX_HEADER), _table(TAG_HEADER), _table(MASK_HEADER)
    coco = _Coco(store.config.classes)
    try:
        records = store.records()
        for n, record in enumerate(records, start=1):
            try:  # a damaged file leaves its image out, said, not the whole site
                pixels = (store.read_image(record.id), store.spacing(record.id)) if images else None
                mask = store.read_mask(record.id) if record.has_mask else None
            except InputError as exc:
                report.problems.append(str(exc))
                yield ExportProgress(n, len(records))
                continue
            if pixels is not None:
                atomic_write_bytes(partial / "images" / f"{record.id}.tif", tiff_bytes(*pixels))
                report.images += 1
            drawn = store.mask_author(record.id) if mask is not None else None
            if mask is not None and drawn is not None:  # both: napari may clear it meanwhile
                atomic_write_bytes(partial / "masks" / f"{record.id}_mask.tif", tiff_bytes(mask))
                masks[1].writerow([record.id, f"masks/{record.id}_mask.tif", *drawn, record.source])
                report.masks += 1
            held = store.boxes(record.id)
            coco.add(record, f"images/{record.id}.tif" if images else None, mask if drawn else None, held)
            for box in held:
                boxes[1].writerow([record.id, box.class_name, box.y0, box.x0, box.y1, box.x1, box.author,
                                   box.created_at, record.source])
                report.boxes += 1
            for class_name, present, author, created_at in store.tag_rows(record.id):
                tags[1].writerow([record.id, class_name, "present" if present else "absent", author, created_at,
                                  record.source])
                report.tags += 1
            yield ExportProgress(n, len(records))
        atomic_write_bytes(partial / "boxes.csv", boxes[0].getvalue().encode())
        atomic_write_bytes(partial / "tags.csv", tags[0].getvalue().encode())
        atomic_write_bytes(partial / MASKS_TABLE, masks[0].getvalue().encode())
        atomic_write_bytes(partial / COCO_FILE, json.dumps(coco.data, ensure_ascii=False).encode())
        if out.exists():
            out.rmdir()  # empty (checked above): a rename onto it fails on Windows
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return report


class _Coco:
    """The export's masks and boxes as a COCO file: a mask's classes each one annotation of their pixels,
    run-length encoded (exact, unlike polygons traced around them); a box an annotation without segmentation,
    as CVAT writes a rectangle. Images are named by their copies (``--images``), else by the files they were
    imported from, which another tool opens."""

    def __init__(self, classes: tuple[str, ...]):
        self.data: dict[str, list] = {"images": [], "annotations": [],
                                      "categories": [{"id": k + 1, "name": name} for k, name in enumerate(classes)]}

    def add(self, record: ImageRecord, copy: str | None, mask: np.ndarray | None, boxes: list[Box]) -> None:
        if mask is None and not boxes:
            return
        from pycocotools import mask as coco_mask

        image_id = len(self.data["images"]) + 1
        self.data["images"].append({"id": image_id, "file_name": copy or _file_name(record), "height": record.height,
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
