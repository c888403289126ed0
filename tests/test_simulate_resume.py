"""A simulation cut short (SIGKILL, or a run that ended and is extended) resumes after its last
completed round and computes exactly what the uninterrupted run computes (CPU, one thread)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedmix_engine.checkpoint import load_checkpoint
from fedmix_engine.cli import main
from fedmix_engine.data.synthetic import make_sample
from waiting import wait_until

SETTINGS = ["--width", "4", "--image-size", "32", "--crop-size", "32", "--batch-size", "4", "--device", "cpu",
            "--threads", "1"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "sample"
    make_sample(out, sites=3, images=8, eval_images=3, seed=0, size=32)
    return out


def records(run: Path) -> list[dict]:
    """metrics.jsonl without the wall times."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _rounds_written(run: Path) -> int:
    """The whole lines of a running simulation's metrics.jsonl (a round's line may be half written)."""
    metrics = run / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.exists() else 0


def assert_same_pair(a: Path, b: Path) -> None:
    pair_a, pair_b = load_checkpoint(a)[0], load_checkpoint(b)[0]
    assert pair_a.keys() == pair_b.keys()
    assert all(torch.equal(pair_a[k], pair_b[k]) for k in pair_a), f"{a} and {b} differ"


@pytest.mark.parametrize("method", ["fedmix", "local"])
def test_a_run_cut_short_resumes_to_exactly_the_uninterrupted_result(sample: Path, tmp_path: Path, method: str,
                                                                     capsys) -> None:
    common = ["simulate", "--sample", str(sample), "--method", method, *SETTINGS]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*common, "--rounds", "3", "--out", str(whole)]) == 0
    assert main([*common, "--rounds", "2", "--out", str(cut)]) == 0
    # what a kill during round 3 leaves: a snapshot without its commit file and a torn metrics line
    (cut / "snapshot-0003").mkdir()
    (cut / "snapshot-0003" / "global.safetensors").write_bytes(b"torn")
    with open(cut / "metrics.jsonl", "a") as handle:
        handle.write('{"round": 3, "weig')
    assert main([*common, "--rounds", "3", "--out", str(cut), "--resume"]) == 0
    assert " 3 site(s) for 3 round(s) → " in (said := capsys.readouterr().out) and "\nresuming at round 3 " in said
    assert records(cut) == records(whole) and len(records(cut)) == 3
    assert json.loads((cut / "summary.json").read_text()) == json.loads((whole / "summary.json").read_text())
    assert sorted(p.name for p in cut.glob("snapshot-*")) == ["snapshot-0003"], "older snapshots are dropped"
    if method == "local":  # each site's own pair
        for i in range(3):
            assert_same_pair(cut / "snapshot-0003" / f"pair-{i}.safetensors",
                             whole / "snapshot-0003" / f"pair-{i}.safetensors")
    else:
        assert_same_pair(cut / "final.safetensors", whole / "final.safetensors")
        assert_same_pair(cut / "best.safetensors", whole / "best.safetensors")


