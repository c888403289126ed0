"""make-sample: layout, determinism, no ground truth in weak sites; site import/info through the CLI."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from fedmix_engine.cli import main
from fedmix_engine.data.site_store import Box, SiteStore
from fedmix_engine.errors import InputError


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_sample_layout_determinism_and_no_leak(tmp_path: Path, capsys) -> None:
    args = ["make-sample", "--sites", "3", "--images", "12", "--eval-images", "4", "--seed", "0", "--size", "64"]
    assert main([*args[:1], str(tmp_path / "one"), *args[1:]]) == 0
    assert main([*args[:1], str(tmp_path / "two"), *args[1:]]) == 0
    one, two = _digest(tmp_path / "one"), _digest(tmp_path / "two")
    assert one == two, "same seed must give byte-identical files"
    assert main(["make-sample", str(tmp_path / "three"), "--sites", "3", "--images", "12", "--eval-images", "4",
                 "--seed", "1", "--size", "64"]) == 0
    assert _digest(tmp_path / "three") != one

    root = tmp_path / "one"
    assert {p.name for p in root.iterdir()} == {"site-a", "site-b", "site-c", "eval", "federation.json"}
    for name in ("site-a", "site-b", "site-c"):
        for split in ("val", "test", "oracle"):
            assert (root / "eval" / name / split / "site.json").exists()
    # weak sites hold no mask file at all; the strong site holds only masks (and absent tags)
    assert not any((root / "site-b" / "masks").iterdir())
    assert not any((root / "site-c" / "masks").iterdir())
    with SiteStore.open(root / "site-a") as a, SiteStore.open(root / "site-b") as b, \
            SiteStore.open(root / "site-c") as c:
        assert a.summary()["mask"] > 0 and a.summary()["box"] == 0
        assert b.summary()["box"] > 0 and b.summary()["mask"] == 0
        assert c.summary()["tag"] == 12 and c.summary()["mask"] == c.summary()["box"] == 0
        # boxes enclose the lesion with the paper's 1–9 px margin scaled to the image: at 64², 0–2 px
        # (checked against the oracle's mask); tight enough that a perfect prediction passes the fill check
        fills = []
        with SiteStore.open(root / "eval" / "site-b" / "oracle") as oracle:
            for rec in b.records():
                for box in b.boxes(rec.id):
                    mask = oracle.read_mask(rec.id)
                    inside = np.zeros_like(mask, bool)
                    inside[box.y0:box.y1, box.x0:box.x1] = True
                    rows, cols = np.nonzero(mask & inside)
                    margins = [rows.min() - box.y0, cols.min() - box.x0,
                               box.y1 - 1 - rows.max(), box.x1 - 1 - cols.max()]
                    assert all(0 <= m <= 2 for m in margins), margins
                    lesion = (mask > 0) & inside
                    fill = 2 * lesion.sum() / (lesion.sum() + inside.sum())
                    fills.append(fill)
        assert np.mean(np.array(fills) >= 0.5) >= 0.8, fills
    out = capsys.readouterr().out
    assert "site-c: 12 images (0 mask, 0 box, 12 tag)" in out


def test_make_sample_mix_and_two_classes(tmp_path: Path) -> None:
    assert main(["make-sample", str(tmp_path / "mix"), "--sites", "2", "--images", "20", "--eval-images", "2",
                 "--size", "48", "--mix", "0.1,0.4,0.5", "--classes", "2"]) == 0
    with SiteStore.open(tmp_path / "mix" / "site-a") as store:
        counts = store.summary()
        assert store.config.classes == ("lesion", "cyst")
        assert counts["mask"] + counts["box"] + counts["tag"] == 20
        assert counts["box"] >= 4 and counts["tag"] >= 8  # lesion-free box images become 'absent' tags
        assert store.problems() == []


def test_site_info_counts_each_class_boxes_and_tags(tmp_path: Path, capsys) -> None:
    """site info gave a two-class site's boxes and tags as two totals: a class with few boxes, or tagged
    absent on every image, could not be seen before training on it."""
    from fedmix_engine.data.site_store import Box

    site = tmp_path / "site"
    with SiteStore.create(site, ["lesion", "cyst"]) as store:
        for k in range(3):
            store.add_image(np.zeros((32, 32), np.uint8), f"img{k}")
        store.set_boxes("img0", [Box("lesion", 2, 2, 10, 10), Box("lesion", 12, 12, 20, 20)])
        store.set_boxes("img1", [Box("cyst", 4, 4, 12, 12)])
        store.set_tag("img2", "lesion", False)
        store.set_tag("img2", "cyst", True)
    assert main(["site", "info", str(site)]) == 0
    info = capsys.readouterr().out
    assert "box-supervised:  2  (boxes: 3: lesion 2 · cyst 1)" in info, info
    assert "tag-supervised:  1  (tags: 2: lesion 0 present, 1 absent · cyst 1 present, 0 absent)" in info, info


def test_strong_shift_adds_lookalikes_outside_the_mask_and_mild_has_none(tmp_path: Path) -> None:
    from dataclasses import replace

    from fedmix_engine.data.synthetic import _add_lookalikes, make_sample, site_domain, synth_image
    from fedmix_engine.errors import InputError

    mild = site_domain(1, np.random.default_rng(0))
    assert mild.lookalikes == 0 and site_domain(1, np.random.default_rng(0), "strong") == replace(mild, lookalikes=3.0)
    for seed in range(5):
        _, plain_mask = synth_image(np.random.default_rng(seed), 64, mild)
        _, busy_mask = synth_image(np.random.default_rng(seed), 64, replace(mild, lookalikes=3.0))
        assert np.array_equal(plain_mask, busy_mask), "look-alikes are never lesions"

    lesion = np.zeros((64, 64), np.uint8)
    lesion[30:40, 30:40] = 1
    tissue = _add_lookalikes(np.random.default_rng(1), np.ones((64, 64)), lesion, replace(mild, lookalikes=6.0),
                             0.2, 0.6)
    assert (tissue < 0.8).sum() > 20, "look-alikes darken the tissue"
    assert (tissue[29:41, 29:41] > 0.99).all(), "and stay clear of the lesion"

    assert main(["make-sample", str(tmp_path / "s"), "--sites", "2", "--images", "3", "--eval-images", "1",
                 "--size", "32", "--shift", "strong"]) == 0
    assert '"shift": "strong"' in (tmp_path / "s" / "federation.json").read_text()
    with pytest.raises(InputError, match="--shift: unknown domain shift 'extreme'"):
        make_sample(tmp_path / "bad", images=2, eval_images=1, size=32, shift="extreme")
    assert not (tmp_path / "bad").exists(), "refused before anything is written"


@pytest.mark.parametrize(("argv", "message"), [
    (["--sites", "0"], "--sites: must be between 1 and 26"),
    (["--mix", "0.5,0.5,0.5"], "--mix: three non-negative fractions"),
    (["--supervision", "mask,scribble,tag"], "--supervision: unknown kind 'scribble'"),
    (["--supervision", "mask,box"], "--supervision: names 2 kind(s) (mask,box) for 3 site(s): give one kind per site"),
    (["--mix", "nan,0.5,0.5"], "--mix: three non-negative fractions (mask,box,tag) summing to 1, got [nan, 0.5, 0.5]"),
    (["--mix", "1.5,-0.25,-0.25"], "--mix: three non-negative fractions"),
    (["--eval-images", "0"], "--eval-images: needs at least one validation and one test image per site, not 0"),
    (["--size", "100000"], "--size: images must be 32 to 2048 px, not 100000"),  # was NumPy's MemoryError
])
def test_make_sample_bad_arguments(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    assert main(["make-sample", str(tmp_path / "x"), "--images", "2", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _write_clinic_folder(root: Path, rng: np.random.Generator) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(20):
        iio.imwrite(root / "images" / f"case-{i:02d}.png", rng.integers(0, 256, (40, 50), dtype=np.uint8))
    for i in range(5):
        mask = np.zeros((40, 50), np.uint8)
        mask[5 + i:15 + i, 10:20] = 255
        iio.imwrite(root / "masks" / f"case-{i:02d}_mask.png", mask)
    with open(root / "boxes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "class", "y0", "x0", "y1", "x1"])
        for i in range(5, 12):
            w.writerow([f"case-{i:02d}.png", "lesion", 3, 4, 20, 30])
        w.writerow(["case-05.png", "lesion", 25, 30, 35, 45])  # second box on one image
        w.writerow(["case-99.png", "lesion", 1, 1, 5, 5])  # missing image: reported
        w.writerow(["case-06", "lesion", 30, 30, 60, 45])  # outside: reported
    with open(root / "tags.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "class", "present"])
        for i in range(12, 20):
            w.writerow([f"case-{i:02d}", "lesion", "present" if i % 2 else "absent"])
        w.writerow(["case-98", "lesion", "present"])  # missing image: reported
        w.writerow(["case-12", "tumour", "present"])  # unknown class: reported


def _site_info_lists_its_models(site: Path, capsys) -> None:
    """Which models a site holds, and which one prediction takes: an admin's first question after training."""
    import os
    import time

    from fedmix_engine.checkpoint import save_checkpoint
    from fedmix_engine.fedmix.pair import init_pair
    from fedmix_engine.model import ModelConfig

    tiny = ModelConfig(base_width=2)
    local = save_checkpoint(site / "models" / "local" / "final.safetensors", init_pair(tiny, 0), tiny, {"round": 7})
    os.utime(local, (time.time() - 60, time.time() - 60))
    (site / "models" / "global.safetensors").write_bytes(b"junk")  # a copy cut short, say
    assert main(["site", "info", str(site)]) == 0
    lines = capsys.readouterr().out.split("models:\n")[1].splitlines()
    assert lines[0].startswith("  federated: models/global.safetensors  (unreadable: truncated: shorter than a "
                               "safetensors header, written ") and lines[0].endswith("← newest: what 'predict SITE' "
                                                                                     "and napari's Predict take")
    assert lines[1].startswith("  local:     models/local/final.safetensors  (round 7, written ")
    assert "newest" not in lines[1]
    # the model lines read only the files' headers: no torch (1.4 s of the 2 s site info took)
    code = ("import sys; from fedmix_engine.cli import main; code = main(['site', 'info', sys.argv[1]]); "
            "print('exit', code, 'torch imported:', 'torch' in sys.modules)")
    said = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, timeout=120)
    assert "round 7, written " in said.stdout and said.stdout.endswith("exit 0 torch imported: False\n"), said


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", ".", " ", "tab\there"])
def test_a_site_name_that_is_not_one_folder_is_refused_before_the_site_is_made(name: str, tmp_path: Path,
                                                                               capsys) -> None:
    """simulate and make-federation use a site's name as a folder (eval/<name>/oracle); '../x' reached
    outside the evaluation tree. The folder of the refused site is not created."""
    assert main(["site", "init", str(tmp_path / "s"), "--classes", "lesion", "--name", name]) == 2
    assert capsys.readouterr().err.startswith(f"error: --name: site name {name!r} must be one folder's name")
    assert not (tmp_path / "s").exists()


def test_a_site_name_may_be_any_single_folder_name(tmp_path: Path, capsys) -> None:
    assert main(["site", "init", str(tmp_path / "s"), "--classes", "lesion", "--name", "Hôpital Nord (2)"]) == 0
    assert SiteStore.open(tmp_path / "s", readonly=True).config.name == "Hôpital Nord (2)"


def test_site_import_and_info(tmp_path: Path, capsys, rng) -> None:
    clinic = tmp_path / "clinic"
    _write_clinic_folder(clinic, rng)
    site = tmp_path / "site"
    assert main(["site", "init", str(site), "--classes", "lesion"]) == 0
    code = main(["site", "import", str(site), "--images", str(clinic / "images"), "--masks", str(clinic / "masks"),
                 "--boxes", str(clinic / "boxes.csv"), "--tags", str(clinic / "tags.csv")])
    out = capsys.readouterr().out
    assert code == 1, "problems must make the exit status non-zero"
    assert "images added: 20" in out and "masks: 5  boxes: 7  tags: 8" in out
    assert "boxes.csv:10: image 'case-99.png' is not in the site" in out
    assert "boxes.csv:11: box (30,30)–(60,45) lies outside the 40×50 image" in out
    assert ("boxes.csv: none of the boxes of 'case-06' imported, as 1 of its rows were refused (boxes are "
            "exhaustive: a lesion left out would train as background); the site keeps the boxes it held") in out
    assert "tags.csv:10: image 'case-98' is not in the site" in out
    assert "tags.csv:11: unknown class 'tumour'" in out

    assert main(["site", "info", str(site)]) == 0
    info = capsys.readouterr().out
    assert "mask-supervised: 5" in info
    assert "box-supervised:  6  (boxes: 7)" in info
    assert "tag-supervised:  8  (tags: 8: 4 present, 4 absent)" in info, "how many images are lesion-free"
    assert "problems: 0" in info
    assert "models: none yet (train in napari, or join a federation)" in info
    _site_info_lists_its_models(site, capsys)

    # re-import is idempotent: nothing duplicated
    main(["site", "import", str(site), "--images", str(clinic / "images"), "--boxes", str(clinic / "boxes.csv")])
    assert "already present: 20" in capsys.readouterr().out
    with SiteStore.open(site) as store:
        assert store.summary()["boxes"] == 7


