"""Bring an existing folder of images (and masks, box and tag tables) into a SiteStore.

CSV formats (header row required, extra columns ignored; ``image`` is the file name or stem;
UTF-8 text, separated by commas, semicolons or tabs as the header shows — Excel writes semicolons
where the comma is the decimal mark):

- boxes: ``image,class,y0,x0,y1,x1`` — pixel corners, rows y, columns x, half-open
  (the box covers rows y0..y1-1). All boxes of one image are replaced together, so a re-import
  is idempotent. The corners may also be ``x_min,y_min,x_max,y_max`` or ``x,y,width,height``
  (:func:`_box_rows`).
- tags: ``image,class,present`` — ``present``/``absent`` (also yes/no, true/false, 1/0).

A COCO annotation file (an annotation tool's export) gives masks and boxes: :mod:`coco`; so do the LabelMe
files beside the images of an imported folder: :mod:`labelme`.

A table's ``author`` column (a reader's id in a study sheet; ``site export`` writes it) names who set each
box or tag; rows without one take the import's author.

Imported again, a folder changes only what its files changed: a mask, an image's boxes or a tag the site
holds as the files give it is left alone, and one the site changed after the file was written (a
clinician's correction in napari) is kept, and listed, unless ``replace``.

Masks are matched to images by file stem: ``x.png`` or ``x_mask.png`` (also ``-mask``, ``_label``,
``_seg``, ``_segmentation``, ``_GT`` …, in any letter case) belongs to image ``x``;
``x_mask_1.png``, ``x_mask_2.png`` … are further masks of ``x`` (one lesion each, as in BUSI) and
are joined. ``--masks`` may name the images folder itself: the mask files in it are then taken as
masks, not imported as images. An all-background mask file is imported as every class tagged absent.

Every problem (unreadable image, mask of the wrong shape, a CSV row naming an unknown image
or class …) is reported with its file and line; the rest is imported. Nothing is silently
dropped.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PureWindowsPath

import numpy as np

from fedmix_engine.atomic import atomic_write_bytes
from fedmix_engine.data.coco import CocoAnnotation, CocoFile, CocoImage, read_coco, region_mask
from fedmix_engine.data.export import KEY_HEADER, MASK_HEADER, MASKS_TABLE
from fedmix_engine.data.imageio import (
    exif_orientation,
    holds_colour,
    image_files,
    image_stem,
    iter_image_files,
    no_images_reason,
    read_image,
    read_mask_file,
    validate_mask,
)
from fedmix_engine.data.labelme import is_labelme_file, read_labelme
from fedmix_engine.data.site_store import (
    LOGS,
    Box,
    ImageRecord,
    SiteStore,
    annotation_time,
    image_id_from_path,
    log_stamp,
)
from fedmix_engine.data.video import NOT_IMPORTED, is_video_path
from fedmix_engine.errors import InputError
from fedmix_engine.steps import run_steps

# "1.0" and "0.0": pandas writes a column of 0/1 with one empty cell as floats
_TRUE = {"present", "yes", "true", "1", "1.0", "y"}
_FALSE = {"absent", "no", "false", "0", "0.0", "n"}
BOX_COLUMNS = ("image", "class", "y0", "x0", "y1", "x1")
TAG_COLUMNS = ("image", "class", "present")
# a table's image column as tools and public datasets name it (VinDr-CXR: image_id; RSNA pneumonia: patientId,
# its DICOM files' names; VOC conversions: filename), taken when there is no "image" column
IMAGE_COLUMNS = ("image", "image_id", "filename", "file", "patientid")
# a box table's corners, each layout by its column names: renamed to the first layout's (y0, x0, y1, x1:
# corners, half-open) or to "x, y, width, height" (a corner and the box's size: RSNA's, COCO's)
_CORNERS = ("y0", "x0", "y1", "x1")
_SIZED = ("x", "y", "width", "height")
_BOX_LAYOUTS: tuple[dict[str, str], ...] = (
    dict(zip(_CORNERS, _CORNERS, strict=True)),
    {"x_min": "x0", "y_min": "y0", "x_max": "x1", "y_max": "y1"},  # VinDr-CXR, VOC conversions
    {"xmin": "x0", "ymin": "y0", "xmax": "x1", "ymax": "y1"},
    dict(zip(_SIZED, _SIZED, strict=True)),
    {"x": "x", "y": "y", "w": "width", "h": "height"},
)
_BOX_CLASS_COLUMNS = ("class", "class_name", "label")
_BOX_HEADERS = ("image (or image_id, filename, patientId), class (or class_name, label; may be left out by a "
                "one-class site), and a box's corners as y0,x0,y1,x1, or x_min,y_min,x_max,y_max, or "
                "x,y,width,height")
# "<image>_mask", and "<image>_mask_1", "_mask_2" … for further masks of one image (BUSI's lesions);
# "_segmentation" is ISIC's (the paper's skin lesion data), "_GT" many others'; any letter case
MASK_NAME = re.compile(r"^(?P<image>.+?)[ _-](?:mask|labels?|seg|segmentation|gt)(?:_\d+)?$", re.IGNORECASE)


SHOWN_PROBLEMS = 20  # problems an import prints; the rest are in its log


@dataclass
class ImportReport:
    """What an import did; ``problems`` lists each refused item with its file (and line)."""

    images_added: int = 0
    images_already_present: int = 0
    masks: int = 0
    boxes: int = 0
    tags: int = 0
    empty_masks: int = 0  # all-background mask files, stored as every class tagged absent
    rows_without_box: int = 0  # box table rows with every corner empty: an image without a finding, no box
    coco_unannotated: int = 0  # images a COCO file lists without annotations (not annotated yet, or no finding)
    turned: list[Path] = field(default_factory=list)  # added photos that photo viewers show turned (EXIF)
    copies: list[tuple[Path, str]] = field(default_factory=list)  # added files of pixels the site held: (file, id)
    colour_in_grey: int = 0  # colour images (holds_colour) added to a grey site: trained as grey
    with_spacing: int = 0  # added images whose file gave a pixel spacing (HD95 in mm)
    unchanged: int = 0  # masks, images' boxes and tags the site held as the files give them: not written again
    kept: list[str] = field(default_factory=list)  # the site's annotations newer than their files': not replaced
    problems: list[str] = field(default_factory=list)
    problems_file: Path | None = None  # every problem, one per line, in the site's logs/ folder
    read_images: bool = True  # False: annotations only, for the images the site held

    def lines(self, shown: int = SHOWN_PROBLEMS) -> list[str]:
        out = [f"images added: {self.images_added} (already present: {self.images_already_present})"
               ] if self.read_images else []
        out.append(f"masks: {self.masks}  boxes: {self.boxes}  tags: {self.tags}"
                   + (f"  (unchanged: {self.unchanged})" if self.unchanged else ""))
        if self.images_added:
            out.append(f"pixel spacing (mm) from the files: {self.with_spacing} of {self.images_added} added images"
                       + ("" if self.with_spacing else " (evaluate gives HD95 in pixels)"))
        out.extend(self.turned_lines(shown))
        out.extend(self.copy_lines(shown))
        out.extend(self.colour_lines())
        if self.empty_masks:
            out.append(f"empty masks: {self.empty_masks} (no lesion: stored as every class tagged absent)")
        if self.coco_unannotated:
            out.append(f"images without annotations in the COCO file: {self.coco_unannotated} (nothing imported "
                       "for them; a tags table says which images have no lesion)")
        if self.rows_without_box:
            out.append(f"rows without a box (empty corners): {self.rows_without_box} (no box imported for them; "
                       "a tags table says which images have no lesion)")
        out.extend(self.kept_lines(shown))
        if self.problems:
            out.append(f"{len(self.problems)} problem(s):")
            out.extend(f"  {p}" for p in self.problem_lines(shown))
        return out

    def colour_lines(self) -> list[str]:
        """What becomes of colour images added to a grey site (none: no line)."""
        return [f"colour images in this grey site: {self.colour_in_grey} (trained as grey, by their luma; a site "
                "made with --channels 3, or napari's New site… for colour images, keeps their colour)"
                ] if self.colour_in_grey else []

    def copy_lines(self, shown: int = SHOWN_PROBLEMS) -> list[str]:
        """The added images whose pixels are those of an image the site held already (none: no lines)."""
        return listed(f"{len(self.copies)} image(s) with the same pixels as an image of the site (a copy under "
                      "another name, as public datasets hold: both train, and annotations that disagree contradict "
                      "each other; `site remove` takes a copy out):",
                      [f"{path} = {image_id}" for path, image_id in self.copies], shown)

    def turned_lines(self, shown: int = SHOWN_PROBLEMS) -> list[str]:
        """The added photos that photo viewers show turned (none: no lines)."""
        return listed(f"{len(self.turned)} photo(s) with an EXIF orientation (turned or mirrored by photo viewers): "
                      "stored as their pixels are, as napari shows them; a mask drawn where they were shown turned "
                      "will not fit:", self.turned, shown)

    def kept_lines(self, shown: int = SHOWN_PROBLEMS) -> list[str]:
        """The site's annotations the import did not replace, newer than their files (none: no lines)."""
        return listed(f"kept {len(self.kept)} annotation(s) the site changed after their files were written "
                      "(site import --replace takes the files'):", self.kept, shown)

    def problem_lines(self, shown: int = SHOWN_PROBLEMS) -> list[str]:
        """The first ``shown`` problems and where the rest are: a thousand refused rows must not bury the
        counts. Every problem is listed when no log holds them."""
        if self.problems_file is None:
            return list(self.problems)
        hidden = len(self.problems) - shown
        where = (f"… and {hidden} more; all {len(self.problems)} are listed in {self.problems_file}" if hidden > 0
                 else f"(also listed in {self.problems_file})")
        return [*self.problems[:shown], where]


