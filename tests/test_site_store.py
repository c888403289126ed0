"""The SiteStore: per-image supervision, validation with named errors, persistence, read-only view."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile

from disk_helpers import fill_disk_leaving, small_disk
from fedmix_engine.data.site_store import Box, SiteStore
from fedmix_engine.errors import InputError


def test_mixed_supervision_per_image_survives_reopen(tmp_path: Path, grey_image, lesion_mask) -> None:
    with SiteStore.create(tmp_path / "s", ["lesion", "cyst"]) as store:
        for i in range(4):
            store.add_image(grey_image, f"img-{i}")
        store.set_mask("img-0", lesion_mask * 2, author="dr-a")
        store.add_box("img-1", "lesion", 5, 5, 20, 30, author="dr-b")
        store.add_box("img-1", "cyst", 25, 30, 40, 50)
        store.set_tag("img-2", "lesion", True)
        store.set_tag("img-2", "cyst", False)
    with SiteStore.open(tmp_path / "s", readonly=True) as store:
        kinds = {r.id: r.supervision for r in store.records()}
        assert kinds == {"img-0": "mask", "img-1": "box", "img-2": "tag", "img-3": "none"}
        assert store.read_mask("img-0").max() == 2
        boxes = store.boxes("img-1")
        assert [(b.class_name, b.y0, b.x0, b.y1, b.x1) for b in boxes] == [
            ("lesion", 5, 5, 20, 30), ("cyst", 25, 30, 40, 50)]
        assert boxes[0].author == "dr-b" and boxes[0].created_at
        assert store.tags("img-2") == {"cyst": False, "lesion": True}
        assert store.summary() == {"images": 4, "mask": 1, "box": 1, "tag": 1, "none": 1, "boxes": 2, "tags": 2}
        assert store.problems() == []
        np.testing.assert_array_equal(store.read_image("img-3"), grey_image)


def test_images_of_different_sizes_depths_and_colour(site: SiteStore, tmp_path: Path, rng) -> None:
    tifffile.imwrite(tmp_path / "deep.tif", rng.integers(0, 4096, (30, 50), dtype=np.uint16))
    site.add_image(tmp_path / "deep.tif")
    site.add_image(rng.integers(0, 256, (64, 40, 3), dtype=np.uint8), "colour")
    site.add_image(rng.random((20, 20)).astype(np.float32), "float")
    shapes = {r.id: (r.height, r.width, r.channels, r.dtype) for r in site.records()}
    assert shapes == {"deep": (30, 50, 1, "uint16"), "colour": (64, 40, 3, "uint8"), "float": (20, 20, 1, "float32")}
    for image_id in shapes:
        image = site.load_image(image_id)
        assert image.dtype == np.float32 and image.shape[0] == 1 and 0.0 <= image.min() <= image.max() <= 1.0


def test_duplicate_id_and_bad_id_are_refused(site: SiteStore, grey_image, tmp_path: Path) -> None:
    site.add_image(grey_image, "case-01")
    with pytest.raises(InputError, match="duplicate image id 'case-01'"):
        site.add_image(grey_image, "case-01")
    tifffile.imwrite(tmp_path / "case-01.tif", grey_image)
    with pytest.raises(InputError, match=r"case-01\.tif: duplicate image id"):
        site.add_image(tmp_path / "case-01.tif")
    with pytest.raises(InputError, match=r"image id '\.\./evil'"):
        site.add_image(grey_image, "../evil")
    for bad in ("case-02\n", "Röntgen"):  # a file name with a newline; not ASCII, and said so
        with pytest.raises(InputError, match="must use ASCII letters"):
            site.add_image(grey_image, bad)
    assert site.image_ids() == ["case-01"]


def test_mask_errors_name_the_image_and_keep_the_old_mask(site: SiteStore, grey_image, lesion_mask) -> None:
    site.add_image(grey_image, "a")
    site.set_mask("a", lesion_mask)
    with pytest.raises(InputError, match=r"mask of 'a': mask shape 10×10 ≠ image shape 48×64"):
        site.set_mask("a", np.ones((10, 10), np.uint8))
    with pytest.raises(InputError, match=r"mask of 'a': mask values 0\.\.2 outside the class range 0\.\.1"):
        site.set_mask("a", lesion_mask * 2)
    with pytest.raises(InputError, match=r"mask of 'a': mask is empty"):
        site.set_mask("a", np.zeros_like(lesion_mask))
    np.testing.assert_array_equal(site.read_mask("a"), lesion_mask)  # nothing already saved was lost
    site.clear_mask("a")
    assert site.read_mask("a") is None and not (site.root / "masks" / "a.tif").exists()


def test_box_errors(site: SiteStore, grey_image) -> None:
    site.add_image(grey_image, "a")
    with pytest.raises(InputError, match=r"box on 'a': box \(40,10\)–\(60,20\) lies outside the 48×64 image"):
        site.add_box("a", "lesion", 40, 10, 60, 20)
    with pytest.raises(InputError, match=r"box on 'a': .* has zero area"):
        site.add_box("a", "lesion", 10, 10, 10, 20)
    with pytest.raises(InputError, match=r"box on 'a': unknown class 'tumour'; this site's classes are: lesion"):
        site.add_box("a", "tumour", 1, 1, 5, 5)
    with pytest.raises(InputError, match="no image with id 'zzz'"):
        site.add_box("zzz", "lesion", 1, 1, 5, 5)
    assert site.boxes("a") == []
    box_id = site.add_box("a", "lesion", 1, 1, 5, 5)
    site.set_boxes("a", [Box("lesion", 2, 2, 9, 9), Box("lesion", 20.4, 20, 30, 30.6)])
    assert [(b.y0, b.x0, b.y1, b.x1) for b in site.boxes("a")] == [(2, 2, 9, 9), (20, 20, 30, 31)]
    with pytest.raises(InputError, match=f"no box with id {box_id}"):
        site.remove_box(box_id)


def test_tag_errors_and_clearing(site: SiteStore, grey_image) -> None:
    site.add_image(grey_image, "a")
    with pytest.raises(InputError, match="tag on 'a': unknown class 'cyst'"):
        site.set_tag("a", "cyst", True)
    site.set_tag("a", "lesion", False)
    assert site.record("a").supervision == "tag"
    site.set_tag("a", "lesion", None)
    assert site.record("a").supervision == "none"


def test_class_config_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="at least one class"):
        SiteStore.create(tmp_path / "x", [])
    with pytest.raises(InputError, match="'background' is implicit"):
        SiteStore.create(tmp_path / "y", ["background", "lesion"])
    with pytest.raises(InputError, match="duplicate class names"):
        SiteStore.create(tmp_path / "z", ["a", "a"])
    # a clinic names its classes in its own language: 'Läsion' was refused as not starting with a letter
    with SiteStore.create(tmp_path / "words", ["Läsion", "lésion maligne", "病变", "Zyste_2"]) as store:
        assert store.config.classes == ("Läsion", "lésion maligne", "病变", "Zyste_2")
    # the classes of public datasets and reports: VinDr-CXR's 'Nodule/Mass' was refused, and with it the
    # import of the best-known chest X-ray box set, unless its files were edited
    named = ["Nodule/Mass", "lesion (benign)", "grade 2+", "St. Jude type"]
    with SiteStore.create(tmp_path / "datasets", named) as store:
        assert store.config.classes == tuple(named)
    for bad in ("-x", "_x", " x", "/x", "a\\b", "a\tb", "a,b", "a;b", "lesion\n", "x" * 65):
        with pytest.raises(InputError, match="must start with a letter or digit and use letters, digits, spaces"):
            SiteStore.create(tmp_path / "bad", [bad])
    SiteStore.create(tmp_path / "ok", ["lesion"]).close()
    with pytest.raises(InputError, match="a site already exists here"):
        SiteStore.create(tmp_path / "ok", ["lesion"])
    with pytest.raises(InputError, match="not a site folder"):
        SiteStore.open(tmp_path)


def test_remove_image_removes_files_and_annotations(site: SiteStore, grey_image, lesion_mask) -> None:
    site.add_image(grey_image, "a")
    site.set_mask("a", lesion_mask)
    site.remove_image("a")
    assert site.image_ids() == [] and site.summary()["images"] == 0
    assert not any((site.root / "images").iterdir()) and not any((site.root / "masks").iterdir())


def test_a_removed_image_leaves_no_trace_of_its_names_in_the_database_files(tmp_path: Path, grey_image,
                                                                          monkeypatch) -> None:
    """A patient's withdrawn consent: the source file's name (often the patient's) stayed readable in the
    database's free pages and its write-ahead log after the removal, wherever SQLite's secure_delete is off by
    default (Debian turns it on at build time; other platforms' builds do not). Simulated by a connection
    that starts with it off; the site is kept open, as napari keeps it."""
    import sqlite3

    from fedmix_engine.data import site_store

    connect = sqlite3.connect

    def default_off(*args, **kwargs):
        db = connect(*args, **kwargs)
        db.execute("PRAGMA secure_delete=OFF")
        return db

    monkeypatch.setattr(site_store.sqlite3, "connect", default_off)
    with SiteStore.create(tmp_path / "site", ["lesion"]) as store:
        for name in ("Mueller_Hans_1957", "Schmidt_Eva_1960"):
            store.add_image(grey_image, name.lower(), origin=f"/pacs/{name}.dcm")
            store.set_tag(name.lower(), "lesion", True, author="dr-a")
        store.remove_image("mueller_hans_1957")
        files = [p for p in (tmp_path / "site").iterdir() if p.name.startswith("annotations.db")]
        held = b"".join(p.read_bytes() for p in files)
        assert b"Schmidt_Eva_1960" in held, "the kept image's rows are there to be found"
        assert b"Mueller" not in held and b"mueller" not in held
        assert store.image_ids() == ["schmidt_eva_1960"]


def test_saving_an_image_again_keeps_who_drew_what_it_did_not_change(tmp_path: Path, grey_image, lesion_mask
                                                                      ) -> None:
    """napari saves all of an image's annotations whenever one changes: a clinician ticking a tag became the
    author (and the time) of the radiologist's imported mask and boxes, in the export and in what a re-import
    keeps. An unchanged mask, box set or tag is no longer written again; a changed one is, with its author."""
    from napari_fedmix.layer_records import save_annotations

    ticks = iter(f"2026-11-30T10:{minute:02d}:00+00:00" for minute in range(60))
    with SiteStore.create(tmp_path / "site", ["lesion"], clock=lambda: next(ticks)) as store:
        store.add_image(grey_image, "a")
        store.set_mask("a", lesion_mask, author="dr-radiology")
        store.set_boxes("a", [Box("lesion", 1, 2, 10, 12)], author="dr-radiology")
        store.set_tag("a", "lesion", True, author="dr-radiology")
        before = (store.mask_author("a"), [(b.id, b.author, b.created_at) for b in store.boxes("a")],
                  store.tag_rows("a"))
        rectangles = [np.array([[1, 2], [1, 12], [10, 12], [10, 2]], float)]
        assert save_annotations(store, "a", lesion_mask, rectangles, ["lesion"], {"lesion": True}) == []
        assert (store.mask_author("a"), [(b.id, b.author, b.created_at) for b in store.boxes("a")],
                store.tag_rows("a")) == before, "nothing changed: nothing rewritten"
        store.set_tag("a", "lesion", False, author="dr-ward")  # a change is written, with its author
        assert store.tag_rows("a") == [("lesion", False, "dr-ward", "2026-11-30T10:04:00+00:00")]
        moved = lesion_mask.copy()
        moved[0, 0] = 1
        store.set_mask("a", moved, author="dr-ward")
        assert store.mask_author("a")[0] == "dr-ward"


def test_problems_reports_stray_and_missing_files(site: SiteStore, grey_image) -> None:
    site.add_image(grey_image, "a")
    (site.root / "images" / "a.tif").unlink()
    tifffile.imwrite(site.root / "masks" / "ghost.tif", np.ones((4, 4), np.uint8))
    import os

    from fedmix_engine.atomic import _create_temporary

    fd, tmp = _create_temporary(site.root / "images" / "b.tif", None)  # an import killed while writing b.tif
    os.close(fd)
    problems = site.problems()
    assert any("images/a.tif: image file missing" in p for p in problems)
    assert any("masks/ghost.tif: stray file" in p for p in problems)
    assert any(p.endswith("the site works without it: delete it (a removed patient's image must be)") for p in problems)
    interrupted = [p for p in problems if p.startswith(f"images/{Path(tmp).name}: ")]
    assert len(interrupted) == 1 and "a crash or a kill interrupted" in interrupted[0] and "delete it" in interrupted[0]
    assert len(problems) == 3


def test_training_view_is_read_only_and_cannot_reach_missing_masks(site: SiteStore, grey_image, lesion_mask) -> None:
    site.add_image(grey_image, "strong")
    site.add_image(grey_image, "weak")
    site.set_mask("strong", lesion_mask)
    site.set_tag("weak", "lesion", True)
    with site.training_view() as view:
        assert view.mask("strong").sum() == lesion_mask.sum()
        with pytest.raises(PermissionError, match="'weak' has no mask at this site"):
            view.mask("weak")
        assert not hasattr(view, "set_mask") and not hasattr(view, "add_box")
        assert view.image("weak").shape == (1, 48, 64)
    ro = SiteStore.open(site.root, readonly=True)
    with pytest.raises(PermissionError, match="read-only"):
        ro.set_tag("weak", "lesion", False)
    ro.close()


def test_relative_site_paths_work_read_only_too(tmp_path: Path, grey_image, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with SiteStore.create("rel-site", ["lesion"]) as store:
        store.add_image(grey_image, "a")
    with SiteStore.open("rel-site", readonly=True) as store, store.training_view() as view:
        assert [r.id for r in view.records] == ["a"]


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_get_the_umask_like_a_plain_open_and_a_replaced_file_keeps_its_mode(tmp_path, umask_022):
    from fedmix_engine.atomic import atomic_write_bytes
    from fedmix_engine.federation.tokens import TokenStore

    store = SiteStore.create(tmp_path / "site", ["lesion"])  # shared by the clinicians of one workstation
    store.add_image(np.zeros((8, 8), np.uint8), "scan")
    store.set_mask("scan", np.ones((8, 8), np.uint8))
    store.close()
    written = [tmp_path / "site" / "site.json", *(tmp_path / "site").glob("*/scan*")]
    assert len(written) == 3
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {"0o644"}, "readable by the group, as with open()"

    kept = tmp_path / "kept.csv"
    kept.write_bytes(b"old")
    kept.chmod(0o640)
    atomic_write_bytes(kept, b"new")
    assert kept.read_bytes() == b"new" and kept.stat().st_mode & 0o777 == 0o640

    tokens = TokenStore(tmp_path / "state")
    tokens.add("site-a")
    assert tokens.path.stat().st_mode & 0o777 == 0o600, "token hashes stay private to the server's user"
    assert not list(tmp_path.rglob("*.tmp")), "no temporary file is left behind"


def _read_without_write_access(root: Path) -> str:
    """Open ``root`` read-only as a user who cannot write to it: nobody (a child process that imports what it
    needs as root, then drops to nobody, so nobody need not read the interpreter or the source tree, and this
    threaded process is not forked) or us with the folder made read-only. Returns 'ok <images>' or the error."""
    if os.geteuid() != 0:
        root.chmod(0o555)
        try:
            return _read_readonly(root)
        finally:
            root.chmod(0o755)
    as_nobody = ("import os, sys; from pathlib import Path; from test_site_store import _read_readonly; "
                 "os.setgroups([]); os.setgid(65534); os.setuid(65534); "
                 "sys.stdout.write(_read_readonly(Path(sys.argv[1])))")
    child = subprocess.run([sys.executable, "-c", as_nobody, str(root)], capture_output=True, text=True,
                           timeout=120, cwd=Path(__file__).parent)
    assert child.returncode == 0, child.stderr
    return child.stdout


def _read_readonly(root: Path) -> str:
    try:
        with SiteStore.open(root, readonly=True) as store:
            return f"ok {len(store.records())}"
    except Exception as exc:  # the message is the result
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture()
def shared_dir(umask_022):
    """A folder other users can reach (pytest's tmp_path sits in a 0700 folder)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="fedmix-shared-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_a_closed_site_is_readable_from_a_folder_the_reader_cannot_write(shared_dir):
    import sqlite3

    root = shared_dir / "site"
    with SiteStore.create(root, ["lesion"]) as store:
        store.add_image(np.zeros((8, 8), np.uint8), "scan")
        store.set_tag("scan", "lesion", True)
    assert sorted(p.name for p in root.iterdir()) == ["annotations.db", "images", "masks", "site.json"]
    assert _read_without_write_access(root) == "ok 1"
    with SiteStore.open(root, readonly=True) as reader:  # a reader leaves no WAL side files behind either
        assert len(reader) == 1
    assert not list(root.glob("annotations.db-*"))

    with SiteStore.open(root) as writer:  # open for writing elsewhere: WAL while it lasts
        writer.set_tag("scan", "lesion", False)
        assert _read_without_write_access(root) == "ok 1"  # its -shm file exists and can be read
    with sqlite3.connect(root / "annotations.db") as raw:  # left in WAL mode, as by a writer killed before close
        raw.execute("PRAGMA journal_mode=WAL")
    for side in root.glob("annotations.db-*"):
        side.unlink()
    message = _read_without_write_access(root)
    assert message.startswith(f"InputError: {root / 'annotations.db'}: cannot be read"), message
    assert "open the site once with write access" in message


def test_a_damaged_database_is_named_in_both_modes_and_left_as_it_was(tmp_path):
    root = tmp_path / "site"
    SiteStore.create(root, ["lesion"]).close()
    garbage = np.random.default_rng(0).bytes(4096)
    (root / "annotations.db").write_bytes(garbage)
    for readonly in (True, False):
        with pytest.raises(InputError, match=r"annotations\.db: cannot be .*file is not a database.*damaged"):
            SiteStore.open(root, readonly=readonly)
    assert (root / "annotations.db").read_bytes() == garbage, "nothing written over what may yet be rescued"


@pytest.mark.parametrize("readonly", [True, False])
def test_a_site_without_its_database_is_refused_not_opened_as_empty(tmp_path, grey_image, readonly):
    """SQLite makes an empty database of a missing or empty file: a site copied without annotations.db (a
    backup tool skipping *.db, a copy cut short) opened for writing as a site of no images, whose problems()
    listed every image as a stray file to delete."""
    root = tmp_path / "site"
    with SiteStore.create(root, ["lesion"]) as store:
        store.add_image(grey_image, "img-0")
    image = (root / "images" / "img-0.tif").read_bytes()
    for damage, said in ((lambda db: db.unlink(), "no"), (lambda db: db.write_bytes(b""), "an empty")):
        damage(root / "annotations.db")
        with pytest.raises(InputError, match=rf"^{re.escape(str(root))}: site has {said} annotations\.db \(the list "
                                             r"of its images and their annotations\); it is damaged or not "
                                             r"initialised: restore the site folder from a backup$"):
            SiteStore.open(root, readonly=readonly)
        assert not (root / "annotations.db").exists() or (root / "annotations.db").read_bytes() == b""
        assert (root / "images" / "img-0.tif").read_bytes() == image


def _damaged_site(root: Path, grey_image, lesion_mask, damage: str) -> None:
    """A site of two images with a mask, boxes and tags, its database then damaged as a failing disk or an
    interrupted copy would."""
    import sqlite3

    with SiteStore.create(root, ["lesion"]) as store:
        for i in range(2):
            store.add_image(grey_image, f"img-{i}")
        store.set_mask("img-0", lesion_mask)
        store.add_box("img-1", "lesion", 5, 5, 20, 30)
        store.set_tag("img-1", "lesion", True)
    db = root / "annotations.db"
    if damage in ("a column's type", "a box's corner"):  # bytes cannot be aimed at a type reliably: SQLite writes it
        with sqlite3.connect(db) as connection:
            connection.execute("UPDATE images SET height='tall' WHERE id='img-1'" if damage == "a column's type" else
                               "UPDATE boxes SET x0='five'")
        connection.close()
        return
    data = bytearray(db.read_bytes())
    if damage == "a page zeroed":
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
            page = connection.execute("SELECT rootpage FROM sqlite_master WHERE name='images'").fetchone()[0]
        connection.close()
        data[(page - 1) * 4096:page * 4096] = bytes(4096)
    elif damage == "a text byte":
        at = data.index(b"images/img-1.tif")
        data[at + 1] = 0xFF  # no longer UTF-8
    elif damage == "the schema's text":
        at = data.index(b"dtype TEXT NOT NULL")
        data[at:at + 5] = b"dtyp_"
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, said", [
    ("a page zeroed", r"cannot be read \(database disk image is malformed\)"),
    ("a text byte", r"cannot be read \(Could not decode to UTF-8 column 'file'"),
    ("the schema's text", r"cannot be read \(its table 'images' lacks the column\(s\) dtype\)"),
    ("a column's type", r"cannot be read \(an entry of its images is \('img-1', 'images/img-1\.tif', 'tall'"),
    ("a box's corner", r"cannot be read \(an entry of its boxes is \('lesion', 5, 'five', 20, 30"),
])
@pytest.mark.parametrize("readonly", [True, False])
def test_a_database_damaged_inside_is_named_wherever_it_is_read(tmp_path, grey_image, lesion_mask, damage, said,
                                                                readonly):
    """A damaged page or value passed the open, and the first query to meet it raised SQLite's error (a
    DatabaseError, a decode error, "no such column", a None file name's TypeError) with neither the file
    nor what to do; a write-open could make a lost table anew, empty."""
    root = tmp_path / "site"
    _damaged_site(root, grey_image, lesion_mask, damage)
    before = (root / "annotations.db").read_bytes()
    expected = rf"^{re.escape(str(root / 'annotations.db'))}: {said}.*: it is damaged or not a site's database; " \
               r"restore the site folder from a backup$"
    with pytest.raises(InputError, match=expected), SiteStore.open(root, readonly=readonly) as store:
        store.summary()
        with store.training_view() as view:
            for record in view.records:
                view.image(record.id), view.boxes(record.id), view.tags(record.id)
    after = (root / "annotations.db").read_bytes()
    # nothing written over what may yet be rescued (a writer's open sets the header's journal mode and counter)
    assert after == before if readonly else after[100:] == before[100:]


def test_no_damage_to_a_sites_database_escapes_as_anything_but_a_named_refusal(tmp_path, grey_image, lesion_mask):
    """Seeded random damage (bytes changed, the file cut, a page zeroed): every use of the site either works
    or is refused naming the database; nothing is a bare SQLite, Unicode or Type error."""
    import random
    import shutil

    pristine = tmp_path / "pristine"
    _damaged_site(pristine, grey_image, lesion_mask, "none")
    rng, outcomes = random.Random(0), {"worked": 0, "refused": 0}
    for trial in range(120):
        root = tmp_path / f"site-{trial}"
        shutil.copytree(pristine, root)
        data = bytearray((root / "annotations.db").read_bytes())
        how = rng.choice(["bytes", "cut", "page"])
        if how == "bytes":
            for _ in range(rng.randrange(1, 30)):
                data[rng.randrange(100, len(data))] = rng.randrange(256)
        elif how == "cut":
            data = data[:rng.randrange(1, len(data))]
        else:
            page = rng.randrange(1, len(data) // 4096)
            data[page * 4096:(page + 1) * 4096] = bytes(4096)
        (root / "annotations.db").write_bytes(bytes(data))
        try:
            with SiteStore.open(root, readonly=rng.random() < 0.5) as store:
                store.summary(), store.class_counts(), store.problems()
                for record in store.records():
                    store.boxes(record.id), store.tags(record.id), store.read_mask(record.id)
                    store.read_image(record.id)
            outcomes["worked"] += 1
        except InputError as refused:
            assert refused.where.startswith(str(root)), refused
            outcomes["refused"] += 1
    assert outcomes["refused"] > 40 and outcomes["worked"] > 0, outcomes


def test_a_damaged_site_config_is_named_with_its_missing_field_and_what_to_do(tmp_path):
    """A site.json without its name said only "corrupt site config ('name')": a KeyError's text."""
    import json

    root = tmp_path / "site"
    SiteStore.create(root, ["lesion"]).close()
    config = root / "site.json"
    good = json.loads(config.read_text())
    for damaged, why in ((json.dumps({k: v for k, v in good.items() if k != "name"}), "no 'name'"),
                         (config.read_text()[:25], "Unterminated string")):
        config.write_text(damaged)
        for readonly in (True, False):
            with pytest.raises(InputError) as caught:
                SiteStore.open(root, readonly=readonly)
            assert str(caught.value).startswith(f"{config}: corrupt site config ({why}"), caught.value
            assert "restore it from a backup (it names the site and its classes in label order" in str(caught.value)
        assert config.read_text() == damaged, "left as it was"


def test_a_writer_that_is_never_closed_still_leaves_a_self_contained_site_at_exit(tmp_path):
    import sqlite3
    import subprocess
    import sys

    root = tmp_path / "site"
    SiteStore.create(root, ["lesion"]).close()
    child = ("import sys; from fedmix_engine.data.site_store import SiteStore\n"
             "store = SiteStore.open(sys.argv[1])\n"  # as the annotate widget: open until napari quits
             "store.add_image(__import__('numpy').zeros((8, 8), 'uint8'), 'scan')\n"
             "assert (store.root / 'annotations.db-wal').exists()\n")
    done = subprocess.run([sys.executable, "-c", child, str(root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not list(root.glob("annotations.db-*"))
    with sqlite3.connect(f"{(root / 'annotations.db').as_uri()}?mode=ro", uri=True) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    with SiteStore.open(root, readonly=True) as store:
        assert store.image_ids() == ["scan"]


def test_stored_images_and_masks_are_lossless_deflate_tiffs(tmp_path: Path, rng) -> None:
    """A site keeps every image it imports: uncompressed, a 6000×4000 dermoscopy photo took 72 MB and its
    mask 24 MB (a JPEG of it is ~2 MB)."""
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    image[100:200, 150:300] = (200, 120, 90)  # a flat region, as photos have
    mask = np.zeros((300, 400), np.uint8)
    mask[120:180, 170:280] = 1
    with SiteStore.create(tmp_path / "site", ["lesion"], channels=3) as store:
        store.set_mask(store.add_image(image, "photo"), mask)
        stored = {kind: store.root / kind / "photo.tif" for kind in ("images", "masks")}
        for path in stored.values():
            with tifffile.TiffFile(path) as tif:
                assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        np.testing.assert_array_equal(store.read_image("photo"), image)
        np.testing.assert_array_equal(store.read_mask("photo"), mask)
    assert stored["masks"].stat().st_size < mask.size / 20
    assert stored["images"].stat().st_size < image.size


MACOS_MOUNTS = """/dev/disk3s1s1 on / (apfs, sealed, local, read-only, journaled)
devfs on /dev (devfs, local, nobrowse)
/dev/disk3s5 on /System/Volumes/Data (apfs, local, journaled, nobrowse, protect, root data)
map auto_home on /System/Volumes/Data/home (autofs, automounted, nobrowse)
//jdoe@fileserver.hospital.org/Radiology%20Share on /Volumes/Radiology Share (smbfs, nodev, nosuid, mounted by jdoe)
fileserver:/export/imaging on /Volumes/imaging (nfs, asynchronous, nodev, nosuid, mounted by jdoe)
/dev/disk4s1 on /Volumes/Radiology Share/USB stick (msdos, local, nodev, nosuid, noowners, mounted by jdoe)
"""


def test_a_share_is_told_from_macos_mount_list(tmp_path: Path, monkeypatch) -> None:
    """A Mac at a clinic mounts the file server's SMB share under /Volumes; the site folder there must not use
    WAL either. Before, macOS folders were all taken to be local."""
    from fedmix_engine.data import network_share

    kind = network_share.macos_mount_type
    assert kind(Path("/Volumes/Radiology Share/site-a"), MACOS_MOUNTS) == "smbfs", "a mount point with a space"
    assert kind(Path("/Volumes/imaging/site-b"), MACOS_MOUNTS) == "nfs"
    assert kind(Path("/Volumes/Radiology Share/USB stick/site"), MACOS_MOUNTS) == "msdos", "the innermost mount"
    assert kind(Path("/Users/jdoe/site"), MACOS_MOUNTS) == "apfs"
    share = (tmp_path / "Radiology Share").resolve()
    share.mkdir()
    listing = tmp_path / "mount"  # a real program printing what /sbin/mount prints on such a Mac
    listing.write_text(f"#!/bin/sh\ncat <<'EOF'\n{MACOS_MOUNTS}//me@server/x on {share} (smbfs, nodev)\nEOF\n")
    listing.chmod(0o755)
    monkeypatch.setattr(network_share, "MACOS_MOUNT", str(listing))
    monkeypatch.setattr(network_share.sys, "platform", "darwin")
    assert network_share.is_network_path(share) and not network_share.is_network_path(tmp_path)
    monkeypatch.setattr(network_share, "MACOS_MOUNT", str(tmp_path / "no-such-program"))
    assert not network_share.is_network_path(share), "when it cannot be told, a folder is taken to be local"


def test_a_site_on_a_network_share_keeps_a_rollback_journal_not_wal(tmp_path: Path, monkeypatch, capsys) -> None:
    """WAL keeps its index in shared memory, which only works when every process runs on one machine; a site
    on a file server's share, opened from several workstations, could be corrupted by it."""
    from fedmix_engine.data import network_share

    table = ("sysfs /sys sysfs rw 0 0\n/dev/sda1 / ext4 rw 0 0\n"
             "//fileserver/radiology /mnt/radiology\\040share cifs rw,vers=3.0 0 0\n"
             "server:/export /mnt/radiology\\040share/nfs nfs4 rw 0 0\n"
             "/dev/sdb1 /mnt/radiology\\040share/local ext4 rw 0 0\n")
    assert network_share.mount_type(Path("/mnt/radiology share/site-a"), table) == "cifs"
    assert network_share.mount_type(Path("/mnt/radiology share/nfs/site"), table) == "nfs4"
    assert network_share.mount_type(Path("/mnt/radiology share/local/site"), table) == "ext4", "the longest mount"
    assert network_share.mount_type(Path("/mnt/radiology sharex"), table) == "ext4", "a prefix is not a parent"
    assert network_share.mount_type(Path("/home/me/site"), table) == "ext4"

    local = SiteStore.create(tmp_path / "local", ["lesion"])
    assert (tmp_path / "local" / "annotations.db-wal").exists(), "a local site keeps WAL while open"
    local.close()
    shares = (tmp_path / "share").resolve()
    monkeypatch.setattr(network_share, "MOUNT_TABLE", tmp_path / "mounts")
    (tmp_path / "mounts").write_text(f"/dev/sda1 / ext4 rw 0 0\n//fileserver/x {shares} cifs rw 0 0\n")
    shares.mkdir()
    assert network_share.is_network_path(shares) and not network_share.is_network_path(tmp_path / "local")
    with SiteStore.create(shares / "site-a", ["lesion"]) as store:
        store.add_image(np.zeros((16, 16), np.uint8), "a")
        store.set_tag("a", "lesion", True)
        assert not (shares / "site-a" / "annotations.db-wal").exists(), "no WAL on a share"
    with SiteStore.open(shares / "site-a", readonly=True) as store:
        assert store.tags("a") == {"lesion": True}
    from fedmix_engine.cli import main

    for site, said in ((shares / "site-a", True), (tmp_path / "local", False)):
        assert main(["site", "info", str(site)]) == 0
        assert ("on a network share: annotate it from one workstation at a time" in capsys.readouterr().out) is said


def test_a_full_disk_is_named_saves_nothing_half_and_the_open_site_saves_again_once_space_is_back(
        tmp_path: Path, grey_image) -> None:
    """A site on a real, small file system that the test fills. SQLite's 'database or disk is full' came
    out as a traceback naming no file, and an image whose row could not be written left its file behind,
    a stray the site then reported. The site napari keeps open must save again once space is back."""
    with small_disk(tmp_path / "disk", 4 * 2**20) as disk:
        store = SiteStore.create(disk / "site", ["lesion"])
        store.add_image(grey_image, "scan-0")
        store.add_image(grey_image, "scan-probe")  # how much an image's file takes
        probe = (disk / "site" / "images" / "scan-probe.tif").stat().st_size
        store.remove_image("scan-probe")
        filler = disk / "filler"
        fill_disk_leaving(filler, 0)
        saved = 0
        with pytest.raises(OSError) as full:
            for saved in range(5000):  # until the database must grow
                store.add_box("scan-0", "lesion", 1, 1, 9 + saved % 30, 9)
        assert full.value.errno == errno.ENOSPC and full.value.filename == str(disk / "site" / "annotations.db")
        assert "nothing of this change was saved" in str(full.value)
        assert len(store.boxes("scan-0")) == saved, "every box before the failing one, and not that one"

        image_file = disk / "site" / "images" / "scan-1.tif"
        fill_disk_leaving(filler, -(-probe // 4096) * 4096)  # room for the image's file, none for its row
        with pytest.raises(OSError) as no_row:
            store.add_image(grey_image, "scan-1")
        assert no_row.value.filename == str(disk / "site" / "annotations.db"), "the file was written, the row not"
        assert not image_file.exists() and store.problems() == [], "a file without its row is a stray"

        filler.unlink()
        store.add_box("scan-0", "lesion", 2, 2, 12, 12)  # the same open site saves again
        store.add_image(grey_image, "scan-1")
        store.close()
        with SiteStore.open(disk / "site", readonly=True) as again:
            assert again.image_ids() == ["scan-0", "scan-1"] and len(again.boxes("scan-0")) >= saved + 1
            assert np.array_equal(again.read_image("scan-1"), grey_image)


def test_a_log_line_that_does_not_fit_is_taken_back_whole(tmp_path: Path) -> None:
    """rounds.jsonl (Flower) and metrics.jsonl (simulate) are appended a line per round; on a full disk the
    line was cut where the space ended, and the next round's line, once space was back, ran on from the
    torn half: a log no JSON-lines reader could read again."""
    import json

    from fedmix_engine.atomic import append_line

    with small_disk(tmp_path / "disk", 1 * 2**20) as disk:
        log = disk / "rounds.jsonl"
        append_line(log, json.dumps({"round": 1}))
        filler = disk / "filler"
        fill_disk_leaving(filler, 4096)
        with pytest.raises(OSError) as full:
            append_line(log, json.dumps({"round": 2, "weights": "x" * 3 * 4096}))
        assert full.value.errno == errno.ENOSPC and full.value.filename == str(log)
        assert log.read_text() == '{"round": 1}\n', "nothing of the line that did not fit"
        filler.unlink()
        append_line(log, json.dumps({"round": 2}))
        assert [json.loads(line)["round"] for line in log.read_text().splitlines()] == [1, 2]


class _Racing:
    """Runs ``other`` on a second thread right after this thread writes its next image or mask file, and
    waits up to 1 s for it: the moment two programs on one site (napari's Annotate and a `site import`,
    each with its own connection to the database) could meet. ``join()`` gives the other's outcome."""

    def __init__(self, monkeypatch, other: Callable[[], None]):
        from fedmix_engine.data import site_store

        self.outcome: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(other,))
        real_write = site_store._write_tiff

        def write_then_let_the_other_in(*args, **kwargs) -> None:
            real_write(*args, **kwargs)
            monkeypatch.setattr(site_store, "_write_tiff", real_write)  # the other writes normally
            self.thread.start()
            self.thread.join(1.0)  # a writer holding the site's lock keeps it waiting: go on without it

        monkeypatch.setattr(site_store, "_write_tiff", write_then_let_the_other_in)

    def _run(self, other: Callable[[], None]) -> None:
        try:
            other()
        except BaseException as exc:
            self.outcome = exc

    def join(self) -> BaseException | None:
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.outcome


def test_two_writers_adding_the_same_image_id_keep_one_whole_and_refuse_the_other(tmp_path, rng, monkeypatch):
    """Two programs on one site (its database is shared, each holds its own connection) importing the same
    file name at once: the old add_image checked the id, wrote the file and then inserted the row, so the
    second writer's file replaced the first's and, when its insert failed, it deleted the file the first
    writer's row names (a bare IntegrityError for one, an image without its file for the other)."""
    first, second = rng.integers(0, 256, (48, 64), np.uint8), rng.integers(0, 256, (48, 64), np.uint8)
    SiteStore.create(tmp_path / "site", ["lesion"]).close()
    with SiteStore.open(tmp_path / "site") as annotate, SiteStore.open(tmp_path / "site") as importer:
        other = _Racing(monkeypatch, lambda: importer.add_image(second, "case-01"))
        try:
            annotate.add_image(first, "case-01")
            mine: BaseException | None = None
        except BaseException as exc:
            mine = exc
        theirs = other.join()
        outcomes = [mine, theirs]
        assert outcomes.count(None) == 1, outcomes  # exactly one of the two added it
        refused = next(exc for exc in outcomes if exc is not None)
        assert isinstance(refused, InputError) and "duplicate image id 'case-01'" in str(refused)
        kept = first if mine is None else second
        assert annotate.problems() == []
        np.testing.assert_array_equal(annotate.read_image("case-01"), kept)  # the row's file is the winner's
        assert annotate.image_ids() == importer.image_ids() == ["case-01"]


def test_a_mask_cleared_while_another_writer_sets_it_leaves_no_row_without_its_file(site, grey_image, lesion_mask,
                                                                                   monkeypatch):
    """A mask set in one program while another clears it: the old set_mask wrote the file, the clear then
    removed row and file, and the set's row followed, naming a file that no longer existed (training and
    `site check` met a missing mask)."""
    site.add_image(grey_image, "case-01")
    with SiteStore.open(site.root) as other_program:
        other = _Racing(monkeypatch, lambda: other_program.clear_mask("case-01"))
        site.set_mask("case-01", lesion_mask)
        assert other.join() is None
        assert site.problems() == []
        mask = site.read_mask("case-01")  # whichever came last, row and file agree
        assert mask is None or np.array_equal(mask, lesion_mask)
        assert (site.root / "masks" / "case-01.tif").exists() == (mask is not None)


def test_an_image_removed_while_another_writer_adds_it_again_keeps_the_new_file(site, grey_image, rng, monkeypatch):
    """Removed in one program and added again under the same id in another in between: the old remove
    deleted the files after its commit unconditionally, including the new image's."""

    site.add_image(grey_image, "case-01")
    again = rng.integers(0, 256, (48, 64), np.uint8)
    with SiteStore.open(site.root) as other_program:
        real_transaction = SiteStore._transaction
        calls = []

        @contextlib.contextmanager
        def add_again_after_the_removal(self):
            with real_transaction(self) as db:
                yield db
            calls.append(1)
            if self is site and len(calls) == 1:  # the removal's row is committed, its files not yet deleted
                monkeypatch.setattr(SiteStore, "_transaction", real_transaction)
                other_program.add_image(again, "case-01")

        monkeypatch.setattr(SiteStore, "_transaction", add_again_after_the_removal)
        site.remove_image("case-01")
        assert calls and other_program.image_ids() == ["case-01"]  # the other program did add it again
        assert site.problems() == []
        np.testing.assert_array_equal(site.read_image("case-01"), again)