def test_site_import_again_by_another_path_skips_what_it_holds_and_says_which_files_changed(
        tmp_path: Path, capsys, monkeypatch, rng) -> None:
    """A folder imported from a relative path, then again by its full path (or from another working folder), had
    every file refused as a 'duplicate image id: rename the file'; and a file corrected after import (a new export
    of the scan) was silently counted as already present while the site trained on the old pixels."""
    import os

    import tifffile

    clinic = tmp_path / "clinic"
    clinic.mkdir()
    for i in range(3):
        tifffile.imwrite(clinic / f"case{i}.tif", rng.integers(0, 255, (32, 40), dtype=np.uint8))
    monkeypatch.chdir(tmp_path)
    site = tmp_path / "site"
    assert main(["site", "import", "site", "--classes", "lesion", "--images", "clinic"]) == 0
    capsys.readouterr()
    assert main(["site", "import", str(site), "--images", str(clinic)]) == 0
    assert "images added: 0 (already present: 3)" in capsys.readouterr().out
    monkeypatch.chdir(clinic)
    assert main(["site", "import", str(site), "--images", "."]) == 0
    assert "images added: 0 (already present: 3)" in capsys.readouterr().out

    # case1 exported anew with other pixels (written after the site's copy); case2 rewritten, same pixels
    held = tifffile.imread(site / "images" / "case1.tif")
    tifffile.imwrite(clinic / "case1.tif", 255 - held)
    tifffile.imwrite(clinic / "case2.tif", tifffile.imread(clinic / "case2.tif"))
    later = (site / "images" / "case1.tif").stat().st_mtime + 60
    for name in ("case1.tif", "case2.tif"):
        os.utime(clinic / name, (later, later))
    # another clinic's folder with a file of the same name and other pixels
    other = tmp_path / "other"
    other.mkdir()
    tifffile.imwrite(other / "case0.tif", np.zeros((32, 40), np.uint8))
    assert main(["site", "import", str(site), "--images", str(clinic)]) == 1
    out = capsys.readouterr().out
    assert "images added: 0 (already present: 2)" in out
    assert (f"{clinic / 'case1.tif'}: changed since it was imported: its pixels are not those of the site's copy "
            "'case1', which the site keeps with its annotations") in out
    assert f"fedmix-engine site remove {site} case1" in out
    assert main(["site", "import", str(site), "--images", str(other)]) == 1
    out = capsys.readouterr().out
    assert (f"{other / 'case0.tif'}: the site already holds another image of this name, 'case0' (imported from "
            f"{clinic / 'case0.tif'})") in out
    with SiteStore.open(site) as store:
        assert np.array_equal(store.read_image("case1"), held), "the site keeps its copy until it is removed"
        assert {record.source for record in store.records()} == {str(clinic / f"case{i}.tif") for i in range(3)}

    # a site of an earlier version recorded the path as typed ('clinic/case0.tif', relative): another
    # clinic's folder of that name, run from elsewhere, is not taken for it, however old its files
    with SiteStore.open(site) as store:
        store.add_image(tifffile.imread(clinic / "case0.tif"), "old-0", origin="clinic/case-old.tif")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "clinic").mkdir(parents=True)
    tifffile.imwrite(elsewhere / "clinic" / "case-old.tif", np.ones((32, 40), np.uint8))
    os.utime(elsewhere / "clinic" / "case-old.tif", (1, 1))
    monkeypatch.chdir(elsewhere)
    assert main(["site", "import", str(site), "--images", "clinic"]) == 1
    out = capsys.readouterr().out
    assert "images added: 0 (already present: 0)" in out
    assert "clinic/case-old.tif: the site already holds another image of this name, 'old-0'" in out

    # removed (by the file's name, as the clinic knows it), then imported anew: the new pixels
    assert main(["site", "remove", str(site), "case1.tif"]) == 0
    assert main(["site", "import", str(site), "--images", str(clinic)]) == 0
    assert "images added: 1 (already present: 2)" in capsys.readouterr().out
    with SiteStore.open(site) as store:
        assert np.array_equal(store.read_image("case1"), 255 - held)


def test_site_import_again_keeps_what_the_site_corrected_since_and_takes_what_the_files_corrected(
        tmp_path: Path, capsys, rng) -> None:
    """A clinic imports its folder (images, masks, box and tag tables), a clinician corrects masks, boxes and
    tags in napari, and the folder is imported again to add new cases: every correction was overwritten by the
    old files, silently. An annotation the site changed after its file was written is now kept (and listed);
    a file changed after the site's annotation (a corrected export) still replaces it; --replace takes every
    file's; what the site holds as the files say is not written again."""
    import os
    import time

    clinic = tmp_path / "clinic"
    _write_clinic_folder(clinic, rng)
    site = tmp_path / "site"
    sources = ["--images", str(clinic / "images"), "--masks", str(clinic / "masks"), "--boxes",
               str(clinic / "boxes.csv"), "--tags", str(clinic / "tags.csv")]
    an_hour_ago = time.time() - 3600
    for path in [*clinic.rglob("*.png"), clinic / "boxes.csv", clinic / "tags.csv"]:
        os.utime(path, (an_hour_ago, an_hour_ago))  # exported before the import
    main(["site", "import", str(site), "--classes", "lesion", *sources])
    corrected = np.zeros((40, 50), np.uint8)
    corrected[20:30, 20:40] = 1
    with SiteStore.open(site) as store:  # the clinician, in napari, after the import
        store.set_mask("case-00", corrected, author="dr-napari")
        store.set_boxes("case-05", [Box("lesion", 1, 1, 9, 9)], author="dr-napari")
        store.set_tag("case-12", "lesion", True, author="dr-napari")  # tags.csv says absent
    later = time.time() + 60  # case-01's mask exported anew after that: the file is the newer
    newer = np.zeros((40, 50), np.uint8)
    newer[0:4, 0:4] = 255
    iio.imwrite(clinic / "masks" / "case-01_mask.png", newer)
    os.utime(clinic / "masks" / "case-01_mask.png", (later, later))
    capsys.readouterr()

    assert main(["site", "import", str(site), *sources]) == 1  # the tables' bad rows are still problems
    out = capsys.readouterr().out
    assert "masks: 1  boxes: 0  tags: 0  (unchanged: 15)" in out  # 3 masks, 5 images' boxes (not case-06's,
    # whose refused row leaves its boxes as they are), 7 tags
    assert "kept 3 annotation(s) the site changed after their files were written (site import --replace takes " \
           "the files'):" in out
    assert f"  {clinic / 'masks' / 'case-00_mask.png'}: the mask of 'case-00', changed in the site by dr-napari" in out
    assert f"  {clinic / 'boxes.csv'}: the boxes of 'case-05', changed in the site by dr-napari at " in out
    assert f"  {clinic / 'tags.csv'}:2: the tag lesion of 'case-12', changed in the site by dr-napari at " in out
    with SiteStore.open(site, readonly=True) as store:
        np.testing.assert_array_equal(store.read_mask("case-00"), corrected)
        assert [(b.y0, b.x0, b.y1, b.x1) for b in store.boxes("case-05")] == [(1, 1, 9, 9)]
        assert store.tags("case-12") == {"lesion": True}
        np.testing.assert_array_equal(store.read_mask("case-01"), newer // 255)

    assert main(["site", "import", str(site), *sources, "--replace"]) == 1
    out = capsys.readouterr().out
    assert "masks: 1  boxes: 2  tags: 1  (unchanged: 16)" in out and "kept" not in out
    with SiteStore.open(site, readonly=True) as store:
        assert store.mask_author("case-00")[0] != "dr-napari" and store.tags("case-12") == {"lesion": False}
        assert len(store.boxes("case-05")) == 2


def test_site_remove_takes_images_out_with_their_annotations_and_nothing_on_an_unknown_name(
        tmp_path: Path, capsys, rng) -> None:
    """A patient who withdrew consent, a scan imported by mistake: there was no way to take an image out of a
    site but to build the site again."""
    clinic = tmp_path / "clinic"
    _write_clinic_folder(clinic, rng)
    site = tmp_path / "site"
    main(["site", "import", str(site), "--classes", "lesion", "--images", str(clinic / "images"), "--masks",
          str(clinic / "masks"), "--boxes", str(clinic / "boxes.csv"), "--tags", str(clinic / "tags.csv")])
    with SiteStore.open(site) as store:
        before = {record.id: record for record in store.records()}
    masked = next(i for i, r in before.items() if r.has_mask)
    boxed = next(i for i, r in before.items() if r.boxes and not r.has_mask)
    capsys.readouterr()

    assert main(["site", "remove", str(site), masked, "case-0x"]) == 2
    err = capsys.readouterr().err
    assert f"case-0x: no image of this name in the site {site}; similar: case-" in err
    assert err.rstrip().endswith(f"(fedmix-engine site info {site} --images lists them)")
    assert main(["site", "info", str(site), "--images"]) == 0
    listed = capsys.readouterr().out.split("images (id, supervision, height×width, imported from):\n")[1]
    assert listed.splitlines()[:2] == [f"  case-00  mask  40×50  {clinic / 'images' / 'case-00.png'}",
                                       f"  case-01  mask  40×50  {clinic / 'images' / 'case-01.png'}"]
    with SiteStore.open(site) as store:
        assert len(store) == len(before), "a typing error removes nothing, not even the names before it"

    assert main(["site", "remove", str(site), masked, f"C:\\scans\\{boxed}.png", masked]) == 0
    out = capsys.readouterr().out
    assert (f"removed 2 image(s) with their annotations (masks: 1  boxes: {before[boxed].boxes}  tags: "
            f"{len(before[masked].tags) + len(before[boxed].tags)}):") in out
    assert f"  {boxed}  (imported from {clinic / 'images' / (boxed + '.png')})" in out
    assert "models the site trained before keep what they learnt from them" in out
    with SiteStore.open(site) as store:
        assert set(store.image_ids()) == set(before) - {masked, boxed}
        assert store.summary()["boxes"] == sum(r.boxes for r in before.values()) - before[boxed].boxes
    assert not (site / "images" / f"{masked}.tif").exists() and not (site / "masks" / f"{masked}.tif").exists()
    # the clinic's folder still holds both files: the weekly import of it would bring the patient back
    assert ("2 of them still have their source files in place: an import of their folders adds them again (a "
            "patient who withdrew consent: delete or move the files):\n"
            f"  {clinic / 'images' / (masked + '.png')}\n  {clinic / 'images' / (boxed + '.png')}\n") in out
    (clinic / "images" / f"{masked}.png").unlink()
    assert main(["site", "import", str(site), "--images", str(clinic / "images")]) == 0
    assert "images added: 1 " in capsys.readouterr().out, "what the line warned of: the other came back"
    assert main(["site", "remove", str(site), boxed]) == 0
    assert (f"its source file is still in place ({clinic / 'images' / (boxed + '.png')}): an import of its folder "
            "adds it again (a patient who withdrew consent: delete or move the file)\n") in capsys.readouterr().out
    main(["site", "import", str(site), "--images", str(clinic / "images")])
    (clinic / "images" / f"{boxed}.png").unlink()
    capsys.readouterr()
    assert main(["site", "remove", str(site), boxed]) == 0
    assert "source file" not in capsys.readouterr().out, "deleted from the clinic's folder: nothing to say"


def test_site_remove_deletes_the_lines_of_the_import_problem_logs_that_name_the_images(tmp_path: Path, capsys,
                                                                                         rng) -> None:
    """A patient's scan removed for withdrawn consent was still named, by its file's name (often the
    patient's), in the plain-text import problem logs of the site's logs/ folder."""
    clinic = tmp_path / "clinic"
    (clinic / "images").mkdir(parents=True)
    (clinic / "masks").mkdir()
    for name in ("Mueller Hans 1957", "case-1", "case-12"):
        iio.imwrite(clinic / "images" / f"{name}.png", rng.integers(0, 256, (32, 40), dtype=np.uint8))
        iio.imwrite(clinic / "masks" / f"{name}.png", np.ones((30, 40), np.uint8))  # of another size: problems
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(clinic / "images"), "--masks",
                 str(clinic / "masks")]) == 1
    log = next((site / "logs").glob("import-*-problems.txt"))
    assert "Mueller Hans 1957.png" in log.read_text() and len(log.read_text().splitlines()) == 3
    with SiteStore.open(site) as store:  # an image whose id is a word of every line: "… ≠ image shape …"
        store.add_image(rng.integers(0, 256, (32, 40), dtype=np.uint8), "image")
    capsys.readouterr()
    assert main(["site", "remove", str(site), "image"]) == 0
    assert "naming them" not in capsys.readouterr().out and len(log.read_text().splitlines()) == 3

    assert main(["site", "remove", str(site), "Mueller Hans 1957.png", "case-1"]) == 0
    assert "deleted 2 line(s) naming them from the import problem logs and export keys in logs/" in \
        capsys.readouterr().out
    assert log.read_text().splitlines() == [f"{clinic / 'masks' / 'case-12.png'}: mask shape 30×40 ≠ image shape "
                                            "32×40"], "case-12 is not case-1"
    assert main(["site", "remove", str(site), "case-12"]) == 0
    assert not log.exists(), "a log with nothing left in it goes"