def listed(head: str, items: list, shown: int) -> list[str]:
    """``head`` and the first ``shown`` items indented, then how many more there are (no items: no lines)."""
    if not items:
        return []
    hidden = len(items) - shown
    return [head, *(f"  {item}" for item in items[:shown]), *([f"  … and {hidden} more"] if hidden > 0 else [])]


def write_problem_log(store: SiteStore, report: ImportReport, clock: Callable[[], float] = time.time) -> None:
    """Keep every problem of an import in ``SITE/logs/import-<UTC time>-problems.txt``.

    The terminal and napari show only the first few; the clinician fixing a folder needs them all. A log that
    cannot be written (a full disk) leaves ``problems_file`` unset, and the report then lists every problem.
    """
    if not report.problems:
        return
    stamp = log_stamp(clock())
    path = store.root / LOGS / f"import-{stamp}-problems.txt"
    with contextlib.suppress(OSError):
        path.parent.mkdir(exist_ok=True)
        n = 1
        while path.exists():  # two imports within a second keep both logs
            n += 1
            path = path.with_name(f"import-{stamp}-{n}-problems.txt")
        atomic_write_bytes(path, "".join(f"{p}\n" for p in report.problems).encode())
        report.problems_file = path


TableRows = list[tuple[int, dict[str, str]]]
_SEPARATORS = (",", ";", "\t")


def _separator(text: str, required: tuple[str, ...]) -> str:
    """The separator under which the header names every required column (a comma if none does)."""
    first = text.splitlines()[0] if text else ""
    for separator in _SEPARATORS:
        names = [name.strip().lower() for name in next(csv.reader([first], delimiter=separator))]
        if set(required) <= set(_canonical_names(names).values()):
            return separator
    return ","


def _canonical_names(header: list[str]) -> dict[str, str]:
    """Each column's name as the import reads it: the image column named another way (``image_id``,
    ``patientId`` …: :data:`IMAGE_COLUMNS`) is "image" when the table has no column of that name."""
    named = {name: name for name in header}
    if "image" not in named and (other := next((n for n in IMAGE_COLUMNS if n in named), None)):
        named[other] = "image"
    return named


