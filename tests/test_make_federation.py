"""``make-federation``: a mixed-supervision federation from real, fully labelled sites, in the
layout ``simulate --sample`` reads; no weak site ever holds a mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedmix_engine.cli import main
from fedmix_engine.data.site_store import SiteStore
from fedmix_engine.data.synthetic import make_sample


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three fully labelled sites (the oracle stores of a synthetic federation stand in for real ones)."""
    out = tmp_path_factory.mktemp("labelled") / "sample"
    make_sample(out, sites=3, images=10, eval_images=1, seed=0, size=32)
    return [out / "eval" / name / "oracle" for name in ("site-a", "site-b", "site-c")]


def test_make_federation_splits_each_site_and_keeps_only_its_supervision(labelled: list[Path], tmp_path: Path,
                                                                         capsys) -> None:
    out = tmp_path / "fed"
    assert main(["make-federation", str(out), "--from", *map(str, labelled), "--val", "0.2", "--test", "0.2"]) == 0
    assert "run it: fedmix-engine simulate --sample" in capsys.readouterr().out
    manifest = json.loads((out / "federation.json").read_text())
    for index, (site, source) in enumerate(zip(manifest["sites"], labelled, strict=True)):
        with SiteStore.open(source, readonly=True) as src:
            source_ids = set(src.image_ids())
        parts = [set(site[k]) for k in ("train", "val", "test")]
        assert [len(p) for p in parts] == [6, 2, 2] and set().union(*parts) == source_ids
        assert site["name"] == f"site-{'abc'[index]}" and site["supervision"] == ("mask", "box", "tag")[index]
        with SiteStore.open(out / site["name"], readonly=True) as weak:
            assert set(weak.image_ids()) == parts[0]
            masks = [i for i in weak.image_ids() if weak.read_mask(i) is not None]
            boxes = [i for i in weak.image_ids() if weak.boxes(i)]
            if site["supervision"] == "mask":
                assert masks and not boxes
            else:  # a weak site never holds a mask: the ground truth is under eval/ only
                assert not masks and not list((out / site["name"] / "masks").iterdir())
                assert bool(boxes) == (site["supervision"] == "box")
        for split, ids in (("val", parts[1]), ("test", parts[2]), ("oracle", parts[0])):
            with SiteStore.open(out / "eval" / site["name"] / split, readonly=True) as full, \
                    SiteStore.open(source, readonly=True) as src:
                assert set(full.image_ids()) == ids
                for i in ids:  # the same pixels and the same full truth as the source
                    np.testing.assert_array_equal(full.read_image(i), src.read_image(i))
                    assert (full.read_mask(i) is None) == (src.read_mask(i) is None)
    assert main(["simulate", "--sample", str(out), "--rounds", "1", "--width", "4", "--image-size", "32",
                 "--crop-size", "32", "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    assert "test Dice: site-a" in capsys.readouterr().out


def test_one_source_dealt_into_two_sites(labelled: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "fed"
    assert main(["make-federation", str(out), "--from", str(labelled[0]), "--split-into", "2",
                 "--supervision", "mask,tag", "--val", "0.2", "--test", "0.2"]) == 0
    assert "wrote 2 site(s)" in capsys.readouterr().out
    sites = json.loads((out / "federation.json").read_text())["sites"]
    assert [s["name"] for s in sites] == ["site-a", "site-b"] and [s["supervision"] for s in sites] == ["mask", "tag"]
    shares = [set(s["train"]) | set(s["val"]) | set(s["test"]) for s in sites]
    with SiteStore.open(labelled[0], readonly=True) as src:
        assert shares[0] | shares[1] == set(src.image_ids()) and not shares[0] & shares[1]
    assert [(len(s["train"]), len(s["val"]), len(s["test"])) for s in sites] == [(3, 1, 1)] * 2


def test_make_federation_refuses_unlabelled_sites_other_classes_and_bad_fractions_before_writing(
        labelled: list[Path], tmp_path: Path, capsys) -> None:
    weak = tmp_path / "weak"
    with SiteStore.create(weak, ["lesion"]) as store:
        store.add_image(np.zeros((32, 32), np.uint8) + 7, "unlabelled")
    other = tmp_path / "other"
    with SiteStore.create(other, ["lesion", "cyst"]) as store:
        store.add_image(np.zeros((32, 32), np.uint8) + 7, "x")
        store.set_tag("x", "lesion", False)
        store.set_tag("x", "cyst", False)
    out = tmp_path / "fed"
    cases = [([str(labelled[0]), str(weak)], [], f"{weak}: 1 image(s) without full ground truth"),
             ([str(labelled[0]), str(other)], [], f"{other}: classes ['lesion', 'cyst']"),
             ([str(labelled[0]), str(labelled[0])], [], "--from: a site folder is given twice"),
             ([str(labelled[0])], ["--val", "0.6", "--test", "0.5"], "leave no training images"),
             ([str(labelled[0])], ["--test", "0"], "--test: a fraction"),
             ([str(labelled[0]), str(labelled[1])], ["--supervision", "mask"],
              "--supervision: names 1 kind(s) (mask) for 2 site(s): give one kind per site"),
             ([str(labelled[0]), str(labelled[1])], ["--split-into", "2"], "--split-into: deals one source's images "
              "into K sites; give one --from folder, not 2 (several sources are one site each without it)"),
             ([str(labelled[0])], ["--split-into", "0"], "--split-into: K sites per source must be ≥ 1"),
             ([str(tmp_path / "nowhere")], [], "nowhere: site folder not found")]
    for sources, extra, message in cases:
        assert main(["make-federation", str(out), "--from", *sources, *extra]) == 2, message
        assert message in capsys.readouterr().err
        assert not out.exists(), "nothing written"


def test_the_quality_benchmark_runs_on_a_made_federation(labelled: list[Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    from fedmix_engine.data.federation_split import make_federation

    fed = tmp_path / "busi-like"
    make_federation(labelled, fed, val=0.2, test=0.2)
    quality = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"
    run = subprocess.run([sys.executable, str(quality), "--federation", str(fed), "--methods",
                          "supervised-upper,fedavg-mask-only", "--seeds", "2", "--rounds", "1", "--jobs", "1",
                          "--no-write", "--workdir", str(tmp_path / "work")], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "### busi-like: A mask, B box, C tag" in run.stdout and f"Data: {fed}" in run.stdout
    rows = [line for line in run.stdout.splitlines() if line.startswith("| supervised-upper |")]
    assert len(rows) == 1 and rows[0].count("±") == 5, "three sites, overall and Δ, over two seeds"
    assert not list((tmp_path / "work").glob("data-*")), "no synthetic data made"


def test_make_federation_keeps_each_images_pixel_spacing(tmp_path: Path) -> None:
    """HD95 in mm on a made federation's test split needs the source images' spacing carried along."""
    source = tmp_path / "source"
    spacing = {f"img{i}": (0.4, 0.3) if i % 2 else None for i in range(10)}
    with SiteStore.create(source, ["lesion"]) as store:
        for image_id, given in spacing.items():
            store.add_image(np.full((32, 32), 9 + len(store.image_ids()), np.uint8), image_id, spacing=given)
            mask = np.zeros((32, 32), np.uint8)
            mask[4:12, 4:12] = 1
            store.set_mask(image_id, mask)
    out = tmp_path / "fed"
    assert main(["make-federation", str(out), "--from", str(source), "--supervision", "mask", "--val", "0.2",
                 "--test", "0.2"]) == 0
    seen = 0
    for folder in (out / "site-a", *(out / "eval" / "site-a" / split for split in ("val", "test", "oracle"))):
        with SiteStore.open(folder, readonly=True) as store:
            for image_id in store.image_ids():
                assert store.spacing(image_id) == spacing[image_id], (folder, image_id)
                seen += 1
    assert seen == 10 + 6  # train, val and test, and the oracle's copy of train


def _labelled_site(folder: Path, images: dict[str, np.ndarray]) -> Path:
    with SiteStore.create(folder, ["lesion"]) as store:
        for image_id, image in images.items():
            store.add_image(image, image_id)
            mask = np.zeros(image.shape, np.uint8)
            mask[4:12, 4:12] = 1
            store.set_mask(image_id, mask)
    return folder


def test_copies_of_one_image_stay_in_one_split_and_copies_across_sites_are_said(tmp_path: Path, capsys) -> None:
    """Public datasets hold copies of one image under two names (BUSI does): split image by image, a copy
    could train the model and the other be scored as a test case, flattering the Dice. Copies now stay
    together (in training, validation or test) and their count is said; a copy in another site is named,
    as a split cannot keep them apart. A source without copies is split exactly as before."""
    rng = np.random.default_rng(0)
    originals = {f"case-{i:02d}": rng.integers(0, 255, (32, 32), dtype=np.uint8) for i in range(20)}
    copies = {f"copy-of-{k}": v.copy() for k, v in originals.items()}
    source = _labelled_site(tmp_path / "busi", {**originals, **copies})
    other = _labelled_site(tmp_path / "other", {"same-as-case-03": originals["case-03"].copy(),
                                                **{f"own-{i}": rng.integers(0, 255, (32, 32), dtype=np.uint8)
                                                   for i in range(9)}})
    out = tmp_path / "fed"
    assert main(["make-federation", str(out), "--from", str(source), str(other), "--supervision", "mask,tag"]) == 0
    said = capsys.readouterr().out
    site = json.loads((out / "federation.json").read_text())["sites"][0]
    part_of = {image_id: part for part in ("train", "val", "test") for image_id in site[part]}
    assert len(part_of) == 40 and all(part_of[k] == part_of[f"copy-of-{k}"] for k in originals), part_of
    assert site["copies"] == 20 and "20 copies of other images kept in the same split" in said
    assert "site-b: 1 image is a copy of an image of site-a (same-as-case-03 = case-03)" in said

    plain = _labelled_site(tmp_path / "plain", originals)  # no copies: the split of before, image by image
    assert main(["make-federation", str(tmp_path / "fed2"), "--from", str(plain), "--supervision", "mask"]) == 0
    split = json.loads((tmp_path / "fed2" / "federation.json").read_text())["sites"][0]
    ids = sorted(originals)
    order = [ids[i] for i in np.random.default_rng([0, 0]).permutation(len(ids))]
    assert (split["train"], split["val"], split["test"]) == (order[:14], order[14:17], order[17:])
    assert split["copies"] == 0
