"""The SiteStore: one site's images and annotations in a folder a clinician can back up.

Layout (see ``docs/site-format.md``)::

    site/
      site.json          # name, classes, channels, format version
      annotations.db     # SQLite: images, masks, boxes, tags (kind, class, author, time)
      images/<id>.tif    # each image as imported (validated, never altered)
      masks/<id>.tif     # uint8 label image, 0 = background, k = k-th class

Durability: files are replaced atomically (temporary file + fsync + rename) and every
metadata change is one SQLite transaction (WAL while open for writing, ``synchronous=FULL``).
A save that has returned survives ``kill -9``; a save interrupted half-way leaves the previous
state. A closed site is one database file without WAL side files, readable from a read-only folder.

Supervision is per image: an image with a mask is *mask*-supervised; otherwise with boxes,
*box*-supervised (boxes are exhaustive: a class with no box on a box-annotated image is
background); otherwise with tags, *tag*-supervised; otherwise unlabelled.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import getpass
import hashlib
import json
import os
import re
import sqlite3
import threading
import time
import unicodedata
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np

from fedmix_engine.atomic import atomic_write_bytes, is_interrupted_write, make_folder
from fedmix_engine.data.imageio import (
    image_stem,
    normalise_image,
    pixel_digest,
    read_array,
    read_image,
    tiff_bytes,
    validate_image,
    validate_mask,
)
from fedmix_engine.data.network_share import is_network_path
from fedmix_engine.data.pixel_spacing import checked_spacing, file_spacing, tiff_spacing
from fedmix_engine.errors import InputError
from fedmix_engine.json_values import is_int, parse_json

FORMAT_VERSION = 1
CONFIG_FILE = "site.json"
DB_FILE = "annotations.db"
LOGS = "logs"  # the site's plain-text records: import problem logs, export keys (site remove scrubs them)
_DAMAGED = "it is damaged or not a site's database; restore the site folder from a backup"
Supervision = Literal["mask", "box", "tag", "none"]
_ID_MAX = 128
_ID_PATTERN = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{_ID_MAX - 1}}}$")
# letters and digits of any language ('Läsion', 'lésion', '病变'), then also spaces, '-', '_' and the '/', '(',
# ')', '.' and '+' of datasets' and reports' classes ('Nodule/Mass', 'grade 2+'); never ',' or ';' (lists and
# tables split on them) or '\' (a DICOM SEG's segment label cannot hold it)
_CLASS_PATTERN = re.compile(r"^[^\W_][\w /().+-]{0,63}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY, file TEXT NOT NULL, source TEXT NOT NULL,
    height INTEGER NOT NULL, width INTEGER NOT NULL, channels INTEGER NOT NULL, dtype TEXT NOT NULL,
    author TEXT NOT NULL, created_at TEXT NOT NULL, seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS masks (
    image_id TEXT PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
    file TEXT NOT NULL, author TEXT NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS boxes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    class_name TEXT NOT NULL, y0 INTEGER NOT NULL, x0 INTEGER NOT NULL, y1 INTEGER NOT NULL, x1 INTEGER NOT NULL,
    author TEXT NOT NULL, created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS boxes_by_image ON boxes(image_id);
CREATE TABLE IF NOT EXISTS tags (
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    class_name TEXT NOT NULL, present INTEGER NOT NULL,
    author TEXT NOT NULL, created_at TEXT NOT NULL,
    PRIMARY KEY (image_id, class_name)
);
CREATE TABLE IF NOT EXISTS removals (image_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS digests (
    image_id TEXT PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE, sha256 TEXT NOT NULL
);
"""

_ADDED_TABLES = ("removals", "digests")  # added after the first release (see _query_added)


@functools.cache
def _schema_columns() -> dict[str, set[str]]:
    """Each table's columns, as :data:`_SCHEMA` creates them."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(_SCHEMA)
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT "
                                               "LIKE 'sqlite_%'")]
        return {table: {row[1] for row in db.execute(f"PRAGMA table_info({table})")} for table in tables}
    finally:
        db.close()


def refuse_site_folder(folder: str | Path, what: str) -> None:
    """An output folder that is a site's own (it holds ``site.json``) is refused: ``what`` (a run, masks)
    would mix with the site's files, where nothing reads them and ``site info`` would not list them."""
    if (Path(folder) / CONFIG_FILE).is_file():
        raise InputError(folder, f"is a site folder ({CONFIG_FILE}): write {what} to a folder of its own")


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def annotation_time(text: str, where: str | Path, now: Callable[[], str] = _utc_now) -> str:
    """An annotation's time as a table gives it (``site export``'s ``annotated_at``), in the store's form: ISO
    8601 with its zone, in UTC to the second. Refused: no zone (whose 10:00?), or later than now by more than
    clocks differ (a wrong clock's time would make the annotation look newer than any file, and keep it from
    every later import)."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(where, f"annotated_at '{text}' is not an ISO 8601 time (2026-11-30T10:00:00+00:00)") \
            from None
    if when.tzinfo is None:
        raise InputError(where, f"annotated_at '{text}' has no time zone (add +00:00 for UTC, or the offset)")
    if when > datetime.fromisoformat(now()) + timedelta(minutes=10):
        raise InputError(where, f"annotated_at '{text}' is in the future (a wrong clock where it was written?)")
    return when.astimezone(UTC).isoformat(timespec="seconds")


def log_stamp(seconds: float) -> str:
    """The UTC time in the names of the files in a site's ``logs/`` (``import-20261130T153828Z-problems.txt``)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(seconds))


