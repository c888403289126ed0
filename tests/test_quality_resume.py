"""The quality benchmark resumes its runs: a killed benchmark, or a higher --rounds, continues from
each run's last completed round instead of starting the hours-long table again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

QUALITY = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"


def test_resume_extends_finished_runs_without_running_their_rounds_again(tmp_path: Path) -> None:
    base = [sys.executable, str(QUALITY), "--settings", "a", "--methods", "fedavg-mask-only", "--seeds", "1",
            "--jobs", "1", "--no-write", "--workdir", str(tmp_path)]
    first = subprocess.run([*base, "--rounds", "1"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    metrics = tmp_path / "run-a-0-fedavg-mask-only" / "metrics.jsonl"
    (round_1,) = metrics.read_text().splitlines()
    second = subprocess.run([*base, "--rounds", "2", "--resume"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    lines = metrics.read_text().splitlines()
    # the same round-1 record, wall time included: it was carried over, not trained again
    assert len(lines) == 2 and lines[0] == round_1 and '"round": 2' in lines[1]
    assert "resumed: rounds run before the resume not counted" in second.stdout