def _read_table(path: Path, required: tuple[str, ...], expected: str | None = None) -> tuple[list[str], TableRows]:
    """A table's header (lower case) and rows, each with its line number; refused whole, naming the file, if
    it cannot be read or lacks a ``required`` column (``expected``: the header to suggest)."""
    data = path.read_bytes()
    # Excel's 'Unicode Text' is UTF-16 with a byte-order mark (and tabs): told apart by the mark, as Notepad's
    # UTF-8 with one; any other encoding would be a guess (Excel's plain 'CSV' is the machine's code page)
    utf16 = data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    try:
        text = data.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(path, f"line {line} is not {'UTF-16' if utf16 else 'UTF-8'} text (byte "
                         f"0x{data[exc.start]:02x}); save the table as UTF-8 (Excel: 'CSV UTF-8')") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=_separator(text, required))
    try:
        named = _canonical_names([h.strip().lower() for h in (reader.fieldnames or [])])
        header = list(named.values())
        _check_columns(path, header, required, expected)
        return header, [(line, {named[k.strip().lower()]: (v or "").strip() for k, v in row.items()
                                if k is not None}) for line, row in enumerate(reader, start=2)]
    except csv.Error as exc:
        raise InputError(path, f"not readable as CSV after line {reader.line_num} ({exc})") from exc


def _check_columns(path: Path, header: list[str], required: tuple[str, ...], expected: str | None = None) -> None:
    if missing := [c for c in required if c not in header]:
        raise InputError(path, f"missing column(s) {', '.join(missing)}; expected header: "
                               f"{expected or ','.join(required)}")


_TAG_HEADERS = "image,class,present, or image and a column per class (image,lesion,…)"


def _box_layout(header: list[str]) -> dict[str, str] | None:
    """The box table's corner columns and the names the import reads them by (None: no layout whole)."""
    return next((layout for layout in _BOX_LAYOUTS if set(layout) <= set(header)), None)


def _box_rows(path: Path, header: list[str], rows: TableRows) -> TableRows:
    """A box table's rows with its corner and class columns renamed as the import reads them (columns kept
    in the file's order, so a refused row's corners are quoted as the file has them); refused whole, naming
    the file, when its corners are not one layout's columns."""
    layout = _box_layout(header)
    if layout is None:
        named = ", ".join(name for name in header if any(name in lay for lay in _BOX_LAYOUTS))
        raise InputError(path, "missing column(s): a box's corners as y0,x0,y1,x1, or x_min,y_min,x_max,y_max, or "
                               f"x,y,width,height{f' (it has {named})' if named else ''}; expected header: "
                               f"{_BOX_HEADERS}")
    renamed = dict(layout)
    if "class" not in header and (other := next((n for n in _BOX_CLASS_COLUMNS if n in header), None)):
        renamed[other] = "class"
    return [(line, {renamed.get(key, key): value for key, value in row.items()}) for line, row in rows]


def _box_corners(row: dict[str, str]) -> tuple[float, float, float, float]:
    """A box row's corners ``y0, x0, y1, x1`` (ValueError: not numbers), from corners or a corner and a size."""
    if "width" in row:
        x, y, width, height = (_number(row[k]) for k in _SIZED)
        return y, x, y + height, x + width
    y0, x0, y1, x1 = (_number(row[k]) for k in _CORNERS)
    return y0, x0, y1, x1


def _corner_texts(row: dict[str, str]) -> list[str]:
    """A box row's corner cells, in the file's column order."""
    return [value for key, value in row.items() if key in _CORNERS or key in _SIZED]


def _tag_rows(path: Path, header: list[str], rows: TableRows) -> TableRows:
    """A tag table's rows, a row per tag (``image,class,present``) or a row per image and a column per class,
    as a spreadsheet lays them out (which of its columns are classes, the site says: :func:`_tags_by_row`)."""
    if "class" in header or "present" in header:
        _check_columns(path, header, TAG_COLUMNS, _TAG_HEADERS)
    elif not [name for name in header if name and name != "image"]:
        raise InputError(path, f"no tag column; expected header: {_TAG_HEADERS}")
    return rows


def _tags_by_row(table: tuple[Path, TableRows], classes: tuple[str, ...],
                 report: ImportReport) -> tuple[Path, TableRows]:
    """A tag table a row per tag: a column-per-class table's cells become rows (an empty cell is no tag); its
    columns that are not the site's classes (a note, an age) are said once and left out."""
    path, rows = table
    if not rows or "class" in rows[0][1]:
        return table
    # an "author" column says who tagged the row's image (unless the site has a class of that name)
    by = "author" if "author" in rows[0][1] and _site_class(classes, "author") not in classes else None
    columns = [name for name in rows[0][1] if name and name not in ("image", by)]
    named = {name: _site_class(classes, name) for name in columns}
    for name in columns:
        if named[name] not in classes:
            report.problems.append(f"{path}: column '{name}' is not a class of the site ({', '.join(classes)}): "
                                   "left out")
    return path, [(line, {"image": row["image"], "class": named[name], "present": row[name],
                          "author": row[by] if by else ""})
                  for line, row in rows for name in columns if named[name] in classes and row[name]]


def site_names(store: SiteStore) -> dict[str, str]:
    """Every name a mask file or a table row may give an image by, with the image's id: the id itself, and
    the name of the file it was imported from without its suffix (``Bild_ä 1`` for the id ``Bild_a_1-…``, as
    the clinic's tables and mask files spell it; also for ids an earlier version spelled another way)."""
    records = store.records()
    names = {record.id: record.id for record in records}
    for record in records:
        if record.source:
            names.setdefault(image_stem(record.source), record.id)
    return names


def resolve_image(names: dict[str, str], name: str) -> str | None:
    """The id of the image a table row, or a mask file's stem, names (None: not in the site): by its id, or
    by the file's name, also given with its folder, on Windows too (``C:\\scans\\case-07.png``)."""
    file_name = PureWindowsPath(name).name or name  # '/' separates there as well
    return names.get(name) or names.get(image_stem(file_name)) or names.get(image_id_from_path(file_name))