def test_site_export_writes_what_import_reads_back_and_appears_whole_or_not_at_all(tmp_path: Path, capsys,
                                                                                   rng) -> None:
    """A clinic's masks, boxes and tags lived only in the site's database: weeks of annotation could not be
    taken to an archive, a research partner or another tool. ``site export`` writes them as import reads them;
    imported into a new site they are the same, image by image."""
    from fedmix_engine.data.export import export_site

    site = tmp_path / "site"
    with SiteStore.create(site, ["lesion", "cyst"], clock=lambda: "2026-11-30T10:00:00+00:00") as store:
        for name in ("masked", "boxed", "tagged", "bare"):
            store.add_image(rng.integers(0, 4096, (24, 30), dtype=np.uint16), name, spacing=(0.2, 0.25),
                            origin=f"C:\\scans\\{name} ä.dcm")
        mask = np.zeros((24, 30), np.uint8)
        mask[2:8, 3:9], mask[10:20, 12:25] = 1, 2
        store.set_mask("masked", mask, author="dr-a")
        store.add_box("boxed", "cyst", 1, 2, 10, 12, author="dr-b")
        store.add_box("boxed", "lesion", 5, 6, 20, 28, author="dr-b")
        store.set_tag("tagged", "lesion", True, author="dr-c")
        store.set_tag("tagged", "cyst", False, author="dr-c")
    capsys.readouterr()

    out = tmp_path / "export"
    assert main(["site", "export", str(site), str(out), "--images"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"exported to {out}: images: 4  masks: 1  boxes: 2  tags: 2",
                       f"to import it into another site: fedmix-engine site import SITE --images {out / 'images'} "
                       f"--masks {out / 'masks'} --boxes {out / 'boxes.csv'} --tags {out / 'tags.csv'}",
                       f"for annotation tools (CVAT, Label Studio …): {out / 'annotations.json'}, the masks and "
                       "boxes as COCO"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["masked_mask.tif"]
    assert (out / "boxes.csv").read_text().splitlines()[:2] == [
        "image,class,y0,x0,y1,x1,author,annotated_at,source",
        "boxed,cyst,1,2,10,12,dr-b,2026-11-30T10:00:00+00:00,C:\\scans\\boxed ä.dcm"]
    assert "tagged,cyst,absent,dr-c,2026-11-30T10:00:00+00:00" in (out / "tags.csv").read_text()
    assert (out / "masks.csv").read_text().splitlines() == [
        "image,file,author,annotated_at,source",
        "masked,masks/masked_mask.tif,dr-a,2026-11-30T10:00:00+00:00,C:\\scans\\masked ä.dcm"]

    again = tmp_path / "again"
    assert main(["site", "import", str(again), "--classes", "lesion,cyst", "--images", str(out / "images"), "--masks",
                 str(out / "masks"), "--boxes", str(out / "boxes.csv"), "--tags", str(out / "tags.csv")]) == 0
    with SiteStore.open(site, readonly=True) as before, SiteStore.open(again, readonly=True) as after:
        assert sorted(after.image_ids()) == sorted(before.image_ids())
        # who annotated, and when, comes along: the tables' columns, and masks.csv beside the masks (before, the
        # masks took the import's author, and every annotation the import's time)
        when = "2026-11-30T10:00:00+00:00"
        assert [(b.author, b.created_at) for b in after.boxes("boxed")] == [("dr-b", when), ("dr-b", when)]
        assert {(row[2], row[3]) for row in after.tag_rows("tagged")} == {("dr-c", when)}
        assert after.mask_author("masked") == ("dr-a", when)
        for image_id in before.image_ids():
            np.testing.assert_array_equal(after.read_image(image_id), before.read_image(image_id))
            assert after.spacing(image_id) == pytest.approx(before.spacing(image_id))
            mask_before, mask_after = before.read_mask(image_id), after.read_mask(image_id)
            assert (mask_before is None) == (mask_after is None)
            if mask_before is not None:
                np.testing.assert_array_equal(mask_after, mask_before)
            assert ([(b.class_name, b.y0, b.x0, b.y1, b.x1) for b in after.boxes(image_id)]
                    == [(b.class_name, b.y0, b.x0, b.y1, b.x1) for b in before.boxes(image_id)])
            assert after.tags(image_id) == before.tags(image_id)

    # the COCO file: what annotation tools open (pycocotools reads it as COCO), and import reads back the same
    from pycocotools.coco import COCO

    coco = COCO(str(out / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["lesion", "cyst"]
    assert sorted(i["file_name"] for i in coco.loadImgs(coco.getImgIds())) == ["images/boxed.tif", "images/masked.tif"]
    masked = next(i for i in coco.loadImgs(coco.getImgIds()) if i["file_name"] == "images/masked.tif")
    cyst = coco.loadAnns(coco.getAnnIds(imgIds=[masked["id"]], catIds=[2]))
    assert len(cyst) == 1 and cyst[0]["bbox"] == [12.0, 10.0, 13.0, 10.0]
    np.testing.assert_array_equal(coco.annToMask(cyst[0]), mask == 2)
    from_coco = tmp_path / "from-coco"
    assert main(["site", "import", str(from_coco), "--images", str(out / "images"), "--coco",
                 str(out / "annotations.json")]) == 0
    with SiteStore.open(site, readonly=True) as before, SiteStore.open(from_coco, readonly=True) as after:
        assert after.config.classes == ("lesion", "cyst")
        np.testing.assert_array_equal(after.read_mask("masked"), before.read_mask("masked"))
        assert sorted(b.key for b in after.boxes("boxed")) == sorted(b.key for b in before.boxes("boxed"))
        assert after.read_mask("boxed") is None and after.boxes("masked") == []

    # annotations only, for the site that holds the images; refused: a folder with files, one inside the site
    killed = tmp_path / ".annotations.partial-4194303"  # an export killed with SIGKILL: nothing could clean up
    (killed / "images").mkdir(parents=True)
    assert main(["site", "export", str(site), str(tmp_path / "annotations")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{killed}: the unfinished folder of another export to this name (one running now, or one a crash "
        "stopped: then delete it, it may hold copies of the site's images)")
    shutil.rmtree(killed)
    assert sorted(p.name for p in (tmp_path / "annotations").iterdir()) == ["annotations.json", "boxes.csv", "masks",
                                                                            "masks.csv", "tags.csv"]
    assert {i["file_name"] for i in json.loads((tmp_path / "annotations" / "annotations.json").read_text())["images"]
            } == {"masked ä.dcm", "boxed ä.dcm"}  # without --images: the files they were imported from
    capsys.readouterr()
    assert main(["site", "export", str(site), str(out)]) == 2
    assert f"{out}: exists and is not an empty folder" in capsys.readouterr().err
    assert main(["site", "export", str(site), str(site / "out")]) == 2
    assert f"is inside the site {site}" in capsys.readouterr().err
    assert main(["site", "export", str(site), "/proc/fedmix-export"]) == 2  # a folder nobody can create
    assert capsys.readouterr().err.startswith("error: /proc/fedmix-export: cannot be created (")
    (tmp_path / "a-file").write_text("")
    assert main(["site", "export", str(site), str(tmp_path / "a-file" / "out")]) == 2
    assert f"{tmp_path / 'a-file'}: is a file where a folder is needed" in capsys.readouterr().err
    (tmp_path / "a-file").unlink()

    # a damaged mask file (a disk error, a bad copy) leaves its image out, named; the rest is exported
    (site / "masks" / "masked.tif").write_bytes(b"II*\x00 damaged")
    assert main(["site", "export", str(site), str(tmp_path / "damaged"), "--images"]) == 1
    out = capsys.readouterr().out
    assert f"exported to {tmp_path / 'damaged'}: images: 3  masks: 0  boxes: 2  tags: 2" in out
    assert f"1 image(s) left out (the rest is exported):\n  {site / 'masks' / 'masked.tif'}: " in out
    assert sorted(p.name for p in (tmp_path / "damaged" / "images").iterdir()) == ["bare.tif", "boxed.tif",
                                                                                   "tagged.tif"]
    shutil.rmtree(tmp_path / "damaged")

    # stopped after the first image (Ctrl-C): no folder to be taken for a whole export, no partial left
    def stop(step):
        raise KeyboardInterrupt

    with SiteStore.open(site, readonly=True) as store, pytest.raises(KeyboardInterrupt):
        export_site(store, tmp_path / "stopped", images=True, progress=stop)
    assert not (tmp_path / "stopped").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "annotations", "export", "from-coco", "site"]


def test_site_import_adds_annotations_to_the_images_a_site_holds_without_images_again(tmp_path: Path, capsys,
                                                                                        rng) -> None:
    """A radiologist's boxes (or tags, or masks) delivered after the images were imported: --images was required,
    so the import had to be pointed at the images again, which may be archived by then."""
    import shutil

    clinic = tmp_path / "clinic"
    _write_clinic_folder(clinic, rng)
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(clinic / "images")]) == 0
    shutil.rmtree(clinic / "images")  # archived
    capsys.readouterr()
    assert main(["site", "import", str(site), "--masks", str(clinic / "masks"), "--boxes", str(clinic / "boxes.csv"),
                 "--tags", str(clinic / "tags.csv")]) == 1  # the table's rows of images it never had
    out = capsys.readouterr().out
    assert out.startswith("masks: 5  boxes: 7  tags: 8\n") and "images added" not in out
    with SiteStore.open(site, readonly=True) as store:
        assert store.summary()["mask"] == 5 and store.summary()["boxes"] == 7
    assert main(["site", "import", str(site)]) == 2
    assert "error: --images: nothing to import: give --images, and/or --masks, --boxes, --tags or --coco" in \
        capsys.readouterr().err
    assert main(["site", "import", str(tmp_path / "new"), "--classes", "lesion", "--boxes",
                 str(clinic / "boxes.csv")]) == 2
    assert "is not a site yet: a new site's import needs its --images" in capsys.readouterr().err
    assert main(["site", "import", str(tmp_path / "new"), "--images", str(clinic / "masks")]) == 2
    assert ("--classes: " + str(tmp_path / "new") + " is not a site yet: to create it with this import, name its "
            "classes") in capsys.readouterr().err  # it said 'site folder not found', as if a typo
    assert not (tmp_path / "new").exists()


def test_site_import_of_a_busi_style_folder_takes_masks_beside_images_and_joins_a_lesion_each(
        tmp_path: Path, capsys, rng) -> None:
    busi = tmp_path / "Dataset_BUSI" / "benign"
    busi.mkdir(parents=True)
    lesions = {"benign (1)": [(slice(4, 10), slice(4, 10))], "benign (4)": [(slice(2, 6), slice(2, 6)),
                                                                             (slice(12, 18), slice(10, 16))]}
    for name, boxes in lesions.items():
        iio.imwrite(busi / f"{name}.png", rng.integers(0, 256, (20, 24), dtype=np.uint8))
        for k, (rows, cols) in enumerate(boxes):
            mask = np.zeros((20, 24), np.uint8)
            mask[rows, cols] = 255  # BUSI masks are 0/255
            iio.imwrite(busi / f"{name}_mask{'' if k == 0 else f'_{k}'}.png", mask)
    iio.imwrite(busi / "benign (7).png", rng.integers(0, 256, (20, 24), dtype=np.uint8))  # no mask
    iio.imwrite(busi / "normal (2).png", rng.integers(0, 256, (20, 24), dtype=np.uint8))
    iio.imwrite(busi / "normal (2)_mask.png", np.zeros((20, 24), np.uint8))  # BUSI's "normal": an empty mask
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(busi), "--masks", str(busi)]) == 0
    out = capsys.readouterr().out
    assert "images added: 4" in out and "masks: 2" in out and "empty masks: 1 (no lesion" in out, out
    with SiteStore.open(site) as store:
        assert store.image_ids() == ["benign__1_", "benign__4_", "benign__7_", "normal__2_"], "masks are not images"
        assert store.tags("normal__2_") == {"lesion": False} and store.read_mask("normal__2_") is None
        joined = store.read_mask("benign__4_")
        assert joined[2:6, 2:6].all() and joined[12:18, 10:16].all() and joined.sum() == 16 + 36
        assert store.read_mask("benign__1_").sum() == 36 and store.read_mask("benign__7_") is None
    # without --masks the mask files were imported as images of their own, unlabelled (napari's Import folder
    # never did): they are masks either way
    assert main(["site", "import", str(tmp_path / "same"), "--classes", "lesion", "--images", str(busi)]) == 0
    assert "images added: 4" in (again := capsys.readouterr().out) and "masks: 2" in again, again
    with SiteStore.open(tmp_path / "same") as store:
        assert store.image_ids() == ["benign__1_", "benign__4_", "benign__7_", "normal__2_"]
        assert store.read_mask("benign__4_").sum() == 16 + 36


def test_site_import_keeps_files_named_in_any_script_apart_and_finds_their_masks_and_rows(
        tmp_path: Path, capsys, rng) -> None:
    """Ids are ASCII (they name the site's files), and every other letter was replaced by '_': a clinic's
    files named in Chinese or Cyrillic all became the id 'image', 'Bild_ä 1' and 'Bild_ö 1' one id, and all
    but one file was refused as a duplicate. Such names now keep a short hash of the whole name (accents
    taken off for the reader); masks and table rows are matched by the clinic's file names."""
    import unicodedata

    scans = tmp_path / "scans"
    scans.mkdir()
    names = ["Bild_ä 1", "Bild_ö 1", "患者-02", "病人-02", "Иванов", "Петров", "scan (3)"]
    for k, name in enumerate(names):
        iio.imwrite(scans / f"{name}.png", rng.integers(0, 256, (20, 24), dtype=np.uint8))
        mask = np.zeros((20, 24), np.uint8)
        mask[2:4 + k, 2:6] = 255
        iio.imwrite(scans / f"{name}_mask.png", mask)
    (tmp_path / "tags.csv").write_text("image,class,present\nИванов,lesion,present\nBild_ö 1.png,lesion,absent\n",
                                       encoding="utf-8")
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(scans), "--masks", str(scans),
                 "--tags", str(tmp_path / "tags.csv")]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "images added: 7" in out and "masks: 7" in out and "tags: 2" in out, out
    with SiteStore.open(site) as store:
        ids = {Path(record.source).stem: record.id for record in store.records()}
        assert len(set(ids.values())) == 7, ids
        assert ids["Bild_ä 1"].startswith("Bild_a_1-") and ids["患者-02"].startswith("02-"), ids
        assert ids["scan (3)"] == "scan__3_", "ASCII names keep the ids they always had"
        for k, name in enumerate(names):
            assert store.read_mask(ids[name]).sum() == (2 + k) * 4, (name, "its own mask")
        assert store.tags(ids["Иванов"]) == {"lesion": True} and store.tags(ids["Bild_ö 1"]) == {"lesion": False}
    from fedmix_engine.data.site_store import image_id_from_stem

    assert image_id_from_stem(unicodedata.normalize("NFD", "Bild_ä 1")) == ids["Bild_ä 1"], "a Mac's name: one id"

    # a site imported before, under the old ids ('Bild___1'): its files are still found, not added again
    old = tmp_path / "old-site"
    with SiteStore.create(old, ["lesion"]) as store:
        store.add_image(scans / "Bild_ä 1.png", image_id="Bild___1")
    (tmp_path / "more.csv").write_text("image,class,present\nBild_ä 1,lesion,present\n", encoding="utf-8")
    assert main(["site", "import", str(old), "--images", str(scans), "--masks", str(scans),
                 "--tags", str(tmp_path / "more.csv")]) == 0
    assert "images added: 6 (already present: 1)" in capsys.readouterr().out
    with SiteStore.open(old) as store:
        assert "Bild___1" in store.image_ids() and len(store) == 7
        assert store.read_mask("Bild___1").sum() == 8 and store.tags("Bild___1") == {"lesion": True}


