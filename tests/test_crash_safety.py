"""kill -9 in the middle of saving never loses an annotation whose save had returned."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedmix_engine.atomic import is_interrupted_write
from fedmix_engine.data.site_store import SiteStore
from waiting import wait_until

# The child saves masks, boxes and tags in a tight loop and prints one line after each save
# returns; the parent SIGKILLs it at an arbitrary moment.
CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from fedmix_engine.data.site_store import SiteStore
    store = SiteStore.open(sys.argv[1])
    ids = store.image_ids()
    i = 0
    while True:
        image_id = ids[i % len(ids)]
        mask = np.zeros((48, 64), np.uint8)
        mask[i % 40: i % 40 + 5, 3:9] = 1
        store.set_mask(image_id, mask)
        print(f"mask {image_id} {i}", flush=True)
        store.add_box(image_id, "lesion", i % 40, 0, i % 40 + 5, 10)
        print(f"box {image_id} {i}", flush=True)
        store.set_tag(image_id, "lesion", bool(i % 2))
        print(f"tag {image_id} {i}", flush=True)
        i += 1
""")


def _stderr_tail(proc: subprocess.Popen) -> str:
    """The end of an ended child's stderr (reading a running one's would wait for it to end)."""
    return proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ""


@pytest.mark.parametrize("kill_after", [31, 98, 160])
def test_sigkill_during_saves_loses_nothing_acknowledged(tmp_path: Path, grey_image, kill_after: int) -> None:
    with SiteStore.create(tmp_path / "site", ["lesion"]) as store:
        for k in range(4):
            store.add_image(grey_image, f"img-{k}")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "site")], stdout=subprocess.PIPE, text=True)
    acked: list[tuple[str, str, int]] = []
    deadline = time.monotonic() + 60
    while len(acked) < kill_after and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        kind, image_id, i = line.split()
        acked.append((kind, image_id, int(i)))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= kill_after, "child did not save enough before the deadline"
    # the child kept saving until the signal landed: what it acknowledged meanwhile is still in the pipe
    # (each line is one write below PIPE_BUF, so whole); without it a loaded machine shows "extra" boxes
    acked += [(kind, image_id, int(i)) for kind, image_id, i in map(str.split, proc.stdout.read().splitlines())]

    with SiteStore.open(tmp_path / "site") as store:
        stored = Counter((image_id, b.y0) for image_id in store.image_ids() for b in store.boxes(image_id))
        expected = Counter((image_id, i % 40) for kind, image_id, i in acked if kind == "box")
        missing = expected - stored
        assert not missing, f"acknowledged boxes lost: {missing}"
        assert sum(stored.values()) <= sum(expected.values()) + 1  # at most the one in flight
        # the last acknowledged mask and tag of each image are the ones on disk (or a newer one)
        for image_id in store.image_ids():
            last_mask = max((i for k, m, i in acked if k == "mask" and m == image_id), default=None)
            if last_mask is not None:
                mask = store.read_mask(image_id)
                assert mask is not None, f"{image_id}: acknowledged mask lost"
                rows = np.flatnonzero(mask.any(axis=1))
                assert rows[0] in {last_mask % 40, (last_mask + len(store.image_ids())) % 40}
            last_tag = max((i for k, m, i in acked if k == "tag" and m == image_id), default=None)
            if last_tag is not None:
                tag = store.tags(image_id)["lesion"]
                later = last_tag + len(store.image_ids())
                assert tag in {bool(last_tag % 2), bool(later % 2)}
        # a kill inside a mask's write leaves its temporary file, named as such; never a stray or a missing file
        problems = store.problems()
        assert all(is_interrupted_write(p.split(":")[0]) and "a crash or a kill interrupted" in p
                   for p in problems), problems
        assert len(problems) <= 1, "at most the one write in flight"
        # the store is still writable after the crash
        store.set_tag(store.image_ids()[0], "lesion", True)


