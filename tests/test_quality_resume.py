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


def test_loss_option_trains_every_run_with_it_in_a_folder_of_its_own(tmp_path: Path) -> None:
    """--loss dice+bce must reach the simulations (not just the table's title) and must not resume or
    overwrite the soft-Dice runs of the same workdir."""
    run = subprocess.run([sys.executable, str(QUALITY), "--settings", "a", "--methods", "fedavg-mask-only",
                          "--seeds", "1", "--jobs", "1", "--no-write", "--workdir", str(tmp_path), "--rounds", "1",
                          "--loss", "dice+bce"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    config = (tmp_path / "run-a-0-fedavg-mask-only-dicebce" / "config.json").read_text()
    assert '"loss": "dice+bce"' in config
    assert not (tmp_path / "run-a-0-fedavg-mask-only").exists()
    assert "## Quality (CPU configuration, 1 rounds, dice+bce loss)" in run.stdout


def test_a_federation_of_colour_images_gets_a_colour_model(tmp_path: Path) -> None:
    """--federation: the model takes the federation's channels and classes (it was always grey, one class)."""
    import numpy as np

    from fedmix_engine.data.federation_split import make_federation
    from fedmix_engine.data.site_store import SiteStore

    rng = np.random.default_rng(0)
    with SiteStore.create(tmp_path / "derm", ["lesion"], channels=3) as source:
        for i in range(14):
            image_id = source.add_image(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), f"isic-{i}")
            mask = np.zeros((40, 40), np.uint8)
            mask[8:20 + i, 10:25] = 1
            source.set_mask(image_id, mask)
    make_federation([tmp_path / "derm"], tmp_path / "fed", split_into=3, val=0.15, test=0.15)
    run = subprocess.run([sys.executable, str(QUALITY), "--federation", str(tmp_path / "fed"), "--methods", "fedmix",
                          "--seeds", "1", "--jobs", "1", "--no-write", "--workdir", str(tmp_path / "work"),
                          "--rounds", "1"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    model = (tmp_path / "work" / "run-data-0-fedmix" / "config.json").read_text()
    assert '"in_channels": 3' in model


def test_the_benchmark_runs_a_network_an_installed_package_offers(tmp_path: Path, monkeypatch) -> None:
    """A researcher's network in the paper's table: --model reaches every simulation (spawned workers
    find it through the package's entry point), in run folders of its own; an unknown one is refused
    before any data is made."""
    from model_package_helpers import install_network_package

    env = install_network_package(tmp_path, monkeypatch)
    base = [sys.executable, str(QUALITY), "--settings", "a", "--methods", "fedavg-mask-only", "--seeds", "1",
            "--jobs", "1", "--no-write", "--workdir", str(tmp_path / "work"), "--rounds", "1"]
    run = subprocess.run([*base, "--model", "tiny-conv"], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    config = (tmp_path / "work" / "run-a-0-fedavg-mask-only-tiny-conv" / "config.json").read_text()
    assert '"name": "tiny-conv"' in config
    assert not (tmp_path / "work" / "run-a-0-fedavg-mask-only").exists()
    assert "## Quality (CPU configuration, 1 rounds, network tiny-conv)" in run.stdout
    assert "Model: network tiny-conv width" in run.stdout
    refused = subprocess.run([*base, "--model", "nope", "--workdir", str(tmp_path / "none")], capture_output=True,
                             text=True, timeout=600, env=env)
    assert refused.returncode == 2 and "--model: unknown model 'nope'; known: unet, broken" in refused.stderr
    assert not (tmp_path / "none").exists()