def test_site_import_reports_bad_images_and_keeps_the_rest(tmp_path: Path, capsys, caplog, rng) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    iio.imwrite(folder / "good.png", rng.integers(0, 256, (20, 20), dtype=np.uint8))
    (folder / "broken.tif").write_bytes(b"II*\x00not a tiff at all")
    np.save(folder / "ignored.npy", np.zeros(3))
    assert main(["site", "import", str(tmp_path / "s"), "--classes", "lesion", "--images", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "images added: 1" in out and "broken.tif: unreadable or corrupt" in out
    assert not [r.getMessage() for r in caplog.records if r.name == "tifffile"], "said once, by us, not by tifffile"


def test_cli_errors_name_the_folder(tmp_path: Path, capsys) -> None:
    assert main(["site", "info", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: site folder not found" in capsys.readouterr().err
    (tmp_path / "scan.tif").write_bytes(b"not a site")
    assert main(["site", "info", str(tmp_path / "scan.tif")]) == 2
    assert "scan.tif: is a file, not a site folder" in capsys.readouterr().err
    assert main(["site", "import", str(tmp_path), "--images", str(tmp_path)]) == 2
    assert "not a site folder" in capsys.readouterr().err


def test_site_import_refuses_a_missing_input_before_creating_or_importing(tmp_path: Path, capsys, rng) -> None:
    clinic = tmp_path / "clinic"
    _write_clinic_folder(clinic, rng)
    site = tmp_path / "new-site"
    for extra, missing in ((["--masks", str(clinic / "maks")], "maks: folder not found"),
                           (["--tags", str(clinic / "tag.csv")], "tag.csv: file not found")):
        argv = ["site", "import", str(site), "--images", str(clinic / "images"), "--classes", "lesion", *extra]
        assert main(argv) == 2
        assert missing in capsys.readouterr().err
        assert not site.exists(), "no half-made site for a typo"
    assert main(["site", "import", str(site), "--images", str(clinic / "images"), "--classes", "lesion"]) == 0
    capsys.readouterr()
    assert main(["site", "import", str(site), "--images", str(clinic / "nowhere")]) == 2
    assert "nowhere: folder not found" in capsys.readouterr().err


def test_a_file_where_an_output_folder_belongs_is_named(tmp_path: Path, capsys) -> None:
    (tmp_path / "a-file").write_text("keep me")
    for argv in (["make-sample", str(tmp_path / "a-file"), "--images", "2", "--size", "32"],
                 ["make-sample", str(tmp_path / "a-file" / "sample"), "--images", "2", "--size", "32"],
                 ["flower-app", str(tmp_path / "a-file")]):
        assert main(argv) == 2
        assert f"{tmp_path / 'a-file'}: is a file where a folder is needed" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "keep me"


def test_flower_app_folder_from_the_cli(tmp_path: Path, capsys) -> None:
    """Writing the Flower App needs no flwr; values are typed like TOML, bad ones refused before writing."""
    assert main(["flower-app", str(tmp_path / "app"), "--set", "num-server-rounds=3", "--set", "keep-updates=true",
                 "--set", "out-dir=/srv/fedmix/run"]) == 0
    text = (tmp_path / "app" / "pyproject.toml").read_text()
    assert "num-server-rounds = 3" in text and "keep-updates = true" in text and 'out-dir = "/srv/fedmix/run"' in text
    assert 'clientapp = "fedmix_engine.federation.flower.app:clientapp"' in text
    assert main(["flower-app", str(tmp_path / "bad"), "--set", "lam=ten"]) == 2
    assert "'lam'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    for endless in ("-inf", "nan"):  # no deadline is inf, as serve's --round-timeout inf; these are no deadline
        assert main(["flower-app", str(tmp_path / "bad"), "--set", f"round-timeout={endless}"]) == 2
        assert "'round-timeout'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["flower-app", str(tmp_path / "endless"), "--set", "round-timeout=inf"]) == 0
    assert "\nround-timeout = inf\n" in (tmp_path / "endless" / "pyproject.toml").read_text()
    assert main(["flower-app", str(tmp_path / "app"), "--set", "num-server-rounds=4"]) == 0  # its own: rewritten
    assert "num-server-rounds = 4" in (tmp_path / "app" / "pyproject.toml").read_text()
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "pyproject.toml").write_text('[project]\nname = "mine"\n')
    assert main(["flower-app", str(tmp_path / "project")]) == 2
    assert "pyproject.toml: is another project's pyproject.toml" in capsys.readouterr().err
    assert (tmp_path / "project" / "pyproject.toml").read_text() == '[project]\nname = "mine"\n'


def test_import_steps_report_progress_and_an_import_stopped_midway_keeps_whole_images(tmp_path: Path, rng) -> None:
    from fedmix_engine.data.importer import ImportProgress, import_files_steps, import_folder_steps
    from fedmix_engine.steps import run_steps

    folder = tmp_path / "busi"
    folder.mkdir()
    for i in range(5):
        iio.imwrite(folder / f"case{i}.png", rng.integers(0, 256, (20, 24), dtype=np.uint8))
        mask = np.zeros((20, 24), np.uint8)
        mask[3:9, 4:12] = 255
        iio.imwrite(folder / f"case{i}_mask.png", mask)
    with pytest.raises(InputError, match="nowhere: folder not found"):
        import_folder_steps(SiteStore.create(tmp_path / "unused", ["lesion"]), tmp_path / "nowhere")  # before a step

    with SiteStore.create(tmp_path / "site", ["lesion"]) as store:
        steps = import_folder_steps(store, folder, masks=folder)
        assert [next(steps) for _ in range(3)] == [ImportProgress("images", n, 5) for n in (1, 2, 3)]
        steps.close()  # the GUI's Cancel: no further step runs
        assert store.image_ids() == ["case0", "case1", "case2"]
        assert all(store.read_image(i).shape == (20, 24) for i in store.image_ids())

        updates: list[ImportProgress] = []
        report = run_steps(import_folder_steps(store, folder, masks=folder), updates.append)
        assert updates[-1] == ImportProgress("masks", 5, 5) and len(updates) == 10
        assert (report.images_added, report.images_already_present, report.masks) == (2, 3, 5)

        updates.clear()
        report = run_steps(import_files_steps(store, [folder / "case0.png", tmp_path / "missing.png"]), updates.append)
        assert [u.done for u in updates] == [1, 2] and report.images_already_present == 1
        assert len(report.problems) == 1 and "missing.png" in report.problems[0]
        assert store.image_ids() == [f"case{i}" for i in range(5)]


def test_python_dash_m_runs_the_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fedmix_engine", "site", "info", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "nowhere: site folder not found" in done.stderr


def test_site_import_reads_excel_tables_and_refuses_an_unreadable_one_before_importing(tmp_path: Path, capsys,
                                                                                        rng) -> None:
    """Excel writes semicolons where the comma is the decimal mark, and its plain 'CSV' is not UTF-8. Its
    'Unicode Text' (UTF-16 with a byte-order mark, tab-separated) was refused as 'not UTF-8 text'."""
    clinic = tmp_path / "clinic"
    _write_clinic_folder(clinic, rng)
    (clinic / "tags;.csv").write_text("\ufeffImage;Class;Present\r\ncase-12;lesion;present\r\ncase-13;lesion;no\r\n"
                                      "C:\\clinic\\images\\case-14.png;lesion;yes\r\n",  # a path, as Windows writes it
                                      encoding="utf-8")
    (clinic / "boxes.tsv").write_bytes("image\tclass\ty0\tx0\ty1\tx1\r\ncase-05.png\tlesion\t3\t4\t20\t30\r\n"
                                       .encode("utf-16"))  # Excel's 'Unicode Text'
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(clinic / "images"),
                 "--boxes", str(clinic / "boxes.tsv"), "--tags", str(clinic / "tags;.csv")]) == 0
    assert "boxes: 1  tags: 3" in capsys.readouterr().out
    with SiteStore.open(site, readonly=True) as store:
        assert store.tags("case-12") == {"lesion": True} and store.tags("case-13") == {"lesion": False}
        assert store.tags("case-14") == {"lesion": True}
        assert len(store.boxes("case-05")) == 1

    (clinic / "latin1.csv").write_bytes("image,class,present\ncase-14,lésion,present\n".encode("cp1252"))
    fresh = tmp_path / "fresh"
    assert main(["site", "import", str(fresh), "--classes", "lesion", "--images", str(clinic / "images"),
                 "--tags", str(clinic / "latin1.csv")]) == 2
    assert "latin1.csv: line 2 is not UTF-8 text (byte 0xe9)" in capsys.readouterr().err
    assert not fresh.exists(), "nothing is created for an import that cannot be read"
    other = tmp_path / "other"
    assert main(["site", "init", str(other), "--classes", "lesion"]) == 0
    (clinic / "huge.csv").write_text("image,class,present\ncase-14,lesion,\"" + "x" * 200_000 + "\"\n")
    assert main(["site", "import", str(other), "--images", str(clinic / "images"),
                 "--tags", str(clinic / "huge.csv")]) == 2
    assert "huge.csv: not readable as CSV" in capsys.readouterr().err
    with SiteStore.open(other, readonly=True) as store:
        assert store.image_ids() == [], "the images wait until their tables can be read"


def test_site_import_prints_the_first_problems_and_logs_them_all(tmp_path: Path, capsys, rng) -> None:
    """A tag table of another study refused row by row printed every row, burying the counts; now the first 20
    are printed and every one is kept in the site's logs/ folder, so the rows can still be fixed."""
    clinic = tmp_path / "clinic"
    _write_clinic_folder(clinic, rng)
    (clinic / "tags.csv").write_text("image,class,present\n" + "".join(f"other-{i:03d},lesion,present\n"
                                                                      for i in range(45)))
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(clinic / "images"),
                 "--tags", str(clinic / "tags.csv")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "45 problem(s):" in out
    listed = [line for line in out if "is not in the site" in line]
    assert len(listed) == 20 and "tags.csv:2: image 'other-000'" in listed[0]
    logs = sorted((site / "logs").iterdir())
    assert len(logs) == 1 and logs[0].name.startswith("import-") and logs[0].name.endswith("-problems.txt")
    assert out[-1] == f"  … and 25 more; all 45 are listed in {logs[0]}"
    kept = logs[0].read_text().splitlines()
    assert len(kept) == 45 and kept[44].endswith("tags.csv:46: image 'other-044' is not in the site")
    with SiteStore.open(site, readonly=True) as store:
        assert len(store.image_ids()) == 20 and store.problems() == [], "the log is not a stray file of the site"

    # a second import in the same second keeps its own log; a short list is printed whole and names its log
    (clinic / "tags.csv").write_text("image,class,present\nother-1,lesion,present\n")
    assert main(["site", "import", str(site), "--images", str(clinic / "images"),
                 "--tags", str(clinic / "tags.csv")]) == 1
    out = capsys.readouterr().out.splitlines()
    logs = sorted((site / "logs").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert len(logs) == 2 and out[-1] == f"  (also listed in {logs[1]})"
    assert logs[1].read_text() == f"{clinic / 'tags.csv'}:2: image 'other-1' is not in the site\n"


def test_site_import_takes_a_spreadsheets_capitalised_class_and_decimal_comma(tmp_path: Path, capsys, rng) -> None:
    """A clinic's spreadsheet says 'Lesion' and, where the comma is the decimal mark, '10,5'; both were refused
    row by row. A capitalisation that fits two classes is still refused, naming the classes."""
    clinic = tmp_path / "clinic"
    _write_clinic_folder(clinic, rng)
    (clinic / "tags.csv").write_text("image;class;present\ncase-12;Lesion;present\ncase-13;LESION ;absent\n"
                                     "case-14;lesion;present\n")
    (clinic / "boxes.csv").write_text('image;class;y0;x0;y1;x1\ncase-05;Lesion;3,5;4;20,4;30\n'
                                      'case-06;lesion;3;4;1,2,3;30\ncase-07;lesion;3;4;inf;30\n')
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(clinic / "images"),
                 "--boxes", str(clinic / "boxes.csv"), "--tags", str(clinic / "tags.csv")]) == 1
    out = capsys.readouterr().out
    assert "boxes: 1  tags: 3" in out and "4 problem(s)" in out
    assert "boxes.csv:3: box corners must be numbers, got ['3', '4', '1,2,3', '30']" in out
    assert "boxes.csv:4: box corners must be finite numbers, got (3.0, 4.0, inf, 30.0)" in out  # was a traceback
    assert "boxes.csv: none of the boxes of 'case-06' imported, as 1 of its rows were refused" in out
    with SiteStore.open(site, readonly=True) as store:
        assert store.tags("case-12") == {"lesion": True} and store.tags("case-13") == {"lesion": False}
        assert [(b.class_name, b.y0, b.x0, b.y1, b.x1) for b in store.boxes("case-05")] == [("lesion", 4, 4, 20, 30)]

    twins = tmp_path / "twins"
    assert main(["site", "import", str(twins), "--classes", "cyst,Cyst", "--images", str(clinic / "images"),
                 "--tags", str(clinic / "tags.csv")]) == 1
    assert "tags.csv:2: unknown class 'Lesion'; this site's classes are: cyst, Cyst" in capsys.readouterr().out