def _default_author() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


@dataclass(frozen=True)
class SiteConfig:
    """A site's fixed settings: its name and the classes it annotates (background is implicit)."""

    name: str
    classes: tuple[str, ...]
    channels: int = 1
    format_version: int = FORMAT_VERSION

    def class_index(self, class_name: str, where: str = "class") -> int:
        """1-based label value of ``class_name`` (0 is background)."""
        try:
            return self.classes.index(class_name) + 1
        except ValueError:
            raise InputError(
                where, f"unknown class '{class_name}'; this site's classes are: {', '.join(self.classes)}"
            ) from None

    def to_json(self) -> str:
        return json.dumps(
            {"name": self.name, "classes": list(self.classes), "channels": self.channels,
             "format_version": self.format_version},
            indent=2,
        ) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> SiteConfig:
        try:
            raw = parse_json(path.read_text())
            config = cls(str(raw["name"]), tuple(raw["classes"]), int(raw.get("channels", 1)),
                         int(raw.get("format_version", FORMAT_VERSION)))
        except FileNotFoundError:
            raise InputError(path.parent, f"not a site folder (no {CONFIG_FILE}); create one with "
                             "'fedmix-engine site init'") from None
        except (ValueError, KeyError, TypeError) as exc:
            why = f"no {exc}" if isinstance(exc, KeyError) else str(exc)  # a bare KeyError says only "'name'"
            raise InputError(path, f"corrupt site config ({why}): restore it from a backup (it names the site and "
                             "its classes in label order; the images and annotations beside it are unaffected)") \
                from exc
        if config.format_version > FORMAT_VERSION:
            raise InputError(path, f"site format {config.format_version} is newer than this "
                             f"fedmix-engine understands ({FORMAT_VERSION}); upgrade napari-fedmix")
        check_class_names(config.classes, str(path))
        return config


def _check_site_name(name: str) -> None:
    """A site's name is a label, but simulate and make-federation use it as a folder (``eval/<name>/``), so it
    must stay one folder: no separator, not ``.`` or ``..``, not blank."""
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\") or not name.isprintable():
        raise InputError("name", f"site name {name!r} must be one folder's name (no / or \\, not . or .., "
                                 "not blank): simulate finds a site's evaluation images in eval/<name>/")