def _rows_of_site_images(table: tuple[Path, TableRows], names: dict[str, str], classes: tuple[str, ...],
                         report: ImportReport) -> Iterator[tuple[str, str, dict[str, str]]]:
    """A box or tag table's rows as (``file:line``, image id, row) with the row's class spelled as the site
    spells it; a row naming an image the site does not hold is a problem of the report, not a row."""
    path, rows = table
    for line, row in rows:
        where = f"{path}:{line}"
        image_id = resolve_image(names, row["image"])
        if image_id is None:
            report.problems.append(f"{where}: image '{row['image']}' is not in the site")
            continue
        yield where, image_id, {**row, "class": _site_class(classes, row["class"])}


def _site_class(classes: tuple[str, ...], typed: str) -> str:
    """The site's class a table means: ``Lesion`` or ``LESION`` for ``lesion``, as a spreadsheet capitalises
    it, if only one class matches that way; otherwise as typed (the store refuses an unknown class)."""
    if typed in classes:
        return typed
    matches = [c for c in classes if c.casefold() == typed.casefold()]
    return matches[0] if len(matches) == 1 else typed


def _number(text: str) -> float:
    """A table's number, also with a decimal comma (``10,5``: what Excel writes where the comma is the
    decimal mark, in the semicolon-separated tables it saves there)."""
    return float(re.sub(r"^(\s*[-+]?\d+),(\d+\s*)$", r"\1.\2", text))


def masks_beside_images(files: list[Path]) -> list[Path]:
    """The files that are, by name, another file's mask (``x_mask.png`` beside ``x.png``: BUSI's layout)."""
    stems = {image_stem(p) for p in files}
    return [p for p in files if (named := MASK_NAME.match(image_stem(p))) and named["image"] in stems]


def _mask_target(stem: str, names: dict[str, str]) -> str | None:
    """The image a mask file belongs to: the one with the same stem, or with the stem less a mask suffix."""
    if (target := resolve_image(names, stem)) is not None:
        return target
    named = MASK_NAME.match(stem)
    return resolve_image(names, named["image"]) if named else None


Drawn = dict[str, tuple[str | None, str | None]]  # a mask file's name → who drew it and when (masks.csv)


def _masks_table(masks: Path) -> tuple[Path, TableRows] | None:
    """The ``masks.csv`` that ``site export`` writes beside its ``masks/`` folder (:data:`export.MASK_HEADER`),
    read with the other tables, before anything is imported; None without one, or for another tool's table of
    that name."""
    table = masks.parent / MASKS_TABLE
    if not table.is_file():
        return None
    header, rows = _read_table(table, ("image", "file"))
    return (table, rows) if tuple(header) == MASK_HEADER else None


def _drawn_by(masks_table: tuple[Path, TableRows], report: ImportReport) -> Drawn:
    """Who drew each mask of an export, and when, by mask file name. A row that cannot be read is a problem,
    and its mask takes the import's author and time."""
    table, rows = masks_table
    drawn: Drawn = {}
    for line, row in rows:
        try:
            drawn[PureWindowsPath(row["file"]).name] = (row["author"] or None,
                                                        _annotated_at(row, f"{table}:{line}"))
        except InputError as exc:
            report.problems.append(f"{exc}; its mask is imported with this import's author and time")
    return drawn


def _set_masks(store: SiteStore, target: str, paths: list[Path], author: str | None, replace: bool,
               report: ImportReport, drawn: Drawn | None = None) -> None:
    """Store one image's mask files (several, a lesion each, are joined), counted in ``report``.

    An all-background mask (BUSI's "normal" images) says that no class is present: it is stored as
    every class tagged absent, the store's form of that fact (it keeps masks with foreground only). A mask
    the site holds as the files give it is left as it is; one the site changed after the files were written
    (a clinician's correction in napari) is kept unless ``replace``, and noted (:func:`_kept_by_site`).
    ``drawn``: who drew each mask and when, as ``site export``'s masks.csv says (of a mask of one file)."""
    record = store.record(target)
    classes = len(store.config.classes)
    joined = np.maximum.reduce([validate_mask(read_mask_file(p, classes), (record.height, record.width), classes, p)
                                for p in paths])
    by, at = drawn.get(paths[0].name, (None, None)) if drawn is not None and len(paths) == 1 else (None, None)
    _set_mask(store, record, joined, max(paths, key=lambda p: p.stat().st_mtime), by or author, replace, report, at)


def _set_mask(store: SiteStore, record: ImageRecord, joined: np.ndarray, source: Path, author: str | None,
              replace: bool, report: ImportReport, created_at: str | None = None) -> None:
    """Store a mask read from ``source`` (the newest of its files), as :func:`_set_masks` says."""
    target = record.id
    held = store.read_mask(target) if record.has_mask else None
    drawn = store.mask_author(target) if held is not None else None
    if (np.array_equal(held, joined) if held is not None
            else not joined.any() and all(store.tags(target).get(c) is False for c in store.config.classes)):
        report.unchanged += 1  # the same mask, or "no lesion" told already
        return
    if drawn is not None and not replace and (kept := _kept_by_site(source, f"the mask of '{target}'", *drawn)):
        report.kept.append(kept)
        return
    if joined.any():
        store.set_mask(target, joined, author=author, created_at=created_at)
        report.masks += 1
        return
    if held is not None:
        store.clear_mask(target)  # the file now says "no lesion"
    for name in store.config.classes:
        _set_tag(store, target, name, False, source, author, replace, report, count=False, created_at=created_at)
    report.empty_masks += 1