def test_a_box_table_row_refused_leaves_its_images_boxes_as_they_were(tmp_path: Path, capsys, rng) -> None:
    """Boxes are exhaustive. A table whose row for an image was refused (a typo, a box past the edge) replaced
    the image's boxes with its other rows, so that lesion trained as background, and an image whose only row
    was refused lost every box the site held for it, with 'unchanged' counted: the clinic's later table with
    one bad row deleted annotations without a word."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("case-07", "case-08", "case-09"):
        iio.imwrite(images / f"{name}.png", rng.integers(0, 256, (40, 50), dtype=np.uint8))
    site, table = tmp_path / "site", tmp_path / "boxes.csv"
    table.write_text("image,class,y0,x0,y1,x1\ncase-07,lesion,1,1,9,9\ncase-07,lesion,20,20,30,30\n"
                     "case-08,lesion,5,5,15,15\n")
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(images), "--boxes",
                 str(table)]) == 0
    with SiteStore.open(site, readonly=True) as store:
        held = {name: store.boxes(name) for name in ("case-07", "case-08")}
    capsys.readouterr()

    time.sleep(0.01)
    table.write_text("image,class,y0,x0,y1,x1\ncase-07,lesion,1,1,9,9\ncase-07,lesion,20,20,45,30\n"
                     "case-08,lesion,5,5,15,99\ncase-09,lesion,2,2,8,8\ncase-09,lesion,2,2,8,x\n")
    assert main(["site", "import", str(site), "--boxes", str(table)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("masks: 0  boxes: 0  tags: 0\n"), out
    for name in ("case-07", "case-08", "case-09"):
        assert (f"{table}: none of the boxes of '{name}' imported, as 1 of its rows were refused (boxes are "
                "exhaustive: a lesion left out would train as background); the site keeps the boxes it held") in out
    with SiteStore.open(site, readonly=True) as store:
        assert {name: store.boxes(name) for name in ("case-07", "case-08")} == held
        assert store.boxes("case-09") == [] and store.record("case-09").supervision == "none"


def test_box_rows_of_classes_the_site_does_not_annotate_are_left_out_once_per_class(tmp_path: Path, capsys,
                                                                                      rng) -> None:
    """VinDr-CXR's table boxes 14 findings; a site annotating one of them was told of every other finding's row,
    one problem each (tens of thousands), and, by the rule that a refused row keeps its image's boxes out, lost
    the boxes of its own class on every image that also had another finding. Another class's box is no box of
    the site's classes: its rows are left out, said once per class, and the site's boxes imported."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b", "c"):
        iio.imwrite(images / f"{name}.png", rng.integers(0, 256, (40, 50), dtype=np.uint8))
    (tmp_path / "vindr.csv").write_text(
        "image_id,rad_id,class_name,x_min,y_min,x_max,y_max\n"
        "a,R1,Nodule/Mass,1,1,10,10\na,R2,Aortic enlargement,5,5,20,20\na,R3,Aortic enlargement,6,5,21,20\n"
        "b,R1,No finding,,,,\nb,R2,Cardiomegaly,2,2,30,30\nc,R1,Nodule/Mass,3,3,9,99\n")
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--classes", "Nodule/Mass", "--images", str(images), "--boxes",
                 str(tmp_path / "vindr.csv")]) == 1
    out = capsys.readouterr().out
    assert "masks: 0  boxes: 1  tags: 0" in out and "5 problem(s)" not in out, out
    table = tmp_path / "vindr.csv"
    assert (f"{table}: class 'Aortic enlargement' is not a class of the site (Nodule/Mass): its 2 row(s) left out\n"
            f"  {table}: class 'Cardiomegaly' is not a class of the site (Nodule/Mass): its 1 row(s) left out") in out
    assert f"{table}: none of the boxes of 'c' imported" in out, "a site class's bad row still keeps its image out"
    with SiteStore.open(site, readonly=True) as store:
        assert [b.key for b in store.boxes("a")] == [("Nodule/Mass", 1, 1, 10, 10)]
        assert store.boxes("b") == [] and store.boxes("c") == []


def test_a_tags_table_whose_readers_disagree_on_an_image_gives_it_no_tag_and_says_so(tmp_path: Path, capsys,
                                                                                        rng) -> None:
    """Image-level labels read by several radiologists come a row per reader (VinDr-CXR's): the rows of one
    image were applied one after another, so the first reader's tag stood and the next one's was reported as
    'kept, changed in the site by' the first reader, as if a clinician had corrected it in napari."""
    import os

    images = tmp_path / "images"
    images.mkdir()
    for name in ("s0", "s1", "s2"):
        iio.imwrite(images / f"{name}.png", rng.integers(0, 256, (20, 24), dtype=np.uint8))
    table = tmp_path / "image_labels.csv"
    table.write_text("image,class,present,author\ns0,lesion,1,R1\ns0,lesion,0,R2\ns0,lesion,1,R3\n"
                     "s1,lesion,0,R1\ns1,lesion,0,R2\ns2,lesion,1,R8\n")
    an_hour_ago = time.time() - 3600
    os.utime(table, (an_hour_ago, an_hour_ago))
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(images), "--tags",
                 str(table)]) == 1
    out = capsys.readouterr().out
    assert "masks: 0  boxes: 0  tags: 2\n" in out and "kept" not in out, out
    assert (f"{table}: the rows for lesion of 's0' disagree (present: lines 2 (R1), 4 (R3); absent: line 3 (R2)): no "
            "tag taken from them; leave one row per image and class (a consensus read, or the majority)") in out
    with SiteStore.open(site, readonly=True) as store:
        assert store.tags("s0") == {} and store.tags("s1") == {"lesion": False} and store.tags("s2") == {"lesion": True}
        assert store.tag_rows("s1")[0][2] == "R1"


def test_annotation_times_of_a_table_are_kept_and_a_time_without_zone_or_in_the_future_refused(
        tmp_path: Path, capsys, rng) -> None:
    """An archive's annotations imported again keep when they were made (site export writes annotated_at); a
    time that names no zone, or lies in the future (a wrong clock), is refused by its row, as it would make the
    annotation look newer than every file and keep it from later imports."""
    images, masks = tmp_path / "images", tmp_path / "export" / "masks"
    images.mkdir()
    masks.mkdir(parents=True)
    for name in ("a", "b", "c", "d"):
        iio.imwrite(images / f"{name}.png", rng.integers(0, 256, (20, 24), dtype=np.uint8))
    for name in ("a", "b"):
        iio.imwrite(masks / f"{name}_mask.png", np.pad(np.ones((4, 4), np.uint8), ((8, 8), (10, 10))))
    (masks.parent / "masks.csv").write_text("image,file,author,annotated_at,source\n"
                                            "a,masks/a_mask.png,dr-a,2025-03-01T09:30:00+01:00,x\n"
                                            "b,masks/b_mask.png,dr-b,yesterday,x\n")
    (tmp_path / "tags.csv").write_text("image,class,present,author,annotated_at\n"
                                       "c,lesion,present,dr-c,2025-03-02T10:00:00Z\n"
                                       "d,lesion,absent,dr-d,2025-03-02T10:00:00\n"
                                       "a,lesion,present,dr-a,2999-01-01T00:00:00+00:00\n")
    (tmp_path / "boxes.csv").write_text("image,class,y0,x0,y1,x1,author,annotated_at\n"
                                        "c,lesion,1,1,5,5,dr-c,2025-03-02T10:00:00.123456+00:00\n"
                                        "d,lesion,1,1,5,5,dr-d,\n")
    site = tmp_path / "site"
    good = (masks.parent / "masks.csv").read_bytes()
    (masks.parent / "masks.csv").write_bytes(good.replace(b"dr-a", "dr-ä".encode("latin-1")))  # Excel's code page
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(images), "--masks",
                 str(masks)]) == 2, "read with the tables, before anything is imported"
    assert "masks.csv: line 2 is not UTF-8 text" in capsys.readouterr().err and not site.exists()
    (masks.parent / "masks.csv").write_bytes(good)
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(images), "--masks", str(masks),
                 "--tags", str(tmp_path / "tags.csv"), "--boxes", str(tmp_path / "boxes.csv"),
                 "--author", "importer"]) == 1
    out = capsys.readouterr().out
    assert (f"{masks.parent / 'masks.csv'}:3: annotated_at 'yesterday' is not an ISO 8601 time "
            "(2026-11-30T10:00:00+00:00); its mask is imported with this import's author and time") in out
    assert (f"{tmp_path / 'tags.csv'}:3: annotated_at '2025-03-02T10:00:00' has no time zone (add +00:00 for UTC, "
            "or the offset)") in out
    assert (f"{tmp_path / 'tags.csv'}:4: annotated_at '2999-01-01T00:00:00+00:00' is in the future (a wrong clock "
            "where it was written?)") in out
    with SiteStore.open(site, readonly=True) as store:
        assert store.mask_author("a") == ("dr-a", "2025-03-01T08:30:00+00:00"), "in UTC, to the second"
        assert store.mask_author("b")[0] == "importer" and store.mask_author("b")[1] > "2026"
        assert store.tag_rows("c") == [("lesion", True, "dr-c", "2025-03-02T10:00:00+00:00")]
        assert store.tags("d") == {} and store.tags("a") == {}
        assert [(b.author, b.created_at) for b in store.boxes("c")] == [("dr-c", "2025-03-02T10:00:00+00:00")]
        assert store.boxes("d")[0].author == "dr-d" and store.boxes("d")[0].created_at > "2026"


