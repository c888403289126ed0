"""A site's annotations out of the site, in the formats ``site import`` reads: the clinic's work (weeks of
masks, boxes and tags drawn in napari) kept in files every tool opens, for an archive, a research partner or
another segmentation tool, and imported again as they were (boxes and tags with their authors; masks take the
import's author).

``OUT/masks/<id>_mask.tif`` (of the images with a mask; label images: value k is the k-th class),
``OUT/boxes.csv`` and ``OUT/tags.csv`` (with who annotated and when, and where the site's image came from;
``OUT/masks.csv`` says the same of each mask),
and with ``images`` ``OUT/images/<id>.tif`` (the site's copies, pixel spacing kept). The folder appears whole
or not at all: it is written beside ``OUT`` and renamed into place at the end, so a stopped export leaves
nothing to be taken for a complete one.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmix_engine.atomic import atomic_write_bytes, make_folder
from fedmix_engine.data.imageio import tiff_bytes
from fedmix_engine.data.site_store import SiteStore
from fedmix_engine.errors import InputError
from fedmix_engine.steps import run_steps

BOX_HEADER = ("image", "class", "y0", "x0", "y1", "x1", "author", "annotated_at", "source")
TAG_HEADER = ("image", "class", "present", "author", "annotated_at", "source")
MASK_HEADER = ("image", "file", "author", "annotated_at", "source")  # who drew each mask: import does not read it


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
            for box in store.boxes(record.id):
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
        atomic_write_bytes(partial / "masks.csv", masks[0].getvalue().encode())
        if out.exists():
            out.rmdir()  # empty (checked above): a rename onto it fails on Windows
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return report


def _table(header: tuple[str, ...]) -> tuple[io.StringIO, Any]:
    """A CSV table written in memory (the text, and its csv writer), its header row in: written out whole at the
    end, into the folder that is renamed into place."""
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    return text, writer