def _set_boxes(store: SiteStore, image_id: str, boxes: list[Box], source: Path, author: str | None, replace: bool,
               report: ImportReport) -> None:
    """Set an image's boxes (checked) as ``source`` gives them, unless the site holds them already (unchanged)
    or changed them after ``source`` was written (kept, said: :func:`_kept_by_site`)."""
    held = store.boxes(image_id)
    if sorted(b.key for b in held) == sorted(b.key for b in boxes):
        report.unchanged += 1
        return
    newest = max(held, key=lambda b: b.created_at, default=None)
    if newest is not None and not replace and (kept := _kept_by_site(
            source, f"the boxes of '{image_id}'", newest.author, newest.created_at)):
        report.kept.append(kept)
        return
    store.set_boxes(image_id, boxes, author=author)
    report.boxes += len(boxes)


def _add_coco(store: SiteStore, coco: CocoFile, names: dict[str, str], author: str | None, replace: bool,
              report: ImportReport) -> Iterator[ImportProgress]:
    """A COCO file's annotations as the masks and boxes of the site's images (the rules: :mod:`coco`),
    yielding after each image. An image the site does not hold, of another size, or an annotation of a
    category that is not a site class is a problem of the report; the rest is imported."""
    classes = store.config.classes
    report.problems.extend(coco.problems)
    left_out: dict[str, int] = defaultdict(int)
    report.coco_unannotated += coco.unannotated
    for n, image in enumerate(coco.images, start=1):
        try:
            _add_coco_image(store, coco.path, image, names, left_out, author, replace, report)
        except InputError as exc:
            report.problems.append(str(exc))
        yield ImportProgress("annotations", n, len(coco.images))
    report.problems.extend(f"{coco.path}: category '{name}' is not a class of the site ({', '.join(classes)}): its "
                           f"{count} annotation(s) left out" for name, count in left_out.items())


def _add_labelme(store: SiteStore, files: list[Path], names: dict[str, str], author: str | None, replace: bool,
                 report: ImportReport) -> Iterator[ImportProgress]:
    """LabelMe's files beside the images (:mod:`labelme`) as the images' masks and boxes, by COCO's rules,
    yielding after each file; a file that cannot be read, or a label that is not a site class, is a problem."""
    left_out: dict[str, int] = defaultdict(int)
    for n, path in enumerate(files, start=1):
        try:
            image, unread = read_labelme(path)
            report.problems.extend(unread)
            if image.annotations:
                _add_coco_image(store, path, image, names, left_out, author, replace, report)
        except InputError as exc:
            report.problems.append(str(exc))
        yield ImportProgress("annotations", n, len(files))
    classes = store.config.classes
    report.problems.extend(f"{files[0].parent}: LabelMe label '{name}' is not a class of the site "
                           f"({', '.join(classes)}): its {count} shape(s) left out" for name, count in left_out.items())


def _add_coco_image(store: SiteStore, path: Path, image: CocoImage, names: dict[str, str], left_out: dict[str, int],
                    author: str | None, replace: bool, report: ImportReport) -> None:
    """One COCO image's annotations of site classes as its mask or its boxes (``left_out`` counts the others)."""
    classes = store.config.classes
    image_id = resolve_image(names, image.file_name)
    if image_id is None:
        raise InputError(path, f"image '{image.file_name}' is not in the site")
    record = store.record(image_id)
    if (record.height, record.width) != (image.height, image.width):
        raise InputError(path, f"'{image.file_name}' is {image.height}×{image.width} in the file and "
                               f"{record.height}×{record.width} in the site ('{image_id}'): its annotations were "
                               "drawn on another image (or the tool turned a photo by its EXIF orientation)")
    unread = [c for c in image.unread if c is None or _site_class(classes, c) in classes]
    if unread:  # as a refused box row: the readable annotations alone would train that lesion as background
        of = "of a site class" + (" or without a label" if None in unread else "")
        raise InputError(path, f"'{image.file_name}': {len(unread)} of its annotations {of} cannot be read (listed "
                               "above), so its other annotations alone would train that lesion as background: none "
                               "of them imported")
    of_classes = []
    for annotation in image.annotations:
        if (name := _site_class(classes, annotation.category)) in classes:
            of_classes.append((annotation, name))
        else:
            left_out[annotation.category] += 1
    if not of_classes:
        return
    try:
        if all(annotation.is_region for annotation, _ in of_classes):
            mask = region_mask([a for a, _ in of_classes], [classes.index(c) + 1 for _, c in of_classes],
                               image.height, image.width)
            _set_mask(store, record, mask, path, author, replace, report)
            return
        boxes = [_checked_box(store, image_id, annotation, name, image) for annotation, name in of_classes]
    except ValueError as exc:
        raise InputError(path, f"'{image.file_name}': {exc}") from None
    _set_boxes(store, image_id, boxes, path, author, replace, report)


def _checked_box(store: SiteStore, image_id: str, annotation: CocoAnnotation, name: str, image: CocoImage) -> Box:
    """The annotation's box, checked against the site's image; ValueError naming the annotation."""
    try:
        return store.check_box(image_id, Box(name, *annotation.box(image.height, image.width)))
    except InputError as exc:
        raise ValueError(f"{annotation.where}: {exc.reason}") from None


def _annotated_at(row: dict[str, str], where: str) -> str | None:
    """A table row's ``annotated_at`` (``site export`` writes it) in the store's form; None: no time given,
    the import's is taken. InputError naming the row: not a time with its zone, or one in the future."""
    text = (row.get("annotated_at") or "").strip()
    return annotation_time(text, where) if text else None


def _disagreement(image_id: str, class_name: str, rows: list[tuple[str, bool, str]]) -> str:
    """A tags table's rows that tag one image's class both present and absent (several readers of one image, as
    VinDr-CXR's labels are): which says what, since no row can be taken over another without a rule."""
    def lines(value: bool) -> str:
        said = [where.rsplit(":", 1)[1] + (f" ({by})" if by else "") for where, other, by in rows if other == value]
        return f"line{'s' if len(said) > 1 else ''} {', '.join(said)}"

    return (f"{rows[0][0].rsplit(':', 1)[0]}: the rows for {class_name} of '{image_id}' disagree (present: "
            f"{lines(True)}; absent: {lines(False)}): no tag taken from them; leave one row per image and class (a "
            "consensus read, or the majority)")