def test_site_import_takes_box_tables_as_datasets_and_tools_write_them(tmp_path: Path, capsys, rng) -> None:
    """Box tables come as their tools and public datasets write them: corners named x_min … y_max (VinDr-CXR,
    Pascal VOC conversions) or a corner and a size (RSNA pneumonia: x, y, width, height, without a class
    column), an image column named image_id or patientId, a row with no box for an image without a finding.
    Each was refused whole ("missing column(s) class, y0, x0, y1, x1"), to be rewritten by hand."""
    clinic = tmp_path / "clinic"
    _write_clinic_folder(clinic, rng)
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(clinic / "images")]) == 0
    capsys.readouterr()
    (clinic / "vindr.csv").write_text("image_id,rad_id,class_name,x_min,y_min,x_max,y_max\n"
                                      "case-05,R8,Lesion,4.2,3,30,20.4\ncase-05,R9,lesion,30,25,45,35\n"
                                      "case-06,R8,No finding,,,,\n")
    assert main(["site", "import", str(site), "--boxes", str(clinic / "vindr.csv")]) == 0
    out = capsys.readouterr().out
    assert "boxes: 2" in out and "rows without a box (empty corners): 1" in out and "problem" not in out, out
    with SiteStore.open(site, readonly=True) as store:
        assert sorted(b.key for b in store.boxes("case-05")) == [("lesion", 3, 4, 20, 30), ("lesion", 25, 30, 35, 45)]
        assert store.boxes("case-06") == []

    (clinic / "rsna.csv").write_text("patientId;x;y;width;height;Target\ncase-07;10,5;5;20;12;1\n"
                                     "case-08;;;;;0\ncase-09;2;3;;4;1\n")
    assert main(["site", "import", str(site), "--boxes", str(clinic / "rsna.csv")]) == 1  # one class: the site's
    out = capsys.readouterr().out
    assert "boxes: 1" in out and "rows without a box (empty corners): 1" in out
    assert "rsna.csv:4: box corners must be numbers, got ['2', '3', '', '4']" in out, out
    with SiteStore.open(site, readonly=True) as store:
        assert [b.key for b in store.boxes("case-07")] == [("lesion", 5, 10, 17, 30)]  # y0 = y, y1 = y + height

    two = tmp_path / "two-classes"  # which class is a box? A table without a class column cannot say
    assert main(["site", "import", str(two), "--classes", "lesion,cyst", "--images", str(clinic / "images"),
                 "--boxes", str(clinic / "rsna.csv")]) == 1
    out = capsys.readouterr().out
    assert "boxes: 0" in out
    assert (f"{clinic / 'rsna.csv'}: no class column, and the site has 2 classes (lesion, cyst): add a column "
            "'class' naming each box's class; no box of the table imported") in out, out

    (clinic / "halves.csv").write_text("image,class,x_min,y_min,x1,y1\ncase-05,lesion,1,1,5,5\n")
    assert main(["site", "import", str(site), "--boxes", str(clinic / "halves.csv")]) == 2  # two layouts mixed
    assert ("missing column(s): a box's corners as y0,x0,y1,x1, or x_min,y_min,x_max,y_max, or "
            "x,y,width,height") in capsys.readouterr().err


def test_site_import_says_which_photos_a_photo_viewer_shows_turned(tmp_path: Path, capsys, rng) -> None:
    """A phone or camera photo (a skin lesion) carries an EXIF orientation: photo viewers and most annotation
    tools turn it upright, napari and the site keep its pixels as stored. A mask drawn upright on a square
    photo fitted the stored image silently, a quarter turn off; nothing said so."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, orientation in (("upright.jpg", 1), ("turned.jpg", 6), ("plain.jpg", None), ("mirrored.jpg", 2)):
        exif = Image.Exif()
        if orientation is not None:
            exif[0x0112] = orientation
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / name, exif=exif)
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--classes", "lesion", "--channels", "3", "--images",
                 str(folder)]) == 0
    out = capsys.readouterr().out
    assert ("2 photo(s) with an EXIF orientation (turned or mirrored by photo viewers): stored as their pixels "
            "are, as napari shows them; a mask drawn where they were shown turned will not fit") in out, out
    assert f"  {folder / 'mirrored.jpg'}" in out and f"  {folder / 'turned.jpg'}" in out
    assert "upright.jpg" not in out and "plain.jpg" not in out
    with SiteStore.open(site, readonly=True) as store:  # kept as stored
        np.testing.assert_array_equal(store.read_image("turned"), np.asarray(Image.open(folder / "turned.jpg")))


def test_site_import_says_when_colour_images_go_into_a_grey_site(tmp_path: Path, capsys, rng) -> None:
    """Dermoscopy or endoscopy photos imported without --channels 3 were trained as grey (their luma) and
    nothing said so: the colour a dermatologist reads a lesion by was dropped silently. Grey saved as RGB (an
    ultrasound export) loses nothing, and is not counted."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        iio.imwrite(folder / f"c{i}.png", rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    grey = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    iio.imwrite(folder / "grey.png", grey)
    iio.imwrite(folder / "grey_as_rgb.png", np.repeat(grey[..., None] // 2, 3, axis=2))  # other pixels: no copy
    assert main(["site", "import", str(tmp_path / "grey"), "--classes", "lesion", "--images", str(folder)]) == 0
    assert ("colour images in this grey site: 3 (trained as grey, by their luma; a site made with --channels 3, "
            "or napari's New site… for colour images, keeps their colour)") in capsys.readouterr().out
    assert main(["site", "import", str(tmp_path / "colour"), "--classes", "lesion", "--channels", "3",
                 "--images", str(folder)]) == 0
    assert "colour images" not in capsys.readouterr().out


def test_a_pseudonymised_export_lists_its_images_in_the_order_of_their_new_names(tmp_path: Path, rng) -> None:
    """The names were dealt at random, but the tables and the COCO file listed the images in import order,
    which follows the source files' names (often the patients'): a partner who knew the patient list could
    read the key back from the row order."""
    site, out = tmp_path / "site", tmp_path / "for-partner"
    surnames = ["Abel", "Bauer", "Braun", "Fischer", "Hoffmann", "Koch", "Meyer", "Mueller", "Richter", "Schmidt",
                "Schulz", "Wagner"]
    with SiteStore.create(site, ["lesion"]) as store:
        for k, surname in enumerate(surnames):
            store.add_image(rng.integers(0, 256, (16, 20), dtype=np.uint8), surname.lower(), origin=f"/pacs/{surname}")
            store.set_tag(surname.lower(), "lesion", bool(k % 2))
            store.add_box(surname.lower(), "lesion", 1, 2, 8, 9)
    assert main(["site", "export", str(site), str(out), "--pseudonymise"]) == 0
    dealt = [f"case-{k:03d}" for k in range(1, 13)]
    assert [row["image"] for row in csv.DictReader((out / "tags.csv").open())] == dealt
    assert [row["image"] for row in csv.DictReader((out / "boxes.csv").open())] == dealt
    coco = json.loads((out / "annotations.json").read_text())
    assert [image["file_name"] for image in sorted(coco["images"], key=lambda image: image["id"])] == [
        f"{name}.tif" for name in dealt]


def test_a_pseudonymised_export_names_no_patient_and_its_key_stays_at_the_site(tmp_path: Path, capsys,
                                                                               rng) -> None:
    """An export for a research partner named every image by its id and its source file, often the patient's
    name (Mueller_Hans_1957.dcm), in the file names, the tables and the COCO file. --pseudonymise names them
    case-001 … at random, names no source, and keeps the key at the site, where site remove finds it."""
    import os
    import stat

    site = tmp_path / "site"
    patients = ("Mueller_Hans_1957", "Schmidt_Eva_1960", "Abel_Karl_1949")
    with SiteStore.create(site, ["lesion"]) as store:
        for name in patients:
            store.add_image(rng.integers(0, 256, (24, 30), dtype=np.uint8), name.lower(), origin=f"/pacs/{name}.dcm")
        store.set_mask("mueller_hans_1957", np.pad(np.ones((4, 4), np.uint8), ((2, 18), (3, 23))), author="dr-a")
        store.add_box("schmidt_eva_1960", "lesion", 1, 2, 10, 12, author="dr-b")
        store.set_tag("abel_karl_1949", "lesion", False, author="dr-c")
    out = tmp_path / "for-partner"
    assert main(["site", "export", str(site), str(out), "--images", "--pseudonymise"]) == 0
    printed = capsys.readouterr().out
    key = next((site / "logs").glob("export-*-key.csv"))
    assert ("pseudonymised: images named case-…, dealt at random; no source file names (the annotators' names are "
            f"kept)\nthe key from those names to the site's images: {key} (it stays at the site") in printed
    written = b"".join(path.read_bytes() for path in out.rglob("*") if path.is_file())
    names = " ".join(str(path.relative_to(out)) for path in out.rglob("*"))
    for patient in patients:
        for spelled in (patient, patient.lower(), patient.split("_")[0]):
            assert spelled.encode() not in written and spelled not in names, spelled
    assert b"/pacs" not in written
    assert sorted(path.name for path in (out / "images").iterdir()) == ["case-001.tif", "case-002.tif", "case-003.tif"]
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    linked = {row["name"]: row for row in csv.DictReader(key.open())}
    assert {row["image"] for row in linked.values()} == {p.lower() for p in patients}
    assert linked[next(n for n, r in linked.items() if r["image"] == "abel_karl_1949")]["source"] == \
        "/pacs/Abel_Karl_1949.dcm"

    again = tmp_path / "partner-site"  # what the partner imports: the same annotations, under the new names
    assert main(["site", "import", str(again), "--classes", "lesion", "--images", str(out / "images"), "--masks",
                 str(out / "masks"), "--boxes", str(out / "boxes.csv"), "--tags", str(out / "tags.csv")]) == 0
    with SiteStore.open(site, readonly=True) as before, SiteStore.open(again, readonly=True) as after:
        for name, row in linked.items():
            np.testing.assert_array_equal(after.read_image(name), before.read_image(row["image"]))
            mask_before, mask_after = before.read_mask(row["image"]), after.read_mask(name)
            assert (mask_before is None) == (mask_after is None)
            assert [b.key for b in after.boxes(name)] == [b.key for b in before.boxes(row["image"])]
            assert after.tags(name) == before.tags(row["image"])
            assert "/pacs" not in after.record(name).source
    # the partner annotates the export (a box on Abel's case, a mask's case tagged) and sends its tables back:
    # with the key they come back to the site's own images
    abel = next(n for n, r in linked.items() if r["image"] == "abel_karl_1949")
    mueller = next(n for n, r in linked.items() if r["image"] == "mueller_hans_1957")
    (tmp_path / "returned.csv").write_text(f"image,class,y0,x0,y1,x1,author\n{abel},lesion,3,3,9,9,partner\n")
    (tmp_path / "returned-tags.csv").write_text(f"image,class,present,author\n{mueller}.tif,lesion,present,partner\n")
    capsys.readouterr()
    returned = ["site", "import", str(site), "--boxes", str(tmp_path / "returned.csv"), "--tags",
                str(tmp_path / "returned-tags.csv")]
    assert main(returned) == 1, "without the key the export's names are no image of the site"
    assert f"returned.csv:2: image '{abel}' is not in the site" in capsys.readouterr().out
    assert main([*returned, "--key", str(key)]) == 0
    assert "masks: 0  boxes: 1  tags: 1" in capsys.readouterr().out
    with SiteStore.open(site, readonly=True) as store:
        assert [(b.key, b.author) for b in store.boxes("abel_karl_1949")] == [(("lesion", 3, 3, 9, 9), "partner")]
        assert store.tags("mueller_hans_1957") == {"lesion": True}
    assert main([*returned, "--key", str(key), "--images", str(out / "images")]) == 2
    assert "error: --key: a pseudonymised export's key names the site's own images" in capsys.readouterr().err
    assert main([*returned, "--key", str(tmp_path / "returned.csv")]) == 2
    assert "returned.csv: is not the key of a pseudonymised export" in capsys.readouterr().err

    assert main(["site", "remove", str(site), "Mueller_Hans_1957.dcm"]) == 0
    assert "deleted 1 line(s) naming them from the import problem logs and export keys" in capsys.readouterr().out
    assert b"Mueller" not in key.read_bytes() and len(key.read_text().splitlines()) == 3

    # the key is written before the folder appears (a kill between the two leaves no export without its key),
    # and taken back with an export that fails at the end
    import pathlib

    from fedmix_engine.data import export

    def full_disk(self, target):
        raise OSError(28, "No space left on device", str(target))

    seen, write_key = [], export._write_key
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export, "_write_key", lambda *a: (seen.append((tmp_path / "ordered").exists()), write_key(*a)))
        assert main(["site", "export", str(site), str(tmp_path / "ordered"), "--pseudonymise"]) == 0
        assert seen == [False] and (tmp_path / "ordered" / "tags.csv").exists()
        capsys.readouterr()
        patch.setattr(pathlib.Path, "rename", full_disk)
        assert main(["site", "export", str(site), str(tmp_path / "failed"), "--pseudonymise"]) == 1
    keys = sorted(p.name for p in (site / "logs").glob("export-*"))
    assert len(keys) == 2 and key.name in keys and not (tmp_path / "failed").exists(), "the failed one's is gone"


def test_site_import_names_the_images_it_adds_that_copy_an_image_of_the_site(tmp_path: Path, capsys, rng) -> None:
    """Public datasets hold copies of one scan under two names (BUSI has some, even one filed as benign and
    as malignant), and a clinic's export can hold a scan twice: both were imported and trained without a
    word, and their annotations could contradict each other."""
    from fedmix_engine.data.imageio import pixel_digest

    scans = [rng.integers(0, 256, (20, 24), dtype=np.uint8) for _ in range(3)]
    benign, malignant = tmp_path / "benign", tmp_path / "malignant"
    benign.mkdir()
    malignant.mkdir()
    iio.imwrite(benign / "benign (1).png", scans[0])
    iio.imwrite(benign / "benign (2).png", scans[1])
    iio.imwrite(malignant / "malignant (7).png", scans[0])  # the copy filed under the other class
    iio.imwrite(malignant / "malignant (8).png", scans[2])
    iio.imwrite(malignant / "malignant (9).png", scans[2])  # and a copy within one import
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(benign)]) == 0
    assert "same pixels" not in capsys.readouterr().out
    assert main(["site", "import", str(site), "--images", str(malignant)]) == 0
    out = capsys.readouterr().out
    assert ("2 image(s) with the same pixels as an image of the site (a copy under another name, as public datasets "
            "hold: both train, and annotations that disagree contradict each other; `site remove` takes a copy "
            f"out):\n  {malignant / 'malignant (7).png'} = benign__1_\n  {malignant / 'malignant (9).png'} = "
            "malignant__8_\n") in out, out
    with SiteStore.open(site, readonly=True) as store:
        assert len(store) == 5, "copies are kept: the clinician decides which to take out"
        digests = store.pixel_digests()
        assert digests == {image_id: pixel_digest(store.read_image(image_id)) for image_id in store.image_ids()}
        assert digests["benign__1_"] == digests["malignant__7_"] != digests["benign__2_"]
    assert main(["site", "info", str(site)]) == 0  # what the site holds, later, before training
    assert ("copies (the pixels of an image imported before; both train): 2\n  malignant__7_ = benign__1_\n"
            "  malignant__9_ = malignant__8_\nproblems: 0\n") in capsys.readouterr().out
    import sqlite3

    with sqlite3.connect(site / "annotations.db") as db:
        db.execute("DELETE FROM digests WHERE image_id IN ('benign__2_', 'malignant__9_')")  # an earlier version's
    assert main(["site", "info", str(site)]) == 0
    assert ("copies (the pixels of an image imported before; both train): 1 (not known for 2 image(s) an earlier "
            "napari-fedmix imported: the next import that adds an image reads them once)\n"
            "  malignant__7_ = benign__1_\n") in capsys.readouterr().out


