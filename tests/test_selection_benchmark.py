"""benchmarks/selection.py: a quality workdir's runs seen without choosing each run's round by validation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedmix_engine.data.synthetic import make_sample
from fedmix_engine.evaluation import EvalSet
from model_helpers import no_lesion_checkpoint

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
METHODS = ["supervised-upper", "fedmix", "fedavg-mask-only"]  # quality.py's order
SITES = ["site-a", "site-b", "site-c"]


def _table(stdout: str) -> dict[str, list[float]]:
    """The table's rows by view label: the numbers of each cell (mean of "a ± b", a percentage)."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| view") and "---" not in line:
            label, *cells = [cell.strip() for cell in line.strip("| ").split(" | ")]
            rows[label] = [float("nan") if cell == "—" else float(cell.split(" ")[0]) for cell in cells]
    return rows


def test_three_views_of_the_same_runs_and_only_those_runs(tmp_path: Path, selection) -> None:
    """On quality.py's runs of a small federation (--federation: the run folders of the CPU profile's synthetic
    data, with 8 training and 10 + 10 held-out images per site where it has 32 and 50 + 50: half the time)."""
    fed, work = tmp_path / "fed", tmp_path / "work"
    # A masks, B boxes, C tags; lesion-free images in every test split, for the last check
    make_sample(fed, sites=3, images=8, eval_images=10, size=64, seed=0, lesion_free=0.3)
    quality = subprocess.run([sys.executable, str(BENCHMARKS / "quality.py"), "--federation", str(fed), "--methods",
                              ",".join(METHODS), "--seeds", "2", "--rounds", "2", "--jobs", "1", "--no-write",
                              "--workdir", str(work)], capture_output=True, text=True, timeout=600)
    assert quality.returncode == 0, quality.stdout + quality.stderr
    # the final round's model scored as the table's chosen one was: made the same model here, it must score the same
    chosen = work / "run-data-1-fedmix"
    shutil.copyfile(chosen / "best.safetensors", chosen / "final.safetensors")
    # another variant's folder (quality.py --loss dice+bce) is not one of these runs
    shutil.copytree(work / "run-data-0-fedmix", work / "run-data-0-fedmix-dicebce")
    (work / "run-data-0-fedmix-dicebce" / "summary.json").write_text(json.dumps(
        {**json.loads((work / "run-data-0-fedmix" / "summary.json").read_text()),
         "test_dice": dict.fromkeys(SITES, 0.0)}))

    run = subprocess.run([sys.executable, str(BENCHMARKS / "selection.py"), "--workdir", str(work), "--setting", "data",
                          "--last", "2", "--no-write"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = _table(run.stdout)
    assert list(rows) == ["chosen round (test)", "final round 2 (test)", "last 2 rounds (validation)"], run.stdout

    def overall(view: str, method: str, seed: int) -> float:
        folder = work / f"run-data-{seed}-{method}"
        if view == "chosen":
            return 100 * np.mean(list(json.loads((folder / "summary.json").read_text())["test_dice"].values()))
        rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [1, 2]
        return 100 * np.mean([np.mean(list(r["val_dice"].values())) for r in rounds])  # rounds 1–2, all sites

    for view, label in (("chosen", "chosen round (test)"), ("level", "last 2 rounds (validation)")):
        expected = {m: [overall(view, m, s) for s in (0, 1)] for m in METHODS}
        means = [float(np.mean(expected[m])) for m in METHODS]
        differences = [np.subtract(expected[m], expected["fedavg-mask-only"]) for m in METHODS[:2]]
        deltas = [float(np.mean(d)) for d in differences]
        assert np.allclose(rows[label][:5], [*means, *deltas], atol=0.051), (label, rows[label], means, deltas)
        gap_err = np.std(differences[0], ddof=1) / np.sqrt(2)
        if deltas[0] > 2 * gap_err:  # the share of FedMix in the upper bound's gap; within noise, none
            assert abs(rows[label][5] - 100 * deltas[1] / deltas[0]) < 1.5, (label, rows[label], deltas)
        else:
            assert np.isnan(rows[label][5]), (label, rows[label], deltas, gap_err)
    # the final view scores final.safetensors on each test split as simulate scored best.safetensors
    table = json.loads((chosen / "summary.json").read_text())["test_dice"]
    final = selection.run_views(chosen, last=2)["final"]
    assert all(abs(final[site] - table[site]) < 1e-4 for site in SITES), (final, table)
    # ... and reads final.safetensors, not best: a final model that finds no lesion scores the lesion-free share
    silent = work / "run-data-0-supervised-upper"
    no_lesion_checkpoint(silent / "final.safetensors", image_size=64)
    final = selection.run_views(silent, last=2)["final"]
    for site in SITES:
        truths = EvalSet.from_store(fed / "eval" / site / "test", 64, 1, 1).truths
        assert 0 < final[site] == np.mean([not t.any() for t in truths]) < 1, (site, final[site])

    missing = subprocess.run([sys.executable, str(BENCHMARKS / "selection.py"), "--workdir", str(work),
                              "--setting", "data", "--methods", "fedavg-mask-only,fedmix-fixed", "--no-write"],
                             capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0
    assert "setting data lacks finished runs of fedmix-fixed seed 0, fedmix-fixed seed 1" in missing.stderr


def test_a_view_row_gives_the_share_of_a_real_gap_and_none_of_a_gap_within_noise(selection) -> None:
    """The share cell with a gap beyond noise (the runs above, at 2 rounds, have none): upper 20 points above
    mask-only at every seed (±1), FedMix 5; per site and per seed in the note."""
    def views(upper: list[float]) -> dict:
        base = [0.50, 0.60, 0.55]
        dice = {"fedavg-mask-only": base, "supervised-upper": [b + u for b, u in zip(base, upper, strict=True)],
                "fedmix": [b + 0.05 for b in base]}
        return {(m, seed): {"final": {"site-a": d[seed], "site-b": d[seed]}} for m, d in dice.items()
                for seed in range(3)}

    row, note = selection.view_rows(views([0.19, 0.20, 0.21]), METHODS, "final", "final round 9 (test)")
    assert row == "| final round 9 (test) | 75.0 ± 4.5 | 60.0 ± 4.1 | 55.0 ± 4.1 | +20.0 ± 0.6 | +5.0 ± 0.0 | 25 % |"
    assert "site-a supervised-upper +20.0, fedmix +5.0" in note and "fedmix +5.0, +5.0, +5.0" in note
    noisy, _ = selection.view_rows(views([0.30, -0.10, 0.10]), METHODS, "final", "final round 9 (test)")
    assert noisy.endswith("| +10.0 ± 11.5 | +5.0 ± 0.0 | — |"), noisy