def _set_tag(store: SiteStore, image_id: str, class_name: str, present: bool, source: Path | str,
             author: str | None, replace: bool, report: ImportReport, where: str | None = None,
             count: bool = True, created_at: str | None = None) -> None:
    """Tag a class of an image as ``source`` (a table, a mask file) says, unless the site holds that tag
    already (unchanged) or set it otherwise after ``source`` was written (kept, said: :func:`_kept_by_site`);
    ``created_at``: when it was tagged, as the table says (else now)."""
    store.config.class_index(class_name, f"tag on '{image_id}'")  # an unknown class: refused as set_tag refuses it
    held = {name: rest for name, *rest in store.tag_rows(image_id)}.get(class_name)
    if held is not None and held[0] == present:
        report.unchanged += count
        return
    if held is not None and not replace and (
            kept := _kept_by_site(Path(source), f"the tag {class_name} of '{image_id}'", *held[1:], where=where)):
        report.kept.append(kept)
        return
    store.set_tag(image_id, class_name, present, author=author, created_at=created_at)
    report.tags += count


def _kept_by_site(source: Path, what: str, author: str, written_at: str, where: str | None = None) -> str | None:
    """A note of an annotation of the site kept over a file's: the site's was written after the file (a
    clinician's correction in napari since the folder was exported), so a re-import must not undo it; None
    when the file is the newer. ``site import --replace`` takes the file's all the same."""
    try:
        newer = datetime.fromisoformat(written_at).timestamp() > source.stat().st_mtime
    except (ValueError, OSError):
        return None
    if not newer:
        return None
    return f"{where or source}: {what}, changed in the site by {author} at {written_at}"


@dataclass(frozen=True)
class ImportSources:
    """An import's inputs, checked and its tables read before anything is imported (or a new site is
    created for them): a typo in ``--masks`` or a table Excel saved in another encoding does not leave the
    images imported without their masks, boxes or tags."""

    images: Path | None  # None: annotations for the images the site already holds
    masks: Path | None
    boxes: tuple[Path, TableRows] | None
    tags: tuple[Path, TableRows] | None
    coco: CocoFile | None = None
    drawn: tuple[Path, TableRows] | None = None  # export's masks.csv beside the masks: who drew each, when
    key: dict[str, str] | None = None  # a pseudonymised export's key: its names → the site's image ids


def read_sources(images: str | Path | None, masks: str | Path | None = None, boxes_csv: str | Path | None = None,
                 tags_csv: str | Path | None = None, coco_json: str | Path | None = None,
                 key: str | Path | None = None) -> ImportSources:
    """Refuse a missing folder or file, or a table that cannot be read; return the sources to import.
    Without ``images`` the masks and tables annotate the images the site already holds (a radiologist's
    boxes delivered after the images, whose folder may be gone by then). ``key``: the key of a pseudonymised
    export (``site export --pseudonymise``), whose names the masks and tables then use: annotations made
    elsewhere on that export come back to the site's images."""
    if images is None and masks is None and boxes_csv is None and tags_csv is None and coco_json is None:
        raise InputError("--images", "nothing to import: give --images, and/or --masks, --boxes, --tags or --coco "
                                     "for the images the site already holds")
    for path, folder in ((images, True), (masks, True), (boxes_csv, False), (tags_csv, False), (coco_json, False)):
        if path is not None and not (Path(path).is_dir() if folder else Path(path).is_file()):
            raise InputError(path, "folder not found" if folder else "file not found")
    for folder in (images, masks):
        if folder is not None and next(iter_image_files(Path(folder)), None) is None:
            raise InputError(folder, no_images_reason(Path(folder)))
    boxes = (Path(boxes_csv), _box_rows(Path(boxes_csv), *_read_table(Path(boxes_csv), ("image",), _BOX_HEADERS))
             ) if boxes_csv is not None else None
    tags = (Path(tags_csv), _tag_rows(Path(tags_csv), *_read_table(Path(tags_csv), ("image",), _TAG_HEADERS))
            ) if tags_csv is not None else None
    if key is not None and images is not None:
        raise InputError("--key", "a pseudonymised export's key names the site's own images: import the annotations "
                                  "made on the export without --images (the site holds its images)")
    return ImportSources(Path(images) if images is not None else None, Path(masks) if masks is not None else None,
                         boxes, tags, read_coco(coco_json) if coco_json is not None else None,
                         _masks_table(Path(masks)) if masks is not None else None,
                         _read_key(Path(key)) if key is not None else None)


def _read_key(path: Path) -> dict[str, str]:
    """A pseudonymised export's key (:data:`export.KEY_HEADER`): its names → the site's image ids; refused, naming
    the file, when it is not such a key."""
    if not path.is_file():
        raise InputError(path, "file not found")
    header, rows = _read_table(path, ())  # any header: the key's own is checked below, and said as the key's
    if tuple(header) != KEY_HEADER:
        raise InputError(path, f"is not the key of a pseudonymised export (header {','.join(KEY_HEADER)}: "
                               "site export --pseudonymise writes it to the site's logs/ folder)")
    return {row["name"]: row["image"] for _, row in rows}