def check_class_names(classes: Iterable[str], where: str) -> tuple[str, ...]:
    """A site's class names, in label order; a federation's ``--class-names`` must pass too, or no site joins."""
    classes = tuple(classes)
    if not classes:
        raise InputError(where, "a site needs at least one class, e.g. --classes lesion")
    for name in classes:
        if not _CLASS_PATTERN.fullmatch(name):
            raise InputError(where, f"class name '{name}' must start with a letter or digit and use "
                             "letters, digits, spaces and - _ / ( ) . + (max 64)")
        if name.lower() == "background":
            raise InputError(where, "'background' is implicit (label 0); do not list it as a class")
    if len(set(classes)) != len(classes):
        raise InputError(where, f"duplicate class names in {list(classes)}")
    if len(classes) > 255:
        raise InputError(where, "at most 255 classes (masks are 8-bit)")
    return classes


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel coordinates, half-open: rows y0..y1-1, columns x0..x1-1."""

    class_name: str
    y0: int
    x0: int
    y1: int
    x1: int
    id: int | None = None
    author: str = ""
    created_at: str = ""

    @property
    def key(self) -> tuple[str, int, int, int, int]:
        """What the box says (class and corners), without its id, author and time: one box saved twice
        compares equal, so a save or an import of the same boxes writes nothing."""
        return self.class_name, self.y0, self.x0, self.y1, self.x1


@dataclass(frozen=True)
class ImageRecord:
    """One image with a summary of its supervision."""

    id: str
    file: str
    height: int
    width: int
    channels: int
    dtype: str
    has_mask: bool
    boxes: int
    tags: dict[str, bool] = field(default_factory=dict)
    source: str = ""

    @property
    def supervision(self) -> Supervision:
        if self.has_mask:
            return "mask"
        if self.boxes:
            return "box"
        if self.tags:
            return "tag"
        return "none"


def image_id_from_path(path: str | Path) -> str:
    """The default image id: the file's name without its image suffix (:func:`image_stem`), as
    :func:`image_id_from_stem` spells it."""
    return image_id_from_stem(image_stem(path))


def image_id_from_stem(stem: str) -> str:
    """An image id for a file's stem: characters outside [A-Za-z0-9._-] replaced (ids name the site's files).
    A stem with other letters keeps them apart by a short hash of the whole name, after its accents are
    taken off for the reader: ``Bild_ä 1`` → ``Bild_a_1-…``, ``患者-02`` → ``02-…``. Replaced alone, every
    name in Chinese or Cyrillic was ``image`` and ``Bild_ä``/``Bild_ö`` one id: all but one file refused."""
    if stem.isascii():
        return re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-") or "image"
    plain = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()  # Bild_ä → Bild_a
    base = re.sub(r"[^A-Za-z0-9._-]", "_", plain).lstrip("._-")
    # NFC: macOS names files in decomposed form, Linux and Windows composed; one name, one id
    digest = hashlib.sha256(unicodedata.normalize("NFC", stem).encode()).hexdigest()[:8]
    return f"{base[:_ID_MAX - 9].rstrip('._-') or 'image'}-{digest}"


class SiteStore:
    """One site's images and annotations on disk (see module docstring)."""

    def __init__(self, root: Path, config: SiteConfig, readonly: bool, clock: Callable[[], str] | None,
                 new: bool = False):
        self.root = root
        self.config = config
        self.readonly = readonly
        self._clock = clock or _utc_now
        self._lock = threading.RLock()
        db = self._db_path = root / DB_FILE
        if not new and (not db.exists() or db.stat().st_size == 0):
            # SQLite makes an empty database of a missing or empty file: a site copied without it (a backup
            # tool skipping *.db, a copy cut short) opened as no images, and listed each one as a stray
            # file to delete
            raise InputError(root, f"site has {'an empty' if db.exists() else 'no'} {DB_FILE} (the list of its "
                                   "images and their annotations); it is damaged or not initialised: restore the "
                                   "site folder from a backup")
        if readonly:
            self._db = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                                       check_same_thread=False)
            try:  # the first read: SQLite opens the file lazily, and a WAL file may need what it cannot create
                self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            except (sqlite3.Error, UnicodeDecodeError) as exc:  # UnicodeDecodeError: a damaged schema's text
                self._db.close()
                why = ("the site is open for writing elsewhere or was not closed cleanly, and this folder is not "
                       "writable for you; open the site once with write access (or copy the folder) and try again"
                       if isinstance(exc, sqlite3.OperationalError) else _DAMAGED)
                raise InputError(db, f"cannot be read ({exc}): {why}") from None
            self._check_columns()
        else:
            self._db = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            # WAL's shared-memory index is for one machine: a share several workstations open keeps a
            # rollback journal (network_share explains why)
            journal = "DELETE" if is_network_path(root) else "WAL"
            try:
                self._db.execute(f"PRAGMA journal_mode={journal}")
                self._db.execute("PRAGMA synchronous=FULL")
                # a removed image's rows (its source file's name may name the patient) are overwritten, not
                # left in free pages: the default of Debian's SQLite, not of every platform's
                self._db.execute("PRAGMA secure_delete=ON")
                if not new:
                    self._check_columns()  # before CREATE TABLE IF NOT EXISTS would make a lost table anew, empty
                self._db.executescript(_SCHEMA)
            except (sqlite3.Error, UnicodeDecodeError) as exc:  # a traceback named neither the file nor what to do
                self._db.close()
                why = "check that the folder and the file are writable for you" \
                    if isinstance(exc, sqlite3.OperationalError) else _DAMAGED
                raise InputError(db, f"cannot be opened for writing ({exc}): {why}") from None
        self._db.execute("PRAGMA foreign_keys=ON")
        # close() runs it, or else garbage collection or interpreter exit (a napari session that ends
        # with the site still open): either way the writer leaves the database as _close_database says
        self._closer = weakref.finalize(self, _close_database, self._db, readonly)

    # ----------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, root: str | Path, classes: Iterable[str], name: str | None = None, channels: int = 1,
               clock: Callable[[], str] | None = None) -> SiteStore:
        """Create a new, empty site folder (refuses to overwrite an existing site)."""
        root = Path(root)
        classes = check_class_names(classes, "classes")
        if name is not None:
            _check_site_name(name)
        if channels not in (1, 3):
            raise InputError("channels", f"must be 1 (grey) or 3 (colour), not {channels}")
        if (root / CONFIG_FILE).exists():
            raise InputError(root, "a site already exists here; open it instead of creating it")
        if root.is_dir() and any(p for p in root.iterdir() if not p.name.startswith(".")):
            raise InputError(root, "folder is not empty; choose a new folder for the site")
        make_folder(root / "images")
        (root / "masks").mkdir(exist_ok=True)
        config = SiteConfig(name or root.resolve().name, classes, channels)
        store = cls(root, config, readonly=False, clock=clock, new=True)
        atomic_write_bytes(root / CONFIG_FILE, config.to_json().encode())
        return store

    @classmethod
    def open(cls, root: str | Path, readonly: bool = False, clock: Callable[[], str] | None = None) -> SiteStore:
        """Open an existing site folder."""
        root = Path(root)
        if not root.is_dir():
            raise InputError(root, "is a file, not a site folder" if root.exists() else "site folder not found")
        return cls(root, SiteConfig.from_file(root / CONFIG_FILE), readonly, clock)

    def close(self) -> None:
        with self._lock:
            self._closer()

    def __enter__(self) -> SiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise PermissionError(f"{self.root}: site opened read-only")
        with self._lock, self._naming_damage():
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # SQLite has rolled back already after a full disk: a second
                        self._db.execute("ROLLBACK")  # ROLLBACK would raise and hide why
                    raise
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                    raise
                raise OSError(errno.ENOSPC, "No space left on device (the site's database could not grow; "
                              "nothing of this change was saved)", str(self.root / DB_FILE)) from exc

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock, self._naming_damage():
            return self._db.execute(sql, args).fetchall()

    def _check_columns(self) -> None:
        """Refuse a database whose tables lack a column the schema gives them: a damaged schema's text, found
        here rather than as "no such column" from whichever query meets it first. A table this version
        added may be absent from a site of an earlier version opened read-only."""
        try:
            for table, columns in _schema_columns().items():
                held = {row[1] for row in self._query(f"PRAGMA table_info({table})")}
                if not held and table in _ADDED_TABLES:
                    continue
                if not columns <= held:
                    lacks = f"lacks the column(s) {', '.join(sorted(columns - held))}" if held else "is missing"
                    raise InputError(self._db_path, f"cannot be read (its table '{table}' {lacks}): {_DAMAGED}")
        except InputError:
            self._db.close()
            raise

    @contextlib.contextmanager
    def _naming_damage(self) -> Iterator[None]:
        """A damaged database's error, raised as that: a page cut short or overwritten (a copy interrupted, a
        sync tool's conflict, a failing disk) raised SQLite's "database disk image is malformed" from
        whichever query met it, a damaged text its decode error, naming neither the file nor what to do."""
        try:
            yield
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            if not (isinstance(exc, UnicodeDecodeError)
                    or getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
                    or str(exc).startswith("Could not decode to UTF-8")):
                raise
            raise InputError(self._db_path, f"cannot be read ({exc}): {_DAMAGED}") from None

    def _query_added(self, sql: str, args: tuple = ()) -> list[tuple]:
        """A query of a table this version added (removals, digests): none in a site of an earlier version opened
        read-only, which no write-open has given the table yet."""
        try:
            return self._query(sql, args)
        except sqlite3.OperationalError:  # no such table
            return []

    # ----------------------------------------------------------------- images
    def add_image(self, source: str | Path | np.ndarray, image_id: str | None = None,
                  author: str | None = None, origin: str | None = None,
                  spacing: tuple[float, float] | None = None) -> str:
        """Validate an image (file or array) and add it under ``image_id`` (default: file stem).
        ``origin`` says where an array came from (e.g. a napari layer's file and frame); a file's
        origin is its path. ``spacing`` (row, column mm; default: what a file states) is kept in the
        stored TIFF, so HD95 can be given in mm."""
        if isinstance(source, np.ndarray):
            if image_id is None:
                raise InputError("image_id", "an id is required when adding an image from an array")
            where: str | Path = f"image '{image_id}'"
            array = validate_image(source, where)
            origin = origin or "array"
        else:
            where = Path(source)
            array = read_image(where)
            image_id = image_id or image_id_from_path(where)
            origin = os.path.abspath(where)  # the file, whatever folder the import was run from
            if spacing is None:
                spacing = file_spacing(where)
        if spacing is not None:
            spacing = checked_spacing(spacing, f"{where}: pixel spacing")
        if not _ID_PATTERN.fullmatch(image_id):
            raise InputError(where, f"image id '{image_id}' must use ASCII letters, digits, '.', '-' or '_' "
                             "(max 128, starting with a letter or digit)")
        self._refuse_duplicate(image_id, where)
        relative = f"images/{image_id}.tif"
        channels = 1 if array.ndim == 2 else 3
        written = False
        try:
            # the file is written under the database's write lock, after the id is checked again: another
            # program adding the same id meanwhile (napari and a `site import`) would otherwise write its
            # file over this one's, and delete it when its own row was refused
            with self._transaction() as db:
                self._refuse_duplicate(image_id, where)
                if db.execute("DELETE FROM removals WHERE image_id=?", (image_id,)).rowcount:
                    # a removal of this id that a kill left half done: its old mask goes before the id is used anew
                    with contextlib.suppress(FileNotFoundError):
                        (self.root / "masks" / f"{image_id}.tif").unlink()
                try:
                    _write_tiff(self.root / relative, array, spacing)
                    written = True
                    seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM images").fetchone()[0]
                    db.execute(
                        "INSERT INTO images VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (image_id, relative, origin, array.shape[0], array.shape[1], channels, str(array.dtype),
                         author or _default_author(), self._clock(), seq),
                    )
                    db.execute("INSERT INTO digests VALUES (?,?)", (image_id, pixel_digest(array)))
                except BaseException:  # still under the lock: no other program's file of this id can be here
                    written = False
                    with contextlib.suppress(FileNotFoundError):
                        (self.root / relative).unlink()
                    raise
        except BaseException:  # the commit itself failed (a full disk): the file would only hold the space
            if written:
                with contextlib.suppress(FileNotFoundError):
                    (self.root / relative).unlink()
            raise
        return image_id

    def _refuse_duplicate(self, image_id: str, where: str | Path) -> None:
        if self._query("SELECT 1 FROM images WHERE id=?", (image_id,)):
            raise InputError(where, f"duplicate image id '{image_id}': the site already has an image with "
                             "this id; rename the file or pass another id")

    def remove_image(self, image_id: str) -> None:
        """Remove an image and all its annotations (:meth:`remove_images`)."""
        self.remove_images([image_id])

    def remove_images(self, image_ids: list[str]) -> None:
        """Remove images and all their annotations (a patient's consent withdrawn): their rows, overwritten in
        the database and in the write-ahead log too when no other program reads the site, then their files.
        The rows go in one transaction that notes the ids as pending until the files are gone too, so a removal
        killed part-way removed all or none of the rows, and the next removal (the same command run again, or
        any other) deletes what it left on disk; an id noted so may be named again though it has no image."""
        pending = self.pending_removals()
        for image_id in image_ids:
            if image_id not in pending:
                self._require_image(image_id)
        with self._transaction() as db:
            db.executemany("DELETE FROM images WHERE id=?", [(image_id,) for image_id in image_ids])
            db.executemany("INSERT OR IGNORE INTO removals VALUES (?)", [(image_id,) for image_id in image_ids])
        finishing = list(dict.fromkeys([*image_ids, *pending]))
        for image_id in finishing:
            self._unlink_unclaimed(image_id, "SELECT 1 FROM images WHERE id=?", ("images", "masks"))
        with self._transaction() as db:
            db.executemany("DELETE FROM removals WHERE image_id=?", [(image_id,) for image_id in finishing])
        with self._lock, contextlib.suppress(sqlite3.Error):  # the log's old pages go now, not at its next reset
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def pending_removals(self) -> list[str]:
        """The ids of images whose removal a kill interrupted after its commit: their files may still be on
        disk (:meth:`remove_images`). A site written by an earlier version has no such note: none."""
        return [row[0] for row in self._query_added("SELECT image_id FROM removals ORDER BY image_id")]

    def _unlink_unclaimed(self, image_id: str, claim: str, folders: tuple[str, ...]) -> None:
        """Delete an image's files once the removal of their rows is committed (a full disk at that commit
        keeps both), under the write lock again and only if no row claims them anew: another program
        (napari and a `site import` on one site) may have added the id or set its mask in between."""
        with self._transaction() as db:
            if not db.execute(claim, (image_id,)).fetchone():
                for folder in folders:
                    with contextlib.suppress(FileNotFoundError):
                        (self.root / folder / f"{image_id}.tif").unlink()

    def image_ids(self) -> list[str]:
        return [row[0] for row in self._query("SELECT id FROM images ORDER BY seq")]

    def __len__(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM images")[0][0])

    def records(self) -> list[ImageRecord]:
        """Every image with its supervision summary, in import order."""
        return self._records()

    def record(self, image_id: str) -> ImageRecord:
        found = self._records(image_id)
        if not found:
            raise self._unknown(image_id)
        return found[0]

    def _records(self, image_id: str | None = None) -> list[ImageRecord]:
        """Every image's record, or only ``image_id``'s (empty if there is none), read in one transaction:
        a writer (napari) between its queries could otherwise pair one state's mask with another's boxes."""
        where, args = ("WHERE image_id=?", (image_id,)) if image_id is not None else ("", ())
        with self._lock:
            snapshot = not self._db.in_transaction  # else inside a write of this store: already one
            if snapshot:
                self._db.execute("BEGIN")
            try:
                box_counts = dict(self._query(f"SELECT image_id, COUNT(*) FROM boxes {where} GROUP BY image_id", args))
                masked = {row[0] for row in self._query(f"SELECT image_id FROM masks {where}", args)}
                tags: dict[str, dict[str, bool]] = {}
                for image, class_name, present in self._typed(self._query(
                        f"SELECT image_id, class_name, present FROM tags {where}", args), (str, str, int), "tags"):
                    tags.setdefault(image, {})[class_name] = bool(present)
                rows = self._query("SELECT id, file, height, width, channels, dtype, source FROM images "
                                   f"{where.replace('image_id', 'id')} ORDER BY seq", args)
            except BaseException:
                if snapshot and self._db.in_transaction:  # a read: nothing to keep, and its own error is raised
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
            if snapshot:
                self._query("COMMIT")
        self._typed(rows, (str, str, int, int, int, str, str), "images")
        return [
            ImageRecord(i, f, h, w, c, d, i in masked, box_counts.get(i, 0), tags.get(i, {}), src)
            for i, f, h, w, c, d, src in rows
        ]

    def read_image(self, image_id: str) -> np.ndarray:
        """The image as imported (H×W or H×W×3, original dtype)."""
        return read_image(self._image_file(image_id))

    def _image_file(self, image_id: str) -> Path:
        rows = self._query("SELECT file FROM images WHERE id=?", (image_id,))
        if not rows:
            raise self._unknown(image_id)
        return self._stored(rows[0][0])

    def _typed(self, rows: list[tuple], kinds: tuple[type, ...], table: str) -> list[tuple]:
        """``rows``, each value of its column's type: damage that breaks one (a NOT NULL, a number become a
        text) failed far from here, as a None file name's TypeError or a box corner's comparison."""
        for row in rows:
            if not all(is_int(v) if kind is int else isinstance(v, kind) for v, kind in zip(row, kinds, strict=True)):
                raise InputError(self._db_path, f"cannot be read (an entry of its {table} is {row!r}): {_DAMAGED}")
        return rows

    def _stored(self, relative: object) -> Path:
        """The file a database entry names; an entry that is no file name (damage) said as damage."""
        if not isinstance(relative, str) or not relative:
            raise InputError(self._db_path, f"cannot be read (a file's entry is {relative!r}): {_DAMAGED}")
        return self.root / relative

    def pixel_digests(self, image_ids: list[str] | None = None) -> dict[str, str]:
        """The :func:`pixel_digest` of every image, or of ``image_ids``, by id in import order: copies of one
        image under two names, or in two folders, have one digest. Kept since an image's import; an image
        imported by an earlier version is read once for it (and its digest kept, unless opened read-only)."""
        ids = self.image_ids() if image_ids is None else image_ids
        where = "" if image_ids is None else f" WHERE image_id IN ({','.join('?' * len(ids))})"
        kept = dict(self._query_added(f"SELECT image_id, sha256 FROM digests{where}", tuple(image_ids or ())))
        missing = {image_id: pixel_digest(self.read_image(image_id)) for image_id in ids if image_id not in kept}
        if missing and not self.readonly:
            with self._transaction() as db:  # an image removed meanwhile: its row is not there to refer to
                db.executemany("INSERT OR IGNORE INTO digests SELECT id, ? FROM images WHERE id=?",
                               [(digest, image_id) for image_id, digest in missing.items()])
        return {image_id: kept.get(image_id) or missing[image_id] for image_id in ids}

    def same_pixels(self, image_id: str) -> list[str]:
        """The other images of the site whose pixels are ``image_id``'s (copies under other names), in import
        order."""
        digests = self.pixel_digests()
        return [other for other, digest in digests.items() if digest == digests[image_id] and other != image_id]

    def kept_copies(self) -> tuple[dict[str, str], int]:
        """Each image whose pixels an image imported before it holds, with that image (copy → first), as the
        digests kept since import tell; and how many images have no digest kept (imported by an earlier
        version): reading every such image on each look would make `site info` slow on a large site."""
        kept = dict(self._query_added("SELECT image_id, sha256 FROM digests"))
        first: dict[str, str] = {}
        copies = {}
        unknown = 0
        for image_id in self.image_ids():
            if (digest := kept.get(image_id)) is None:
                unknown += 1
            elif (held := first.setdefault(digest, image_id)) != image_id:
                copies[image_id] = held
        return copies, unknown

    def spacing(self, image_id: str) -> tuple[float, float] | None:
        """The image's pixel spacing (row, column mm) when it was imported with one, else None."""
        return tiff_spacing(self._image_file(image_id))

    def load_image(self, image_id: str) -> np.ndarray:
        """The image normalised for the model: float32 C×H×W in [0, 1] (C from the site config)."""
        return normalise_image(self.read_image(image_id), self.config.channels)

    # ----------------------------------------------------------------- masks
    def set_mask(self, image_id: str, mask: np.ndarray | str | Path, author: str | None = None,
                 created_at: str | None = None) -> None:
        """Set (or replace) an image's label mask; an all-background mask is refused. The mask the image has
        already is not written again: its author and time stay those of whoever last changed it (napari saves
        every annotation of an image whenever one of them changes). ``created_at``: as :meth:`set_tag`'s."""
        height, width = self._require_image(image_id)
        where: str | Path = f"mask of '{image_id}'"
        if not isinstance(mask, np.ndarray):
            where = Path(mask)
            from fedmix_engine.data.imageio import read_mask_file

            mask = read_mask_file(where, len(self.config.classes))
        mask = validate_mask(mask, (height, width), len(self.config.classes), where)
        if not mask.any():
            raise InputError(where, "mask is empty (all background); for an image without lesions set its "
                             "tags to 'absent' instead, or clear the mask")
        relative = f"masks/{image_id}.tif"
        with self._transaction() as db:  # file and row under one write lock: another program's clear or set
            if self._holds_mask(db, image_id, mask):  # cannot come between them (nor between the look and the write)
                return
            _write_tiff(self.root / relative, mask)  # atomic: old or new, never torn
            db.execute("INSERT OR REPLACE INTO masks VALUES (?,?,?,?)",
                       (image_id, relative, author or _default_author(), created_at or self._clock()))

    def _holds_mask(self, db: sqlite3.Connection, image_id: str, mask: np.ndarray) -> bool:
        row = db.execute("SELECT file FROM masks WHERE image_id=?", (image_id,)).fetchone()
        if row is None:
            return False
        try:
            return bool(np.array_equal(read_array(self._stored(row[0])), mask))
        except (InputError, OSError):  # a damaged or missing file: written anew
            return False

    def clear_mask(self, image_id: str) -> None:
        self._require_image(image_id)
        with self._transaction() as db:
            db.execute("DELETE FROM masks WHERE image_id=?", (image_id,))
        self._unlink_unclaimed(image_id, "SELECT 1 FROM masks WHERE image_id=?", ("masks",))

    def read_mask(self, image_id: str) -> np.ndarray | None:
        """The label mask (uint8 H×W) or None when the image has none."""
        self._require_image(image_id)
        rows = self._query("SELECT file FROM masks WHERE image_id=?", (image_id,))
        if not rows:
            return None
        return np.asarray(read_array(self._stored(rows[0][0])), dtype=np.uint8)  # a damaged file named, not bare

    # ----------------------------------------------------------------- boxes
    def check_box(self, image_id: str, box: Box) -> Box:
        """Validate a box against the image and the classes; returns it with integer corners."""
        return self._check_box(image_id, box, self._require_image(image_id))

    def _check_box(self, image_id: str, box: Box, size: tuple[int, int]) -> Box:
        where = f"box on '{image_id}'"
        self.config.class_index(box.class_name, where)
        height, width = size
        try:
            y0, x0, y1, x1 = (round(float(v)) for v in (box.y0, box.x0, box.y1, box.x1))
        except (TypeError, ValueError, OverflowError):  # NaN: ValueError; ±inf (or 1e400): OverflowError
            raise InputError(where, f"box corners must be finite numbers, got "
                                    f"{(box.y0, box.x0, box.y1, box.x1)}") from None
        if y1 <= y0 or x1 <= x0:
            raise InputError(where, f"box ({y0},{x0})–({y1},{x1}) has zero area; y1 > y0 and x1 > x0 needed")
        if y0 < 0 or x0 < 0 or y1 > height or x1 > width:
            raise InputError(where, f"box ({y0},{x0})–({y1},{x1}) lies outside the {height}×{width} image")
        return Box(box.class_name, y0, x0, y1, x1, author=box.author, created_at=box.created_at)

    def add_box(self, image_id: str, class_name: str, y0: float, x0: float, y1: float, x1: float,
                author: str | None = None) -> int:
        """Add one box (pixel corners, half-open); returns its id."""
        box = self._check_box(image_id, Box(class_name, y0, x0, y1, x1), self._require_image(image_id))
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO boxes (image_id, class_name, y0, x0, y1, x1, author, created_at) VALUES (?,?,?,?,?,?,?,?)",
                (image_id, box.class_name, box.y0, box.x0, box.y1, box.x1, author or _default_author(),
                 self._clock()),
            )
            return int(cur.lastrowid)

    def set_boxes(self, image_id: str, boxes: Iterable[Box], author: str | None = None) -> None:
        """Replace all boxes of an image in one transaction (what saving a Shapes layer needs); the same boxes
        again are not written, so they keep their author and time. A box's own ``author`` and ``created_at`` (a
        table's columns) win over ``author`` and now."""
        size = self._require_image(image_id)
        checked = [self._check_box(image_id, b, size) for b in boxes]
        with self._transaction() as db:
            held = db.execute("SELECT class_name, y0, x0, y1, x1 FROM boxes WHERE image_id=?", (image_id,)).fetchall()
            if sorted(held) == sorted(b.key for b in checked):
                return
            db.execute("DELETE FROM boxes WHERE image_id=?", (image_id,))
            now, who = self._clock(), author or _default_author()
            db.executemany(
                "INSERT INTO boxes (image_id, class_name, y0, x0, y1, x1, author, created_at) VALUES (?,?,?,?,?,?,?,?)",
                [(image_id, b.class_name, b.y0, b.x0, b.y1, b.x1, b.author or who, b.created_at or now)
                 for b in checked],
            )

    def remove_box(self, box_id: int) -> None:
        with self._transaction() as db:
            if db.execute("DELETE FROM boxes WHERE id=?", (box_id,)).rowcount == 0:
                raise InputError("box_id", f"no box with id {box_id}")

    def boxes(self, image_id: str) -> list[Box]:
        self._require_image(image_id)
        rows = self._query("SELECT class_name, y0, x0, y1, x1, id, author, created_at FROM boxes "
                           "WHERE image_id=? ORDER BY id", (image_id,))
        return [Box(*row) for row in self._typed(rows, (str, int, int, int, int, int, str, str), "boxes")]

    # ----------------------------------------------------------------- tags
    def set_tag(self, image_id: str, class_name: str, present: bool | None, author: str | None = None,
                created_at: str | None = None) -> None:
        """Tag a class as present (True) or absent (False) in the image; None clears the tag. The tag the image
        has already is not written again (it keeps its author and time). ``created_at``: when it was set, if
        not now (:func:`annotation_time`: an archive's tag imported again)."""
        self._require_image(image_id)
        self.config.class_index(class_name, f"tag on '{image_id}'")
        with self._transaction() as db:
            held = db.execute("SELECT present FROM tags WHERE image_id=? AND class_name=?",
                              (image_id, class_name)).fetchone()
            if held is not None and present is not None and bool(held[0]) == bool(present):
                return
            if present is None:
                db.execute("DELETE FROM tags WHERE image_id=? AND class_name=?", (image_id, class_name))
            else:
                db.execute("INSERT OR REPLACE INTO tags VALUES (?,?,?,?,?)",
                           (image_id, class_name, int(bool(present)), author or _default_author(),
                            created_at or self._clock()))

    def tags(self, image_id: str) -> dict[str, bool]:
        return {class_name: present for class_name, present, *_ in self.tag_rows(image_id)}

    def mask_author(self, image_id: str) -> tuple[str, str] | None:
        """Who stored the image's mask and when (author, created_at); None when it has no mask."""
        self._require_image(image_id)
        rows = self._query("SELECT author, created_at FROM masks WHERE image_id=?", (image_id,))
        return (rows[0][0], rows[0][1]) if rows else None

    def tag_rows(self, image_id: str) -> list[tuple[str, bool, str, str]]:
        """The image's tags with who set them and when: (class, present, author, created_at), by class."""
        self._require_image(image_id)
        return [(c, bool(p), a, t) for c, p, a, t in self._typed(self._query(
            "SELECT class_name, present, author, created_at FROM tags WHERE image_id=? ORDER BY class_name",
            (image_id,)), (str, int, str, str), "tags")]

    def annotation_stamp(self, image_id: str) -> tuple:
        """The image's annotations as they stand, in a form that changes with every write of them (the mask's
        row and file time, the boxes' row ids, the tags' rows): a panel showing the image tells from it that
        another program (a terminal's import, a second napari) wrote to it since, before saving over that."""
        mask = self._query("SELECT file, created_at FROM masks WHERE image_id=?", (image_id,))
        written = [(self.root / file).stat().st_mtime_ns if (self.root / file).exists() else None
                   for file, _ in mask]
        return (tuple(mask), tuple(written),
                tuple(self._query("SELECT id FROM boxes WHERE image_id=? ORDER BY id", (image_id,))),
                tuple(self._query("SELECT class_name, present, created_at FROM tags WHERE image_id=? "
                                  "ORDER BY class_name", (image_id,))))

    def writes_by_others(self) -> int:
        """A number that changes whenever another connection (a terminal's import, a second napari) commits to
        this site's database, and not with this store's own writes: SQLite's ``data_version``, cheap enough for
        a panel to ask every few seconds whether what it shows is still what the site holds."""
        return int(self._query("PRAGMA data_version")[0][0])

    # ----------------------------------------------------------------- summaries
    def summary(self) -> dict[str, int]:
        """Counts: images, images per supervision kind, boxes and tags."""
        counts = {"images": 0, "mask": 0, "box": 0, "tag": 0, "none": 0}
        for rec in self.records():
            counts["images"] += 1
            counts[rec.supervision] += 1
        counts["boxes"] = int(self._query("SELECT COUNT(*) FROM boxes")[0][0])
        counts["tags"] = int(self._query("SELECT COUNT(*) FROM tags")[0][0])
        return counts

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Per class (label order): its boxes, and the images tagged present and absent. How balanced the
        weak labels are: a class with few boxes, or tags that are nearly all 'absent', trains little."""
        counts = {name: {"boxes": 0, "present": 0, "absent": 0} for name in self.config.classes}
        for name, number in self._query("SELECT class_name, COUNT(*) FROM boxes GROUP BY class_name"):
            counts.setdefault(name, {"boxes": 0, "present": 0, "absent": 0})["boxes"] = int(number)
        for name, present, number in self._query("SELECT class_name, present, COUNT(*) FROM tags "
                                                 "GROUP BY class_name, present"):
            counts.setdefault(name, {"boxes": 0, "present": 0, "absent": 0})[
                "present" if present else "absent"] = int(number)
        return counts

    def problems(self) -> list[str]:
        """Inconsistencies a backup or a crash may have left (missing files, stray files)."""
        found = []
        known = {}
        for image_id, file in self._query("SELECT id, file FROM images"):
            known[file] = image_id
            if not self._stored(file).is_file():
                found.append(f"{file}: image file missing for image '{image_id}'")
        for image_id, file in self._query("SELECT image_id, file FROM masks"):
            known[file] = image_id
            if not self._stored(file).is_file():
                found.append(f"{file}: mask file missing for image '{image_id}'")
        pending = self.pending_removals()
        found.extend(f"image '{image_id}': its removal was interrupted after the database's commit, and its files "
                     f"may still be on disk: `fedmix-engine site remove {self.root} {image_id}` finishes it"
                     for image_id in pending)
        for sub in ("images", "masks"):
            for path in sorted((self.root / sub).glob("*")):
                rel = f"{sub}/{path.name}"
                if is_interrupted_write(path):
                    found.append(f"{rel}: temporary file of a save that a crash or a kill interrupted (that save "
                                 "did not happen; the site is consistent without it): delete it")
                elif rel not in known and path.stem not in pending:
                    found.append(f"{rel}: stray file not registered in the site (a save or a removal that a crash "
                                 "interrupted, or a file put there by hand); the site works without it: delete it "
                                 "(a removed patient's image must be)")
        return found

    def training_view(self) -> TrainingView:
        """A read-only view for the trainer (its own connection; safe in a worker thread)."""
        return TrainingView(SiteStore.open(self.root, readonly=True))

    # ----------------------------------------------------------------- helpers
    def _require_image(self, image_id: str) -> tuple[int, int]:
        rows = self._query("SELECT height, width FROM images WHERE id=?", (image_id,))
        if not rows:
            raise self._unknown(image_id)
        return int(rows[0][0]), int(rows[0][1])

    def _unknown(self, image_id: str) -> InputError:
        return InputError(f"{self.root}", f"no image with id '{image_id}' in this site")


class TrainingView:
    """What a trainer may see of a site: read-only, and only the supervision the site holds.

    A weak site's ground truth cannot leak through it: :meth:`mask` refuses any image the site
    holds no mask for, and the view has no way to reach files outside the site folder.
    """

    def __init__(self, store: SiteStore):
        self._store = store
        self.config = store.config
        self.root = store.root
        self.records: list[ImageRecord] = store.records()

    @property
    def classes(self) -> tuple[str, ...]:
        return self.config.classes

    def image(self, image_id: str) -> np.ndarray:
        """Normalised image, float32 C×H×W in [0, 1]."""
        return self._store.load_image(image_id)

    def mask(self, image_id: str) -> np.ndarray:
        """The site's own mask for an image; refuses images the site has no mask for."""
        mask = self._store.read_mask(image_id)
        if mask is None:
            raise PermissionError(f"{self.root}: image '{image_id}' has no mask at this site")
        return mask

    def boxes(self, image_id: str) -> list[Box]:
        return self._store.boxes(image_id)

    def tags(self, image_id: str) -> dict[str, bool]:
        return self._store.tags(image_id)

    def current(self, image_id: str) -> ImageRecord | None:
        """The image's record as the site holds it now (None: removed since). ``records`` is listed when
        the view opens, and the site may be annotated in napari while a federation round reads it."""
        found = self._store._records(image_id)
        return found[0] if found else None

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> TrainingView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_database(db: sqlite3.Connection, readonly: bool) -> None:
    """Close; a writer first returns the database to rollback-journal mode (when no one else has it
    open), so that a closed site is self-contained and a reader without write access to the folder
    can open it (WAL needs a -shm file it would have to create). The next writer switches to WAL."""
    if not readonly:
        with contextlib.suppress(sqlite3.Error):
            db.execute("PRAGMA busy_timeout=0")  # someone reading: stay in WAL, do not wait
            db.execute("PRAGMA journal_mode=DELETE")
    db.close()


def _write_tiff(path: Path, array: np.ndarray, spacing: tuple[float, float] | None = None) -> None:
    """Encode in memory, then replace the file atomically (2-D images and masks)."""
    atomic_write_bytes(path, tiff_bytes(array, spacing))
