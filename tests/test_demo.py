"""``fedmix-engine demo`` (the README's ``make demo``): a real server and three site processes on
127.0.0.1, end to end; and it never empties a folder it did not write."""

from __future__ import annotations

import re
from pathlib import Path

import imageio.v3 as iio

from fedmix_engine.cli import main
from fedmix_engine.federation.local_demo import MARKER, fresh_demo_folder

TINY = ["--rounds", "2", "--images", "8", "--size", "32", "--width", "4"]


def test_demo_runs_a_small_federation_end_to_end_and_never_empties_a_users_folder(tmp_path: Path, capsys) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "patient.tif").write_bytes(b"precious")
    assert main(["demo", str(scans), *TINY]) == 2
    assert f"{scans}: is not empty and was not written by the demo" in capsys.readouterr().err
    assert [p.name for p in scans.iterdir()] == ["patient.tif"] and (scans / "patient.tif").read_bytes() == b"precious"

    out = tmp_path / "demo"
    assert main(["demo", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    rounds = [line for line in printed.splitlines() if re.match(r"\s+[12]\s+w=", line)]
    assert len(rounds) == 2, printed
    assert len(re.findall(r"D=\d\.\d\d", rounds[-1])) == 3, "a held-out Dice per site"
    # scored at the sites and sent to the server (federated evaluation), for round 0's model too
    assert sorted(p.name for p in (out / "server-state" / "evaluations").iterdir()) == ["000000", "000001", "000002"]
    assert sorted(p.stem for p in (out / "server-state" / "evaluations" / "000002").iterdir()) == [
        "site-a", "site-b", "site-c"]
    png = iio.imread(out / "predictions.png")
    assert png.ndim == 3 and png.shape[0] >= 3 * 32, "one row of test images per site"
    assert (png[..., :3] == (40, 220, 40)).all(axis=-1).any(), "ground-truth outlines drawn"
    assert (out / "server-state").is_dir() and (out / MARKER).is_file()

    fresh_demo_folder(out)  # the next demo into its own folder starts from nothing
    assert [p.name for p in out.iterdir()] == [MARKER]