def read_annotation_table(path: str | Path) -> ImportSources:
    """A box or a tag table for the images a site holds (napari's Import annotations), told apart by its header:
    a box table has a box's corners (``y0, x0, y1, x1`` or another layout of them: :func:`_box_rows`); any
    other is read as tags (``image,class,present`` or a column per class). Refused, naming the file, as
    :func:`read_sources` refuses it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    if path.suffix.lower() == ".json":
        return ImportSources(None, None, None, None, read_coco(path))
    header, rows = _read_table(path, ("image",), f"{','.join(BOX_COLUMNS)} for boxes; {_TAG_HEADERS} for tags")
    if _box_layout(header) is not None:
        return ImportSources(None, None, (path, _box_rows(path, header, rows)), None)
    return ImportSources(None, None, None, (path, _tag_rows(path, header, rows)))


@dataclass(frozen=True)
class ImportProgress:
    """One step of an import: ``done`` of ``total`` items of ``stage`` ("images", then "masks")."""

    stage: str
    done: int
    total: int


ImportSteps = Generator[ImportProgress, None, ImportReport]


def _add_images(store: SiteStore, files: list[Path], report: ImportReport,
                author: str | None) -> Iterator[ImportProgress]:
    """Add image files one by one, yielding after each: an import stopped between two files keeps every
    image it stored whole, and importing again adds the rest.

    A file the site holds already (the same file, also named by another path: a relative one, another
    working folder, a drive letter) is skipped; its pixels are compared with the site's copy when the file
    changed after that copy was made, or when only its name matches an image of the site. A file of other
    pixels under a held name is a problem of the report, saying which image and how to replace it: the site
    keeps its copy, whose annotations were drawn on those pixels."""
    records = {record.id: record for record in store.records()}
    # sources recorded as typed (relative: before this version) name no file for sure: those go by name and pixels
    by_source = {_file_key(record.source): record for record in records.values() if os.path.isabs(record.source)}
    names = site_names(store)
    by_pixels: dict[str, str] | None = None  # digest → the first image of those pixels: read once something is added
    for n, path in enumerate(files, start=1):
        record = by_source.get(_file_key(path))
        try:
            if record is not None and not _changed_since_import(store, record, path):
                report.images_already_present += 1
            elif (held := record or records.get(resolve_image(names, path.name) or "")) is not None:
                if np.array_equal(read_image(path), store.read_image(held.id)):
                    report.images_already_present += 1
                else:
                    report.problems.append(_other_pixels(store, held, path, same_file=held is record))
            else:
                image_id = store.add_image(path, author=author)
                report.images_added += 1
                if by_pixels is None:
                    by_pixels = {}
                    for held_id, held_digest in store.pixel_digests().items():  # in import order: first is first
                        by_pixels.setdefault(held_digest, held_id)
                first = by_pixels.setdefault(store.pixel_digests([image_id])[image_id], image_id)
                if first != image_id:
                    report.copies.append((path, first))
                report.colour_in_grey += (store.config.channels == 1 and store.record(image_id).channels == 3
                                          and holds_colour(store.read_image(image_id)))  # not grey saved as RGB
                if exif_orientation(path) is not None:
                    report.turned.append(path)
                report.with_spacing += store.spacing(image_id) is not None
                records[image_id] = store.record(image_id)  # a later file of its name is compared with it
                names.setdefault(image_id, image_id)
                names.setdefault(image_stem(path), image_id)
        except InputError as exc:
            report.problems.append(str(exc))
        yield ImportProgress("images", n, len(files))


def _file_key(path: str | Path) -> str:
    """A file's path as the comparison of two imports needs it: absolute, in the system's letter case."""
    return os.path.normcase(os.path.abspath(path))


def _changed_since_import(store: SiteStore, record: ImageRecord, path: Path) -> bool:
    """Whether ``path`` was written after the site's copy of it was made (then its pixels are compared)."""
    try:
        return path.stat().st_mtime > (store.root / record.file).stat().st_mtime
    except FileNotFoundError:  # the site's copy is gone: its problem, said by `site info`
        return False


def _other_pixels(store: SiteStore, held: ImageRecord, path: Path, same_file: bool) -> str:
    remove = f"fedmix-engine site remove {store.root} {held.id}"
    if same_file:
        return (f"{path}: changed since it was imported: its pixels are not those of the site's copy '{held.id}', "
                "which the site keeps with its annotations; to import the new file, remove the old copy first "
                f"({remove}, or Annotate's Remove image) and import again")
    return (f"{path}: the site already holds another image of this name, '{held.id}'"
            + (f" (imported from {held.source})" if held.source else "")
            + f"; rename this file to import it, or, if it replaces that image, remove the old one first ({remove})")


def _add_masks(store: SiteStore, files: list[Path], names: dict[str, str], report: ImportReport,
               author: str | None, replace: bool = False, drawn: Drawn | None = None) -> Iterator[ImportProgress]:
    """Store mask files as the masks of the images their names give (:func:`_mask_target`), an image's
    several files joined, yielding after each image."""
    by_image: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        stem = image_stem(path)
        target = _mask_target(stem, names)
        if target is None:
            report.problems.append(f"{path}: no image with the same name (stem '{stem}') in the site")
            continue
        by_image[target].append(path)
    for n, (target, paths) in enumerate(by_image.items(), start=1):
        try:
            _set_masks(store, target, paths, author, replace, report, drawn)
        except InputError as exc:
            report.problems.append(str(exc))
        yield ImportProgress("masks", n, len(by_image))


def import_files_steps(store: SiteStore, paths: list[str | Path], author: str | None = None) -> ImportSteps:
    """Import the given image files, as steps a GUI worker can show and stop. Files chosen together with the
    images they are named the masks of (all of a BUSI folder: x.png and x_mask.png) are taken as masks: they
    were imported as images of their own."""
    report = ImportReport()
    files = [Path(p) for p in paths]
    beside = masks_beside_images(files)
    yield from _add_images(store, [p for p in files if p not in beside], report, author)
    if beside:
        yield from _add_masks(store, beside, site_names(store), report, author)
    write_problem_log(store, report)
    return report


def import_folder(store: SiteStore, images: str | Path, masks: str | Path | None = None,
                  boxes_csv: str | Path | None = None, tags_csv: str | Path | None = None,
                  author: str | None = None,
                  progress: Callable[[ImportProgress], None] | None = None) -> ImportReport:
    """Import images, masks (matched by file stem) and box/tag tables into ``store``."""
    return run_steps(import_folder_steps(store, images, masks, boxes_csv, tags_csv, author), progress)


def import_folder_steps(store: SiteStore, images: str | Path, masks: str | Path | None = None,
                        boxes_csv: str | Path | None = None, tags_csv: str | Path | None = None,
                        author: str | None = None) -> ImportSteps:
    """:func:`import_folder` as steps (one per image file, then one per image's masks) that return the
    report; a missing source or an unreadable table is refused here, before the first step."""
    return import_sources_steps(store, read_sources(images, masks, boxes_csv, tags_csv), author)