def test_a_site_of_an_earlier_version_gets_its_pixel_digests_once(tmp_path: Path, rng) -> None:
    """Sites imported before the digests were kept have none: they are read once, when first asked for, and
    kept; a read-only open of such a site computes them without writing."""
    import sqlite3

    from fedmix_engine.data.imageio import pixel_digest

    with SiteStore.create(tmp_path / "site", ["lesion"]) as store:
        for k in range(3):
            store.add_image(rng.integers(0, 256, (10, 12), dtype=np.uint8), f"img-{k}")
    with sqlite3.connect(tmp_path / "site" / "annotations.db") as db:
        db.execute("DROP TABLE digests")  # as an earlier version left it
    expected = {}
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        expected = {image_id: pixel_digest(store.read_image(image_id)) for image_id in store.image_ids()}
        assert store.pixel_digests() == expected
    with sqlite3.connect(tmp_path / "site" / "annotations.db") as db:
        assert not db.execute("SELECT 1 FROM sqlite_master WHERE name='digests'").fetchall(), "read-only wrote"
    with SiteStore.open(tmp_path / "site") as store:
        assert store.pixel_digests(["img-2"]) == {"img-2": expected["img-2"]}
        assert store.pixel_digests() == expected
        (tmp_path / "site" / "images" / "img-0.tif").unlink()  # kept: no file is read for it any more
        assert store.pixel_digests() == expected


def test_site_import_reads_the_labelme_files_beside_the_images(tmp_path: Path, capsys, rng) -> None:
    """LabelMe, the polygon tool of many imaging groups, saves each image's shapes as a JSON file beside it;
    importing the folder took the images and left every drawn lesion behind."""
    from pycocotools import mask as coco_mask

    folder = tmp_path / "labelme"
    folder.mkdir()
    for name in ("poly", "rect", "circle", "mixed", "lines", "broken", "bare", "dotted"):
        iio.imwrite(folder / f"{name}.png", rng.integers(0, 256, (40, 50), dtype=np.uint8))

    def shapes(name: str, *drawn: tuple[str, str, list]) -> None:
        (folder / f"{name}.json").write_text(json.dumps({
            "version": "5.4.1", "flags": {}, "imagePath": f"{name}.png", "imageData": None, "imageHeight": 40,
            "imageWidth": 50, "shapes": [{"label": label, "points": points, "group_id": None, "shape_type": kind,
                                          "flags": {}} for label, kind, points in drawn]}))

    pentagon = [[10, 5], [30, 5], [30, 15], [20, 25], [10, 15]]
    shapes("poly", ("lesion", "polygon", pentagon), ("ruler", "polygon", [[1, 1], [5, 1], [3, 4]]),
           ("ruler", "line", [[1, 1], [9, 9]]))  # a line is no region, and no lesion: the mask is taken
    # a lesion marked by a point: the polygon's mask alone would train that lesion as background
    shapes("dotted", ("lesion", "polygon", pentagon), ("lesion", "point", [[40, 30]]))
    shapes("rect", ("Lesion", "rectangle", [[30, 20], [4, 3]]))  # dragged up and left
    shapes("circle", ("lesion", "circle", [[25, 20], [25, 28]]))
    shapes("mixed", ("lesion", "polygon", pentagon), ("lesion", "rectangle", [[35, 30], [45, 35]]))
    shapes("lines", ("lesion", "line", [[1, 1], [9, 9]]))
    (folder / "broken.json").write_text('{"shapes": [')  # a save cut short
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "images added: 8" in out and "masks: 2  boxes: 3" in out, out
    for problem in (f"{folder / 'lines.json'}: shapes[0]: a line outlines no region (polygons, circles and "
                    "rectangles are read); left out",
                    f"{folder / 'broken.json'}: not a LabelMe file that can be read",
                    f"{folder}: LabelMe label 'ruler' is not a class of the site (lesion): its 1 shape(s) left out",
                    f"{folder / 'dotted.json'}: 'dotted.png': 1 of its annotations of a site class cannot be read "
                    "(listed above), so its other annotations alone would train that lesion as background: none of "
                    "them imported"):
        assert problem in out, out
    with SiteStore.open(site, readonly=True) as store:
        expected = coco_mask.decode(coco_mask.frPyObjects([[v for p in pentagon for v in p]], 40, 50))[..., 0]
        np.testing.assert_array_equal(store.read_mask("poly"), expected)
        assert [b.key for b in store.boxes("rect")] == [("lesion", 3, 4, 20, 30)]
        disk = store.read_mask("circle")
        assert disk[20, 25] == 1 and disk[20, 33] == 0 and abs(int(disk.sum()) - round(np.pi * 64)) < 12
        assert sorted(b.key for b in store.boxes("mixed")) == [("lesion", 5, 10, 25, 30), ("lesion", 30, 35, 35, 45)]
        assert store.read_mask("lines") is None and store.boxes("lines") == []
        assert store.read_mask("dotted") is None and store.boxes("dotted") == []


def _coco_file(clinic: Path) -> dict:
    """A COCO export as CVAT, VIA and Roboflow write one, for _write_clinic_folder's 40×50 images."""
    from pycocotools import mask as coco_mask

    region = np.zeros((40, 50), np.uint8, order="F")
    region[20:30, 5:12] = 1
    rle = coco_mask.encode(region)
    rle["counts"] = rle["counts"].decode()  # as JSON holds it
    files = {i: f"images/case-{i:02d}.png" for i in range(7)}  # a tool's file names keep their folder
    data = {
        "images": [{"id": i + 1, "file_name": name, "height": 40, "width": 50} for i, name in files.items()]
        + [{"id": 90, "file_name": "elsewhere.png", "height": 40, "width": 50},
           {"id": 91, "file_name": "case-08.png", "height": 50, "width": 40},
           {"id": 92, "file_name": "case-07.png", "height": 40, "width": 50}],
        "categories": [{"id": 1, "name": "Lesion"}, {"id": 2, "name": "artifact"}, {"id": 3, "name": "unused"}],
        "annotations": [
            # case-00: a region drawn by hand (a pentagon): its mask
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 20],
             "segmentation": [[10, 5, 30, 5, 30, 15, 20, 25, 10, 15]], "iscrowd": 0},
            # case-01: a rectangle (CVAT: no segmentation); case-02: a rectangle as a polygon (VIA)
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [4, 3, 26.4, 17], "segmentation": [], "iscrowd": 0},
            {"id": 3, "image_id": 3, "category_id": 1, "bbox": [4, 3, 26, 17],
             "segmentation": [[4, 3, 30, 3, 30, 20, 4, 20]], "iscrowd": 0},
            # case-03: a region and a rectangle: a mask would call the boxed lesion background, so two boxes
            {"id": 4, "image_id": 4, "category_id": 1, "segmentation": [[10, 5, 30, 5, 30, 15, 20, 25, 10, 15]]},
            {"id": 5, "image_id": 4, "category_id": 1, "bbox": [35, 30, 10, 5]},
            # case-04: a brush mask (run-length encoded), and an artifact, which is no class of the site
            {"id": 6, "image_id": 5, "category_id": 1, "segmentation": rle, "iscrowd": 1},
            {"id": 7, "image_id": 5, "category_id": 2, "bbox": [1, 1, 3, 3]},
            {"id": 8, "image_id": 90, "category_id": 1, "bbox": [1, 1, 3, 3]},
            {"id": 9, "image_id": 91, "category_id": 1, "bbox": [1, 1, 3, 3]},
            {"id": 10, "image_id": 6, "category_id": 1, "bbox": [1, 1, 3]},
            {"id": 12, "image_id": 6, "category_id": 1, "bbox": [2, 2, 5, 5]},
            {"id": 11, "image_id": 92, "category_id": 1, "bbox": [40, 30, 20, 5]},  # past the right edge
        ],
    }  # case-05: one annotation cannot be read, so the other is not imported either (it would train the lesion
    # the first marks as background); case-06: listed, not annotated yet; case-07: a box off the image
    (clinic / "coco.json").write_text(json.dumps(data))
    return {"region": region}


def test_site_import_takes_a_coco_file_regions_as_masks_rectangles_as_boxes(tmp_path: Path, capsys, rng) -> None:
    """An annotation tool's COCO export (CVAT, Labelbox, Roboflow, VIA) had to be turned into mask files and
    box tables by hand, and a rectangle tool's polygon taken for a region by such a script made a box a mask."""
    from pycocotools import mask as coco_mask

    clinic = tmp_path / "clinic"
    _write_clinic_folder(clinic, rng)
    parts = _coco_file(clinic)
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--images", str(clinic / "images"),
                 "--coco", str(clinic / "coco.json")]) == 1
    out = capsys.readouterr().out
    assert f"classes (from {clinic / 'coco.json'}'s categories, in label order): Lesion, artifact" in out, out
    assert "masks: 1  boxes: 6" in out and "images without annotations in the COCO file: 1" in out, out
    coco = clinic / "coco.json"
    for problem in (f"{coco}: annotations[9] (id 10): bbox must be 4 numbers (x, y, width, height), got [1, 1, 3]; "
                    "left out",
                    f"{coco}: image 'elsewhere.png' is not in the site",
                    f"{coco}: 'images/case-05.png': 1 of its annotations of a site class cannot be read (listed "
                    "above), so its other annotations alone would train that lesion as background: none of them "
                    "imported",
                    f"{coco}: 'case-07.png': annotations[11] (id 11): box (30,40)–(35,60) lies outside the "
                    "40×50 image",
                    f"{coco}: 'case-08.png' is 50×40 in the file and 40×50 in the site ('case-08'): its annotations "
                    "were drawn on another image (or the tool turned a photo by its EXIF orientation)"):
        assert problem in out, out
    with SiteStore.open(site, readonly=True) as store:
        assert store.config.classes == ("Lesion", "artifact")
        pentagon = coco_mask.decode(coco_mask.frPyObjects([[10, 5, 30, 5, 30, 15, 20, 25, 10, 15]], 40, 50))[..., 0]
        np.testing.assert_array_equal(store.read_mask("case-00"), pentagon)
        assert pentagon[10, 20] == 1 and pentagon[30, 40] == 0 and 200 < pentagon.sum() < 400
        assert [b.key for b in store.boxes("case-01")] == [("Lesion", 3, 4, 20, 30)]
        assert [b.key for b in store.boxes("case-02")] == [("Lesion", 3, 4, 20, 30)]  # a box, not a mask
        assert store.read_mask("case-02") is None
        assert sorted(b.key for b in store.boxes("case-03")) == [("Lesion", 5, 10, 25, 30), ("Lesion", 30, 35, 35, 45)]
        assert store.read_mask("case-03") is None
        # a brush mask beside an artifact's box: both boxes, the mask's from its pixels (it states no bbox)
        assert store.read_mask("case-04") is None and sorted(b.key for b in store.boxes("case-04")) == [
            ("Lesion", 20, 5, 30, 12), ("artifact", 1, 1, 4, 4)]
        assert store.boxes("case-05") == [] and store.read_mask("case-05") is None
        assert store.boxes("case-07") == [] and store.read_mask("case-07") is None

    one = tmp_path / "one-class"  # the artifact is no class here: said once, with how many were left out
    assert main(["site", "import", str(one), "--classes", "lesion", "--images", str(clinic / "images"),
                 "--coco", str(coco)]) == 1
    out = capsys.readouterr().out
    assert f"{coco}: category 'artifact' is not a class of the site (lesion): its 1 annotation(s) left out" in out
    with SiteStore.open(one, readonly=True) as store:
        np.testing.assert_array_equal(store.read_mask("case-04"), parts["region"])  # its brush mask, decoded
    assert main(["site", "import", str(one), "--coco", str(coco)]) == 1  # again: nothing changed, nothing written
    assert "masks: 0  boxes: 0  tags: 0  (unchanged: 5)" in capsys.readouterr().out

    (clinic / "not-coco.json").write_text('{"images": []}')
    assert main(["site", "import", str(one), "--coco", str(clinic / "not-coco.json")]) == 2
    assert (f"{clinic / 'not-coco.json'}: not a COCO annotation file: it needs the lists 'images', 'annotations' "
            "and 'categories'") in capsys.readouterr().err
    (clinic / "cut.json").write_text('{"images": [')  # a download cut short
    assert main(["site", "import", str(one), "--coco", str(clinic / "cut.json")]) == 2
    assert f"{clinic / 'cut.json'}: not JSON: Expecting value at line 1, column 13" in capsys.readouterr().err