def test_simulate_killed_with_sigkill_resumes_to_the_uninterrupted_result(sample: Path, tmp_path: Path) -> None:
    common = ["simulate", "--sample", str(sample), "--rounds", "10", *SETTINGS]  # ≈ 0.2 s a round: a margin
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main([*common, "--out", str(whole)]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "fedmix_engine.cli", *common, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    wait_until(lambda: _rounds_written(killed) >= 2, "two rounds written", 120, proc, every=0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "killed mid-run, not finished"
    done = len((killed / "metrics.jsonl").read_text().splitlines())
    assert 2 <= done < 10 and not (killed / "summary.json").exists()
    assert main([*common, "--out", str(killed), "--resume"]) == 0
    assert records(killed) == records(whole)
    assert_same_pair(killed / "final.safetensors", whole / "final.safetensors")
    assert_same_pair(killed / "best.safetensors", whole / "best.safetensors")


def test_a_second_run_into_a_running_runs_folder_is_refused_and_the_lock_goes_with_a_kill(sample: Path,
                                                                                          tmp_path: Path, capsys):
    """A second run into the --out of one still running (--overwrite or --resume from another terminal, or
    napari's Train on the site whose models/local a terminal's simulate writes) cleared its snapshots and
    metrics under it, then both wrote the same files. Refused now, before it writes; a kill -9 frees it."""
    common = ["simulate", "--sample", str(sample), "--rounds", "500", *SETTINGS]
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedmix_engine.cli", *common, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        wait_until(lambda: _rounds_written(run) >= 2, "two rounds written", 120, proc, every=0.02)
        capsys.readouterr()
        for again in (["--overwrite", "--rounds", "2"], ["--resume"]):  # old code: overwrote in 2 rounds
            assert main([*common, "--out", str(run), *again]) == 2
            assert f"error: {run}: another run is writing to this folder" in capsys.readouterr().err
        assert proc.poll() is None, "the first run goes on"
        time.sleep(1)
        assert len(records(run)) >= 2 and (run / "config.json").is_file(), "nothing of the first run was cleared"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert main([*common[:3], "--rounds", str(len(records(run)) + 1), *SETTINGS, "--out", str(run), "--resume"]) == 0


def test_a_resume_into_a_run_still_writing_says_so_before_it_reads_the_snapshot(sample: Path, tmp_path: Path,
                                                                              capsys) -> None:
    """A resume read the run's newest snapshot before it asked whether another run held the folder. The
    running one removes its older snapshot after writing a newer one, so the resume could read a snapshot
    half removed and say 'snapshot-0002/best.safetensors: checkpoint file not found' (seen in a full
    suite run) instead of naming the run still writing there."""
    from fedmix_engine.folder_lock import hold_folder
    from fedmix_engine.simulate import RUN_LOCK

    run = tmp_path / "run"
    assert main(["simulate", "--sample", str(sample), "--rounds", "2", *SETTINGS, "--out", str(run)]) == 0
    capsys.readouterr()
    (run / "snapshot-0002" / "best.safetensors").unlink()  # as the running run's clean-up leaves it, mid-way
    other = hold_folder(run, "held by the test", RUN_LOCK)  # the run still writing
    try:
        assert main(["simulate", "--sample", str(sample), "--rounds", "3", *SETTINGS, "--out", str(run),
                     "--resume"]) == 2
        assert f"error: {run}: another run is writing to this folder" in capsys.readouterr().err
    finally:
        other()


def test_resume_refuses_other_settings_other_sites_fewer_rounds_and_a_folder_without_a_run(
        sample: Path, tmp_path: Path, capsys) -> None:
    common = ["simulate", "--sample", str(sample), *SETTINGS]
    run = tmp_path / "run"
    assert main([*common, "--rounds", "2", "--out", str(run)]) == 0
    capsys.readouterr()
    before = ((run / "metrics.jsonl").read_text(), (run / "final.safetensors").read_bytes())
    sites = ["simulate", "--sites", str(sample / "site-a"), str(sample / "site-b"), "--eval", str(sample / "eval"),
             *SETTINGS]
    cases = [
        ([*common, "--rounds", "3", "--lr", "0.01", "--out", str(run)],
         f"{run}: cannot resume with other settings (--lr: 0.001 in the run, 0.01 now)"),
        ([*common, "--rounds", "1", "--out", str(run)], f"--rounds: the run in {run} has already done 2 rounds"),
        ([*common, "--rounds", "3", "--overwrite", "--out", str(run)], "--resume: continues the run in --out"),
        ([*sites, "--rounds", "3", "--out", str(run)], "--sites: the run in"),
        (["simulate", "--sites", *map(str, sorted(sample.glob("site-*"))), *SETTINGS, "--rounds", "3", "--out",
          str(run)], "cannot resume with other settings (eval: "),
        ([*common, "--rounds", "3", "--out", str(tmp_path / "empty")],
         f"{tmp_path / 'empty'}: no completed round to resume from"),
    ]
    for argv, message in cases:
        assert main([*argv, "--resume"]) == 2, argv
        said = capsys.readouterr()
        assert message in said.err
        assert said.out == "", "a refused resume printed 'resuming … → OUT' first, as if it had begun"
    assert main([*common, "--rounds", "2", "--out", str(run)]) == 2  # a new run into it: refused, nothing said first
    said = capsys.readouterr()
    assert f"error: {run}: " in said.err and said.out == ""
    assert ((run / "metrics.jsonl").read_text(), (run / "final.safetensors").read_bytes()) == before


@pytest.mark.parametrize("history", [[1], ["round 1"], [{"round": 1, "loss": 0.5}]])
def test_a_snapshot_whose_history_is_damaged_is_named_and_left_as_it_was(sample: Path, tmp_path: Path, capsys,
                                                                         history: list) -> None:
    """Found by fuzzing a run's snapshot: a history of records of another shape in progress.json (a failing
    disk, a hand edit) passed the snapshot's reading and ended the resume in a TypeError traceback."""
    run = tmp_path / "run"
    argv = ["simulate", "--sample", str(sample), *SETTINGS, "--rounds", "1", "--out", str(run)]
    assert main(argv) == 0
    progress = run / "snapshot-0001" / "progress.json"
    progress.write_text(json.dumps({**json.loads(progress.read_text()), "history": history}))
    damaged = progress.read_bytes()
    capsys.readouterr()
    assert main([*argv[:-4], "--rounds", "2", "--out", str(run), "--resume"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {run / 'snapshot-0001'}: damaged snapshot, cannot resume from "
                                              "it (TypeError: ")
    assert progress.read_bytes() == damaged


def test_with_a_snapshot_every_two_rounds_a_stop_after_round_3_resumes_from_round_2(sample: Path,
                                                                                   tmp_path: Path) -> None:
    from fedmix_engine.fedmix.train_config import TrainConfig
    from fedmix_engine.model import ModelConfig
    from fedmix_engine.simulate import RoundDone, SimulationConfig, iter_simulation, run_simulation

    torch.set_num_threads(1)
    sites, eval_root = sorted(sample.glob("site-*")), sample / "eval"
    config = SimulationConfig(rounds=4, device="cpu", model=ModelConfig(base_width=4),
                              train=TrainConfig(image_size=32, crop_size=32, batch_size=4))
    run_simulation(sites, eval_root, config, tmp_path / "whole", snapshot_every=2)
    assert sorted(p.name for p in (tmp_path / "whole").glob("snapshot-*")) == ["snapshot-0004"]
    events = iter_simulation(sites, eval_root, config, tmp_path / "cut", snapshot_every=2)
    for event in events:
        if isinstance(event, RoundDone) and event.round == 3:
            break
    events.close()  # stopped after round 3 was recorded; the last snapshot is round 2's
    assert len(records(tmp_path / "cut")) == 3
    assert sorted(p.name for p in (tmp_path / "cut").glob("snapshot-*")) == ["snapshot-0002"]
    run_simulation(sites, eval_root, config, tmp_path / "cut", resume=True, snapshot_every=2)
    assert records(tmp_path / "cut") == records(tmp_path / "whole")
    assert_same_pair(tmp_path / "cut" / "final.safetensors", tmp_path / "whole" / "final.safetensors")
    assert_same_pair(tmp_path / "cut" / "best.safetensors", tmp_path / "whole" / "best.safetensors")


def test_a_moved_run_with_its_data_resumes_but_other_evaluation_images_are_refused(sample: Path, tmp_path: Path,
                                                                                  capsys) -> None:
    import shutil

    run = tmp_path / "run"
    assert main(["simulate", "--sample", str(sample), *SETTINGS, "--rounds", "1", "--out", str(run)]) == 0
    moved = tmp_path / "disk2"
    shutil.copytree(sample, moved / "sample")  # a researcher moves the workdir: data and run together
    shutil.move(run, moved / "run")
    capsys.readouterr()
    assert main(["simulate", "--sample", str(moved / "sample"), *SETTINGS, "--rounds", "2", "--out",
                 str(moved / "run"), "--resume"]) == 0, capsys.readouterr().err
    assert [r["round"] for r in records(moved / "run")] == [1, 2]

    other = tmp_path / "other"  # the same layout and names, other images
    make_sample(other, sites=3, images=8, eval_images=4, seed=0, size=32)
    assert main(["simulate", "--sample", str(other), *SETTINGS, "--rounds", "3", "--out", str(moved / "run"),
                 "--resume"]) == 2
    assert "and not the same validation and test images" in capsys.readouterr().err


def test_a_run_records_where_it_ran_and_a_resume_elsewhere_says_so(sample: Path, tmp_path: Path, caplog) -> None:
    """CPU runs repeat bit for bit only on one machine, torch build and thread count: config.json keeps
    each environment with the round it started at, and a resume on another one warns."""
    import platform

    run = tmp_path / "run"
    assert main(["simulate", "--sample", str(sample), *SETTINGS, "--rounds", "1", "--out", str(run)]) == 0
    (first,) = json.loads((run / "config.json").read_text())["environments"]
    assert first["from_round"] == 1 and first["torch"] == torch.__version__ and first["torch_threads"] == 1
    assert first["python"] == platform.python_version() and first["gpu"] == "none"

    assert main(["simulate", "--sample", str(sample), *SETTINGS, "--rounds", "2", "--out", str(run), "--resume"]) == 0
    assert json.loads((run / "config.json").read_text())["environments"] == [first], "the same environment goes on"
    assert "another environment" not in caplog.text

    other_threads = [*SETTINGS[:-1], "2"]
    assert main(["simulate", "--sample", str(sample), *other_threads, "--rounds", "3", "--out", str(run),
                 "--resume"]) == 0
    environments = json.loads((run / "config.json").read_text())["environments"]
    assert [e["from_round"] for e in environments] == [1, 3] and environments[1]["torch_threads"] == 2
    assert "resumed at round 3 on another environment (torch_threads: 1 → 2)" in caplog.text