def _boxes_with_class(table: tuple[Path, TableRows], store: SiteStore, report: ImportReport
                      ) -> tuple[Path, TableRows]:
    """A box table's rows that hold a box, each with its class. A row whose corners are all empty is no box
    (VinDr-CXR's "No finding", RSNA's images without pneumonia): counted, not refused. A table without a class
    column gives a one-class site's boxes its class; with more classes it cannot say which: refused, said once."""
    path, rows = table
    boxed = [(line, row) for line, row in rows if any(_corner_texts(row))]
    report.rows_without_box += len(rows) - len(boxed)
    if boxed and "class" not in boxed[0][1]:
        classes = store.config.classes
        if len(classes) > 1:
            report.problems.append(f"{path}: no class column, and the site has {len(classes)} classes "
                                   f"({', '.join(classes)}): add a column 'class' naming each box's class; no box "
                                   "of the table imported")
            return path, []
        boxed = [(line, {**row, "class": classes[0]}) for line, row in boxed]
    return path, boxed


def import_sources_steps(store: SiteStore, sources: ImportSources, author: str | None = None,
                         replace: bool = False) -> ImportSteps:
    """The steps importing sources already read by :func:`read_sources`. An annotation the site changed after
    its file or table was written is kept (said in the report) unless ``replace``."""
    images, masks = sources.images, sources.masks
    report = ImportReport(read_images=images is not None)
    found = image_files(images, videos=True) if images is not None else []
    files = [p for p in found if not is_video_path(p)]
    report.problems.extend(str(InputError(p, NOT_IMPORTED)) for p in found if is_video_path(p))
    # one folder for both (BUSI keeps "benign (1)_mask.png" beside "benign (1).png"): the masks are not images,
    # also without --masks (they were imported as images of their own, unlabelled, as napari's import never did)
    same_folder = images is not None and (masks is None or masks.resolve() == images.resolve())
    beside = masks_beside_images(files) if same_folder else []
    yield from _add_images(store, [p for p in files if p not in beside], report, author)
    names = site_names(store)
    if sources.key is not None:  # the export's names first: they are what its annotations were made under
        held = set(store.image_ids())
        names.update({name: image_id for name, image_id in sources.key.items() if image_id in held})

    if masks is not None or beside:
        drawn = _drawn_by(sources.drawn, report) if sources.drawn is not None and not same_folder else None
        yield from _add_masks(store, beside if same_folder else image_files(masks), names, report, author, replace,
                              drawn)

    if sources.boxes is not None:
        grouped: dict[str, list[Box]] = defaultdict(list)
        refused: dict[str, int] = defaultdict(int)  # an image's refused rows: none of its boxes is imported
        other_classes: dict[str, int] = defaultdict(int)  # rows of classes the site does not annotate: left out
        for where, image_id, row in _rows_of_site_images(_boxes_with_class(sources.boxes, store, report), names,
                                                         store.config.classes, report):
            if row["class"] not in store.config.classes:  # VinDr's 14 findings for a site of one: not a refusal,
                other_classes[row["class"]] += 1  # as the site's own boxes stay exhaustive for its classes
                continue
            try:
                corners = _box_corners(row)
            except ValueError:
                report.problems.append(f"{where}: box corners must be numbers, got {_corner_texts(row)}")
                refused[image_id] += 1
                continue
            try:  # checked here, row by row, so a refusal names its line; kept checked (integer corners)
                box = store.check_box(image_id, Box(row["class"], *corners, author=(row.get("author") or "").strip(),
                                                    created_at=_annotated_at(row, where)))
            except InputError as exc:
                report.problems.append(f"{where}: {exc.reason}")
                refused[image_id] += 1
                continue
            grouped[image_id].append(box)
        report.problems.extend(f"{sources.boxes[0]}: class '{name}' is not a class of the site "
                               f"({', '.join(store.config.classes)}): its {count} row(s) left out"
                               for name, count in other_classes.items())
        for image_id, count in refused.items():
            report.problems.append(f"{sources.boxes[0]}: none of the boxes of '{image_id}' imported, as {count} of "
                                   "its rows were refused (boxes are exhaustive: a lesion left out would train as "
                                   "background); the site keeps the boxes it held")
        for image_id, boxes in grouped.items():
            if image_id not in refused:
                _set_boxes(store, image_id, boxes, sources.boxes[0], author, replace, report)

    if sources.coco is not None:
        yield from _add_coco(store, sources.coco, names, author, replace, report)

    if images is not None and (drawn := [p for p in sorted(images.iterdir()) if is_labelme_file(p)]):
        yield from _add_labelme(store, drawn, names, author, replace, report)

    if sources.tags is not None:
        tags = _tags_by_row(sources.tags, store.config.classes, report)
        told: dict[tuple[str, str], list[tuple[str, bool, str]]] = defaultdict(list)  # (image, class) → its rows
        at: dict[str, str | None] = {}  # each row's annotated_at
        for where, image_id, row in _rows_of_site_images(tags, names, store.config.classes, report):
            value = row["present"].lower()
            try:
                if value not in _TRUE | _FALSE:
                    raise InputError(where, f"{row['class']}: must be present or absent (yes/no, 1/0), got "
                                            f"'{row['present']}'")
                at[where] = _annotated_at(row, where)
            except InputError as exc:
                report.problems.append(str(exc))
                continue
            told[image_id, row["class"]].append((where, value in _TRUE, (row.get("author") or "").strip()))
        for (image_id, class_name), rows in told.items():
            where, present, by = rows[0]
            if any(other != present for _, other, _ in rows):
                report.problems.append(_disagreement(image_id, class_name, rows))
                continue
            try:
                _set_tag(store, image_id, class_name, present, sources.tags[0], by or author, replace, report,
                         where=where, created_at=at[where])
            except InputError as exc:
                report.problems.append(f"{where}: {exc.reason}")
    write_problem_log(store, report)
    return report