def test_annotation_table_tells_boxes_of_any_layout_from_tags(tmp_path: Path) -> None:
    """napari's Import annotations tells a box table from a tag table by its header: a box table of another layout
    was taken for tags, each coordinate column for a class."""
    from fedmix_engine.data.importer import read_annotation_table

    (tmp_path / "xywh.csv").write_text("image,class,x,y,w,h\ncase-01,lesion,1,2,3,4\n")
    (tmp_path / "voc.csv").write_text("filename,class,xmin,ymin,xmax,ymax\ncase-01,lesion,1,2,3,4\n")
    (tmp_path / "labels.csv").write_text("image_id,rad_id,lesion\ncase-01,R1,1\n")
    for name in ("xywh.csv", "voc.csv"):
        sources = read_annotation_table(tmp_path / name)
        assert sources.tags is None and sources.boxes is not None, name
        assert sources.boxes[1][0][1]["image"] == "case-01"
    sources = read_annotation_table(tmp_path / "labels.csv")  # VinDr's image labels: a column per class
    assert sources.boxes is None and sources.tags is not None and sources.tags[1][0][1]["image"] == "case-01"


def test_site_import_takes_tags_as_a_spreadsheet_lays_them_out_a_column_per_class(tmp_path: Path, capsys,
                                                                                   rng) -> None:
    """A clinic's spreadsheet of image-level labels has a row per image and a column per class; it was refused
    ("missing column(s) class, present"), to be rewritten a row per tag by hand. An empty cell is no tag;
    a column that is not one of the site's classes (a note, an age) is said once and left out."""
    clinic = tmp_path / "clinic"
    _write_clinic_folder(clinic, rng)
    (clinic / "wide.csv").write_text("Image;Lesion;Cyst;notes\ncase-12;yes;0;large\ncase-13;no;;\n"
                                     "case-14;;1;\ncase-15;maybe;1;\n")
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--classes", "lesion,cyst", "--images", str(clinic / "images"),
                 "--tags", str(clinic / "wide.csv")]) == 1
    out = capsys.readouterr().out
    assert "tags: 5" in out and "2 problem(s)" in out, out
    assert "wide.csv: column 'notes' is not a class of the site (lesion, cyst): left out" in out
    assert "wide.csv:5: lesion: must be present or absent (yes/no, 1/0), got 'maybe'" in out
    with SiteStore.open(site, readonly=True) as store:
        assert store.tags("case-12") == {"lesion": True, "cyst": False}
        assert store.tags("case-13") == {"lesion": False}
        assert store.tags("case-14") == {"cyst": True} and store.tags("case-15") == {"cyst": True}

    # a sheet saved by pandas: a 0/1 column with an empty cell is written as floats, 1.0 and 0.0
    (clinic / "pandas.csv").write_text("image,lesion,cyst\ncase-18,1.0,\ncase-19,0.0,1.0\n")
    assert main(["site", "import", str(site), "--tags", str(clinic / "pandas.csv")]) == 0
    capsys.readouterr()
    with SiteStore.open(site, readonly=True) as store:
        assert store.tags("case-18") == {"lesion": True} and store.tags("case-19") == {"lesion": False, "cyst": True}

    # a reader study's sheet says who tagged each image: kept as the tags' author, not taken for a class
    (clinic / "readers.csv").write_text("image,lesion,Author\ncase-16,yes,dr-k\ncase-17,no,\n")
    assert main(["site", "import", str(site), "--tags", str(clinic / "readers.csv"), "--author", "importer"]) == 0
    assert "column 'author'" not in capsys.readouterr().out
    with SiteStore.open(site, readonly=True) as store:
        assert [row[:3] for row in store.tag_rows("case-16")] == [("lesion", True, "dr-k")]
        assert [row[:3] for row in store.tag_rows("case-17")] == [("lesion", False, "importer")]

    (clinic / "neither.csv").write_text("image\ncase-12\n")  # no class at all: refused before anything
    assert main(["site", "import", str(site), "--tags", str(clinic / "neither.csv")]) == 2
    assert ("neither.csv: no tag column; expected header: image,class,present, or image and a column per class "
            "(image,lesion,…)") in capsys.readouterr().err


def test_site_import_of_a_folder_without_images_says_what_it_holds(tmp_path: Path, capsys, rng) -> None:
    """Per-patient sub-folders or a folder of volumes imported nothing, said 'images added: 0' and exited 0."""
    nested = tmp_path / "scans"
    for patient in ("p01", "p02"):
        (nested / patient).mkdir(parents=True)
        iio.imwrite(nested / patient / "us.png", rng.integers(0, 256, (20, 24), dtype=np.uint8))
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(nested)]) == 2
    assert "scans: no image files (.tif" in (err := capsys.readouterr().err)
    assert "sub-folders (p01, p02) are not searched: give each one" in err
    assert not site.exists(), "no empty site is left behind"
    volumes = tmp_path / "export"
    volumes.mkdir()
    for i in range(3):
        (volumes / f"IM{i}.nii").write_bytes(b"\x5c\x01\x00\x00")
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(volumes)]) == 2
    assert "export: no image files" in (err := capsys.readouterr().err) and "it holds 3 .nii file(s)" in err
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(nested / "p01"),
                 "--masks", str(nested)]) == 2  # masks in sub-folders: they matched nothing, and nothing said so
    assert "scans: no image files" in capsys.readouterr().err and not site.exists()
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(nested / "p01")]) == 0
    assert "images added: 1" in capsys.readouterr().out


def test_site_import_matches_isic_gt_and_kvasir_masks(tmp_path: Path, capsys, rng) -> None:
    """ISIC (the paper's skin lesion data) names its masks ISIC_0000000_segmentation.png; '_GT' is common."""
    images, masks = tmp_path / "ISIC2018_Task1-2_Training_Input", tmp_path / "ISIC2018_Task1_Training_GroundTruth"
    images.mkdir()
    masks.mkdir()
    names = {"ISIC_0000000": "ISIC_0000000_segmentation.png", "ISIC_0000001": "ISIC_0000001_Segmentation.png",
             "case7": "case7_GT.png", "cju0": "cju0.jpg"}  # Kvasir-SEG: a JPEG mask, same name
    for stem, mask_name in names.items():
        iio.imwrite(images / f"{stem}.jpg", rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
        mask = np.zeros((30, 40), np.uint8)
        mask[5:15, 10:25] = 255
        iio.imwrite(masks / mask_name, mask)
    site = tmp_path / "isic"
    assert main(["site", "import", str(site), "--classes", "lesion", "--channels", "3", "--images", str(images),
                 "--masks", str(masks)]) == 0
    assert "masks: 4" in capsys.readouterr().out
    assert main(["site", "import", str(site), "--channels", "1", "--images", str(images)]) == 2
    assert "--channels: the site in" in capsys.readouterr().err
    with SiteStore.open(site, readonly=True) as store:
        assert store.config.channels == 3 and store.load_image("cju0").shape == (3, 30, 40)  # dermoscopy is colour
        assert [int(store.read_mask(stem).sum()) for stem in names][:3] == [150, 150, 150]
        assert abs(int(store.read_mask("cju0").sum()) - 150) <= 10  # thresholded JPEG edges


def test_site_import_of_a_busi_folder_joins_each_lesions_mask_and_tags_normal_images_absent(tmp_path: Path, capsys,
                                                                                           rng) -> None:
    benign = tmp_path / "Dataset_BUSI_with_GT" / "benign"
    benign.mkdir(parents=True)
    iio.imwrite(benign / "benign (1).png", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))  # BUSI saves RGB
    first, second = np.zeros((40, 50), np.uint8), np.zeros((40, 50), np.uint8)
    first[5:10, 5:10], second[20:30, 30:40] = 255, 255
    iio.imwrite(benign / "benign (1)_mask.png", first)
    iio.imwrite(benign / "benign (1)_mask_1.png", second)
    iio.imwrite(benign / "benign (2).png", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    iio.imwrite(benign / "benign (2)_mask.png", np.zeros((40, 50), np.uint8))  # BUSI's "normal": an empty mask
    site = tmp_path / "busi"
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(benign),
                 "--masks", str(benign)]) == 0
    out = capsys.readouterr().out
    assert "images added: 2" in out and "masks: 1" in out and "empty masks: 1" in out
    with SiteStore.open(site, readonly=True) as store:
        (lesion, normal) = store.records()
        assert int(store.read_mask(lesion.id).sum()) == 25 + 100  # both lesions' masks, joined
        assert store.tags(normal.id) == {"lesion": False}


@pytest.mark.parametrize("command", [
    ["site", "init", "{out}", "--classes", "lesion"],
    ["make-sample", "{out}", "--sites", "1", "--images", "2", "--size", "32"],
    ["token", "add", "site-a", "--state", "{out}"],
    ["serve", "--state", "{out}"],
    ["predict", "{checkpoint}", "{images}", "{out}"],
])
def test_an_output_folder_that_cannot_be_created_is_named_not_a_traceback(tmp_path: Path, capsys, command) -> None:
    """mkdir's FileNotFoundError or PermissionError (a read-only share, no permission) surfaced as a
    traceback from every command that writes; /proc takes no new folders, even from root."""
    import tifffile

    from fedmix_engine.checkpoint import save_checkpoint
    from fedmix_engine.fedmix.pair import init_pair
    from fedmix_engine.model import ModelConfig

    tiny = ModelConfig(base_width=2)
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", init_pair(tiny, 0), tiny, {"image_size": 32})
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "scan.tif", np.zeros((32, 32), np.uint8))
    out = Path("/proc/fedmix-no-such-folder/out")
    args = [a.format(out=out, checkpoint=checkpoint, images=tmp_path / "images") for a in command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}") and "cannot be created (" in err
    assert "choose a folder you can write to" in err


def test_an_output_folder_on_a_read_only_file_system_is_named_by_the_file_asked_for(tmp_path: Path, capsys) -> None:
    """A write into a read-only file system fails when its temporary file is created, and the error named
    that hidden temporary ('out/.summary.csv.c322a1eda85e.tmp: Read-only file system'); it now names the
    file the command was writing."""
    import subprocess

    import tifffile

    from disk_helpers import small_disk
    from fedmix_engine.atomic import atomic_write_bytes
    from fedmix_engine.checkpoint import save_checkpoint
    from fedmix_engine.fedmix.pair import init_pair
    from fedmix_engine.model import ModelConfig

    tiny = ModelConfig(base_width=2)
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", init_pair(tiny, 0), tiny, {"image_size": 32})
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "scan.tif", np.zeros((32, 32), np.uint8))
    with small_disk(tmp_path / "disk", 4 * 2**20) as disk:
        (disk / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(OSError) as raised:
            atomic_write_bytes(disk / "out" / "scores.json", b"{}")
        assert raised.value.filename == str(disk / "out" / "scores.json")
        assert main(["predict", str(checkpoint), str(tmp_path / "images"), str(disk / "out")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {disk / 'out'}/") and "Read-only file system (OSError)" in err, err
        assert ".tmp" not in err, err


def test_a_full_disk_is_said_in_one_line_naming_the_file(tmp_path: Path, capsys, monkeypatch) -> None:
    """An OSError is the machine's doing, not the input's: exit 1 with the file and the OS's words."""
    import errno

    import fedmix_engine.data.site_store

    def full(path, data, mode=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fedmix_engine.data.site_store, "atomic_write_bytes", full)
    assert main(["site", "init", str(tmp_path / "site"), "--classes", "lesion"]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'site' / 'site.json'}: No space left on device (OSError)\n"