def test_batch_predict_killed_with_sigkill_is_continued_to_what_an_uninterrupted_run_writes(tmp_path: Path) -> None:
    """An overnight batch on a workstation that loses power: `predict … --resume` keeps every mask the killed
    run had written (each was written whole, or not at all), predicts the rest, and ends with the masks,
    summary.csv and a finished prediction.json an uninterrupted run gives; nothing half-written is left."""
    import csv

    import tifffile

    from fedmix_engine.checkpoint import save_checkpoint
    from fedmix_engine.fedmix.pair import init_pair
    from fedmix_engine.model import ModelConfig

    folder, out, reference = tmp_path / "in", tmp_path / "out", tmp_path / "reference"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        tifffile.imwrite(folder / f"scan{i:02d}.tif", rng.integers(0, 255, (256, 256), dtype=np.uint8))
    model = ModelConfig(base_width=4)
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", init_pair(model, 0), model, {"image_size": 64})
    predict = [sys.executable, "-m", "fedmix_engine", "predict", str(checkpoint), str(folder)]
    proc = subprocess.Popen([*predict, str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until(lambda: len(list(out.glob("*_mask.tif"))) >= 8, "the batch writing 8 masks", 120, proc, every=0.01,
               detail=lambda: _stderr_tail(proc))
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*_mask.tif")}
    assert 8 <= len(written) < 40, "killed mid-batch"

    resumed = subprocess.run([*predict, str(out), "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{len(written)} kept from the earlier batch" in resumed.stdout, resumed.stdout
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in written.items()), "kept, not redone"
    assert subprocess.run([*predict, str(reference)], capture_output=True, timeout=300).returncode == 0
    masks = sorted(p.name for p in reference.glob("*_mask.tif"))
    assert sorted(p.name for p in out.glob("*_mask.tif")) == masks and len(masks) == 40
    for name in masks:
        np.testing.assert_array_equal(tifffile.imread(out / name), tifffile.imread(reference / name), err_msg=name)
    with open(out / "summary.csv", newline="") as mine, open(reference / "summary.csv", newline="") as theirs:
        assert list(csv.DictReader(mine)) == list(csv.DictReader(theirs))
    record = json.loads((out / "prediction.json").read_text())
    assert record["finished"] and record["files"]["kept"] == len(written) and record["files"]["ok"] == 40, record
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no temporary file is left behind"


def test_site_import_killed_with_sigkill_and_run_again_gives_the_site_a_clean_import_gives(tmp_path: Path) -> None:
    """A long `site import` cut off (a closed laptop, a kill): running the same import again adds what is
    missing, and the site equals one imported in one go; at most the write in flight leaves a temporary file,
    which `problems()` names as such."""
    import tifffile

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(150):
        tifffile.imwrite(images / f"case{i:03d}.tif", rng.integers(0, 255, (256, 256), dtype=np.uint8))
        mask = np.zeros((256, 256), np.uint8)
        mask[i % 200: i % 200 + 30, 20:70] = 1
        tifffile.imwrite(masks / f"case{i:03d}.tif", mask)
    site = [sys.executable, "-m", "fedmix_engine", "site"]

    def run_import(folder: Path) -> subprocess.Popen:
        return subprocess.Popen([*site, "import", str(folder), "--images", str(images), "--masks", str(masks)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    for folder in (tmp_path / "cut", tmp_path / "whole"):
        subprocess.run([*site, "init", str(folder), "--classes", "lesion"], check=True, capture_output=True)
    proc = run_import(tmp_path / "cut")
    wait_until(lambda: len(list((tmp_path / "cut" / "images").iterdir())) >= 20, "the import adding 20 images", 120,
               proc, every=0.005, detail=lambda: _stderr_tail(proc))
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    with SiteStore.open(tmp_path / "cut", readonly=True) as store:
        assert 0 < len(store.image_ids()) < 150, "killed mid-import"
    for folder in (tmp_path / "cut", tmp_path / "whole"):
        again = run_import(folder)
        assert again.wait(timeout=300) == 0, again.stderr.read().decode()[-2000:]
    with SiteStore.open(tmp_path / "cut") as cut, SiteStore.open(tmp_path / "whole") as whole:
        assert cut.image_ids() == whole.image_ids() and len(whole.image_ids()) == 150
        for image_id in whole.image_ids():
            np.testing.assert_array_equal(cut.read_image(image_id), whole.read_image(image_id))
            np.testing.assert_array_equal(cut.read_mask(image_id), whole.read_mask(image_id))
        assert whole.problems() == []
        assert all("a crash or a kill interrupted" in problem for problem in cut.problems()), cut.problems()
        assert len(cut.problems()) <= 1, "at most the one write in flight"


def _site_of_scans(tmp_path: Path, rng, names: list[str]) -> tuple[Path, Path]:
    """A folder of TIFF scans named ``names`` and a site that imported them, each with a mask."""
    import tifffile

    scans, site = tmp_path / "scans", tmp_path / "site"
    scans.mkdir()
    for name in names:
        tifffile.imwrite(scans / f"{name}.tif", rng.integers(0, 255, (24, 32), dtype=np.uint8))
    with SiteStore.create(site, ["lesion"]) as store:
        for path in sorted(scans.iterdir()):
            store.set_mask(store.add_image(path), (rng.random((24, 32)) > 0.5).astype(np.uint8))
    return scans, site


@pytest.mark.parametrize(("killed_at", "again"), [(1, "the same"), (3, "the same"), (3, "another")])
def test_a_removal_killed_part_way_is_finished_by_the_next(tmp_path: Path, rng, capsys, killed_at: int,
                                                           again: str) -> None:
    """A patient withdrew consent and `site remove` was killed (a closed terminal, a reboot) while it deleted
    files. Images went one at a time, so the images removed before the kill were unknown names to the same
    command run again, which refused everything, and the last one's pixels stayed on disk with no way but by
    hand to delete them."""

    from fedmix_engine.cli import main
    from kill_helpers import remove_killed

    scans, site = _site_of_scans(tmp_path, rng, [f"scan {k:02d}" for k in range(6)])
    named = ["scan_01", "scan 02.tif", str(scans / "scan 04.tif"), "scan_05"]
    remove_killed(site, named, killed_at)
    with SiteStore.open(site, readonly=True) as store:
        assert store.image_ids() == ["scan_00", "scan_03"], "the rows of all four went in one commit"
        assert store.pending_removals() == ["scan_01", "scan_02", "scan_04", "scan_05"]
        problems = store.problems()
        assert len(problems) == 4 and all("its removal was interrupted" in p for p in problems), problems
        assert f"`fedmix-engine site remove {site} scan_04` finishes it" in problems[2]
    left = {p.stem for folder in ("images", "masks") for p in (site / folder).iterdir()} - {"scan_00", "scan_03"}
    assert len(left) == 4 - (killed_at - 1), "killed before all files of the four were deleted"

    assert main(["site", "remove", str(site), *(named if again == "the same" else ["scan_00"])]) == 0
    out = capsys.readouterr().out
    assert ("finished the removal of 4 image(s) that an interrupted run had taken out of the database but not off "
            "the disk (their files are deleted now):\n  scan_01\n  scan_02\n  scan_04\n  scan_05\n") in out
    assert ("removed 0 image(s)" not in out) if again == "the same" else ("removed 1 image(s)" in out)
    kept = ["scan_00", "scan_03"] if again == "the same" else ["scan_03"]
    with SiteStore.open(site, readonly=True) as store:
        assert store.image_ids() == kept and store.problems() == [] and store.pending_removals() == []
        assert store.read_mask("scan_03") is not None
    assert sorted(p.name for folder in ("images", "masks") for p in (site / folder).iterdir()) == \
        sorted(f"{image_id}.tif" for image_id in kept * 2)
    assert main(["site", "remove", str(site), "scan_01"]) == 2, "finished: a name gone for good is refused again"


def test_an_image_imported_again_while_its_removal_is_pending_is_the_new_one_alone(tmp_path: Path, rng,
                                                                                     capsys) -> None:
    """A removal killed after its commit, then the clinic's folder imported again before any other removal:
    the images came back, but the site still noted their removal as pending, kept the removed masks' files,
    and `site remove` of a name site info gave as pending would have removed the image just imported."""
    import tifffile

    from fedmix_engine.cli import main
    from kill_helpers import remove_killed

    scans, site = _site_of_scans(tmp_path, rng, [f"scan_{k}" for k in range(4)])
    remove_killed(site, ["scan_1", "scan_2"], killed_at=1)
    assert main(["site", "import", str(site), "--images", str(scans)]) == 0
    assert "images added: 2 " in capsys.readouterr().out
    with SiteStore.open(site, readonly=True) as store:
        assert store.image_ids() == ["scan_0", "scan_3", "scan_1", "scan_2"]
        assert store.pending_removals() == [] and store.problems() == []
        assert store.read_mask("scan_1") is None and not (site / "masks" / "scan_2.tif").exists(), "removed masks"
        np.testing.assert_array_equal(store.read_image("scan_2"), tifffile.imread(scans / "scan_2.tif"))
