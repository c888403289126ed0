"""``fedmix-engine demo`` (the README's ``make demo``): a real server and three site processes on
127.0.0.1, end to end; and it never empties a folder it did not write."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import psutil

from fedmix_engine.cli import main
from fedmix_engine.federation.local_demo import MARKER, fresh_demo_folder
from waiting import wait_until

TINY = ["--rounds", "2", "--images", "8", "--size", "32", "--width", "4"]


def test_demo_runs_a_small_federation_end_to_end_and_never_empties_a_users_folder(tmp_path: Path, capsys,
                                                                                  monkeypatch) -> None:
    """Also on a machine whose web proxy is set for everything (a hospital's HTTP_PROXY, no NO_PROXY): the
    demo's server and sites are on this machine and talk directly (they went to the proxy, and failed)."""
    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))  # bound, not listening: a proxy that refuses every connection
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.getsockname()[1]}")
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

    fresh_demo_folder(out)()  # the next demo into its own folder starts from nothing (then let go)
    assert [p.name for p in out.iterdir()] == [MARKER]
    proxy.close()


def _running_demo(out: Path, log: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """A real ``fedmix-engine demo`` with many rounds, once its server and three sites run."""
    with log.open("wb") as handle:  # the child has its own copy
        demo = subprocess.Popen([sys.executable, "-m", "fedmix_engine.cli", "demo", str(out), "--rounds", "500",
                                 "--images", "8", "--size", "32", "--width", "4"],
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)

    def started() -> list[psutil.Process] | None:
        children = psutil.Process(demo.pid).children()
        return children if len(children) == 4 and "3/4" in log.read_text() else None

    try:
        return demo, wait_until(started, "the demo starting its server and sites", 90, demo, every=0.3,
                                detail=log.read_text)
    except AssertionError:
        _end(demo, psutil.Process(demo.pid).children() if demo.poll() is None else [])
        raise


def _end(demo: subprocess.Popen, children: list[psutil.Process]) -> None:
    """Whatever of a demo still runs (after a failed assertion too), ended."""
    if demo.poll() is None:
        demo.kill()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(children, timeout=30)


def test_a_running_demos_folder_is_refused_and_a_stopped_demo_stops_its_server_and_sites(
        tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    demo, children = _running_demo(out, tmp_path / "first.log")
    try:
        # a second demo into the same folder used to empty it under the running one
        assert main(["demo", str(out), *TINY]) == 2
        assert f"{out}: is in use by a running demo" in capsys.readouterr().err
        assert (out / "server-state").is_dir() and demo.poll() is None and all(c.is_running() for c in children)

        # `kill` (SIGTERM, as a service manager or a closed terminal's SIGHUP) used to end the demo alone:
        # its server and three sites went on, for all their rounds, holding the port and the folder
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(30) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"still running after the demo stopped: {[c.cmdline() for c in alive]}"
        assert "stopped by SIGTERM" in (tmp_path / "first.log").read_text()
    finally:
        _end(demo, children)

    # kill -9 leaves no chance to stop them: the folder stays refused while any of them runs, then is free
    demo, children = _running_demo(out, tmp_path / "second.log")
    try:
        demo.kill()
        demo.wait(10)
        assert all(c.is_running() for c in children)
        assert main(["demo", str(out), *TINY]) == 2
        assert "its server or sites may still run" in capsys.readouterr().err
    finally:
        _end(demo, children)
    fresh_demo_folder(out)()  # free again: emptied, and the hold released
    assert [p.name for p in out.iterdir()] == [MARKER]


def test_a_bad_demo_setting_is_refused_under_the_demos_option_before_anything_is_written(tmp_path: Path,
                                                                                          capsys) -> None:
    """'demo --rounds 0' wrote the sample federation, then ended with 'server: did not start; see
    logs/server.log', where the server had said why; the settings are now checked as serve checks them."""
    out = tmp_path / "demo"
    for given, said in ((["--rounds", "0"], "--rounds: must be positive, not 0"),
                        (["--width", "3"], "--width: must be an even number ≥ 2, not 3"),
                        (["--size", "8"], "--size: must be ≥ 16 (four 2× poolings), not 8")):
        assert main(["demo", str(out), *given]) == 2
        assert capsys.readouterr().err == f"error: {said}\n"
        assert not out.exists()
