"""The quality benchmark's table: paired differences by seed and the share of the gap closed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

QUALITY = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"


def _row(a: float, b: float) -> dict[str, float]:
    return {"site-a": a, "site-b": b, "overall": (a + b) / 2}


# seed 1 is hard for every method: unpaired, the spread over seeds would swamp the differences
MASK_ONLY = {0: _row(0.80, 0.60), 1: _row(0.40, 0.20), 2: _row(0.60, 0.40)}


def test_differences_are_paired_by_seed_not_by_completion_order(quality):
    results = {
        ("a", "fedavg-mask-only"): MASK_ONLY,
        ("a", "fedmix"): {2: _row(0.64, 0.44), 0: _row(0.84, 0.64), 1: _row(0.44, 0.24)},  # +4 at every seed
        ("a", "supervised-upper"): {0: _row(0.90, 0.70), 1: _row(0.50, 0.30), 2: _row(0.70, 0.50)},
    }
    lines = quality.table(results, "a", ["supervised-upper", "fedmix", "fedavg-mask-only"])
    fedmix = next(line for line in lines if line.startswith("| fedmix |"))
    assert fedmix.endswith("| +4.0 ± 0.0 |")  # every seed +4 points: no spread in the paired difference
    assert "| 60.0 ± 16.3 |" in next(line for line in lines if line.startswith("| fedavg-mask-only |"))
    assert lines[-1] == ("Gap between fedavg-mask-only and supervised-upper: 10.0 points; "
                         "share of it closed: fedmix 40 %.")


def test_no_share_of_a_gap_within_noise(quality):
    results = {
        ("a", "fedavg-mask-only"): MASK_ONLY,
        ("a", "fedmix"): {0: _row(0.70, 0.50), 1: _row(0.30, 0.10), 2: _row(0.50, 0.30)},
        ("a", "supervised-upper"): {0: _row(0.84, 0.64), 1: _row(0.36, 0.16), 2: _row(0.62, 0.42)},
    }
    lines = quality.table(results, "a", ["supervised-upper", "fedmix", "fedavg-mask-only"])
    assert lines[-1].startswith("No gap between fedavg-mask-only and supervised-upper beyond noise (+0.7 ± 2.4)")


def test_paired_standard_error(quality):
    mean, err = quality.paired({0: 3.0, 1: 5.0, 2: 7.0}, {0: 1.0, 1: 1.0, 2: 1.0, 3: 9.0})
    assert mean == pytest.approx(4.0)  # seed 3 has no partner and is left out
    assert err == pytest.approx(2.0 / 3**0.5)


def test_gap_line_without_a_weak_label_method_names_no_shares(quality):
    upper = {0: _row(0.90, 0.70), 1: _row(0.50, 0.30), 2: _row(0.70, 0.50)}
    results = {("a", "fedavg-mask-only"): MASK_ONLY, ("a", "supervised-upper"): upper}
    lines = quality.table(results, "a", ["supervised-upper", "fedavg-mask-only"])
    assert lines[-1] == "Gap between fedavg-mask-only and supervised-upper: 10.0 points."


def test_audit_table_weighs_rounds_by_their_pseudo_label_counts(quality):
    from types import SimpleNamespace

    def rnd(**kinds):
        return SimpleNamespace(pl_audit={"site-b": kinds})

    history = [rnd(box={"selected": 1, "rejected": 3, "dice": 0.9, "rejected_dice": 0.5, "size_ratio": 1.2}),
               rnd(box={"selected": 3, "rejected": 1, "dice": 0.7, "rejected_dice": 0.1, "size_ratio": 1.0}),
               rnd(box={"selected": 0, "rejected": 4, "dice": None, "rejected_dice": 0.2, "size_ratio": None})]
    totals = quality.audit_totals(history)
    assert totals["box"] == pytest.approx([4, 8, 0.9 + 2.1, 1.5 + 0.1 + 0.8, 1.2 + 3.0])
    lines = quality.audit_table({("a", "fedmix"): totals, ("b", "fedmix"): totals}, "a")
    row = next(line for line in lines if line.startswith("| fedmix | box |"))
    # 4 of 12 selected; Dice of the selected (0.9·1 + 0.7·3)/4 = 0.75, of the rejected 2.4/8 = 0.30
    assert row == "| fedmix | box | 33% of 12 | 0.75 | 0.30 | 1.05 |"
    assert quality.audit_table({("b", "fedmix"): totals}, "a") == []


def test_the_gpu_configuration_is_refused_without_a_gpu(tmp_path: Path) -> None:
    """--full on a CPU would train the reference width for days before printing a line."""
    import os
    import subprocess

    done = subprocess.run([sys.executable, str(QUALITY), "--full", "--no-write", "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2, done.stderr
    assert "--full is the GPU configuration" in done.stderr and "no GPU found" in done.stderr
    assert not (tmp_path / "work").exists()
