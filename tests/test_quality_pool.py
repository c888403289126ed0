"""The quality benchmark stops its worker processes when it is told to stop.

A benchmark killed with SIGTERM used to leave its two spawn workers computing for minutes, and the
next run on the machine measured its timings against them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

QUALITY = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"


def _state_and_parent(stat: Path) -> tuple[str, int] | None:
    """A process's state letter and parent pid from /proc/PID/stat; None once it has gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        return fields[0], int(fields[1])
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (zombies count as gone)."""
    return [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
            if (found := _state_and_parent(stat)) and found[1] == pid and found[0] != "Z"]


def _alive(pid: int) -> bool:
    found = _state_and_parent(Path(f"/proc/{pid}/stat"))
    return found is not None and found[0] != "Z"


def test_sigterm_stops_the_benchmark_and_its_workers(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(QUALITY), "--settings", "a", "--methods", "fedavg-mask-only", "--seeds", "1",
         "--rounds", "200", "--jobs", "2", "--no-write", "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while len(_children(proc.pid)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(3)  # let the workers get into their work (data generation, then the simulation)
        workers = _children(proc.pid)
        assert len(workers) >= 2, f"expected the worker pool, found children {workers}"
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM

        deadline = time.time() + 20
        while any(_alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if _alive(pid)], "workers outlived the benchmark"
    finally:
        if proc.poll() is None:
            proc.kill()
