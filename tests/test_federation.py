"""The aggregation server and site clients as real processes on 127.0.0.1."""

from __future__ import annotations

import codecs
import contextlib
import html
import json
import math
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

from disk_helpers import fill_disk_leaving, small_disk
from federation_helpers import (
    ENV,
    TINY_SETTINGS,
    JoinThread,
    Server,
    copied_sites,
    drift_from_the_simulator,
    fake_update,
    free_port,
    global_pair,
    make_certificates,
    make_tokens,
    openssl_date,
    running_server,
    serving_in_process,
    tiny_server_app,
    tls_listener,
    upload,
    with_header,
)
from fedmix_engine.checkpoint import load_checkpoint
from fedmix_engine.data.synthetic import make_sample
from fedmix_engine.errors import InputError
from fedmix_engine.federation.wire import UpdateReport, encode_update
from fedmix_engine.fedmix.aggregation import aggregate
from fedmix_engine.fedmix.train_config import TrainConfig
from fedmix_engine.fedmix.weights import AggregationRule
from fedmix_engine.model import ModelConfig
from waiting import wait_until

SITES = ["site-a", "site-b", "site-c"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fed") / "sample"
    make_sample(out, sites=3, images=8, eval_images=3, seed=0, size=32)
    return out


def test_three_clients_complete_rounds_and_match_the_simulator(sample: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    tokens = make_tokens(state, SITES)
    args = ["--sites", "3", "--min-sites", "3", "--rounds", "2", *TINY_SETTINGS]
    with running_server(state, args) as server:
        clients = [subprocess.Popen([sys.executable, "-m", "fedmix_engine.cli", "join", "--server", server.url,
                                     "--token", tokens[name], "--site", str(sample / name), "--device", "cpu",
                                     "--poll", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
                   for name in SITES]
        outputs = [c.communicate(timeout=300)[0].decode() for c in clients]
        assert all(c.returncode == 0 for c in clients), outputs
        status = server.status()
    assert status["finished"] and status["last_round"] == 2
    assert all("federation finished after 2 rounds" in out for out in outputs), outputs
    for name in SITES:
        assert (sample / name / "models" / "global.safetensors").exists()
    worst = drift_from_the_simulator(state, sample, SITES, 2, tmp_path / "sim")
    assert worst < 1e-5, f"transport changed the algorithm: max |Δθ| = {worst}"
    weights = status["history"][-1]["sites"]
    assert abs(sum(s["weight"] for s in weights.values()) - 1) < 1e-9


def test_server_sigkilled_mid_round_keeps_acknowledged_uploads(tmp_path: Path) -> None:
    state = tmp_path / "state"
    tokens = make_tokens(state, SITES)
    args = ["--sites", "3", "--min-sites", "3", "--rounds", "1", *TINY_SETTINGS]
    bodies = {}
    with running_server(state, args) as server:
        pair, r = global_pair(server.url, tokens["site-a"])
        assert r == 0
        for k, name in enumerate(SITES):
            bodies[name] = fake_update(pair, seed=k, n=10 * (k + 1), loss=0.2 * (k + 1))
        for name in SITES[:2]:
            assert upload(server.url, tokens[name], 1, bodies[name]).status_code == 200
        server.kill()  # SIGKILL after two acknowledged uploads
    with running_server(state, []) as server:  # restart with the stored settings
        status = server.status()
        assert status["round"] == 1 and status["uploaded"] == ["site-a", "site-b"], status
        retry = upload(server.url, tokens["site-a"], 1, bodies["site-a"])
        assert retry.status_code == 200 and "already accepted" in retry.json()["message"]
        assert upload(server.url, tokens["site-c"], 1, bodies["site-c"]).status_code == 200
        status = server.status()
    assert status["finished"]
    # the committed model is exactly the engine's aggregation of the three acknowledged updates
    expected, _ = aggregate([(name, load_bytes(bodies[name]), 10 * (k + 1), 0.2 * (k + 1))
                             for k, name in enumerate(SITES)], AggregationRule(10.0, 1.5))
    served, _, _ = load_checkpoint(state / "rounds" / "000001" / "global.safetensors")
    assert max(float((served[k] - expected[k]).abs().max()) for k in expected) < 1e-6


def test_serve_warns_at_start_when_the_rounds_to_come_will_not_fit_on_its_disk(tmp_path: Path, capsys) -> None:
    """Every round keeps its global model (138 MB a pair at the reference width: the 100 rounds of the admin
    example, 14 GB): a disk too small was found when it filled mid-federation. Said at the start now, with
    the figures; nothing when the rounds fit."""
    state = tmp_path / "state"
    with small_disk(state, 8 * 2**20):
        make_tokens(state, SITES)
        args = ["--sites", "3", "--min-sites", "3", *TINY_SETTINGS]
        with running_server(state, [*args, "--rounds", "2"]) as server:
            assert "Disk space" not in httpx.get(f"{server.url}/", timeout=10).text
        log = server.log.read_text()
        assert "warning: the" not in log and "round(s) to come" not in log, log
        model = (state / "rounds" / "000000" / "global.safetensors").stat().st_size
        with running_server(state, [*args, "--rounds", "1000"]) as server:
            page = httpx.get(f"{server.url}/", timeout=10).text  # the admin's page says it while it holds
        log = server.log.read_text()
        said = (f"warning: the 1000 round(s) to come keep a global model of {model / 1e3:.1f} kB each and, with the "
                f"sites' uploads, need up to {model * (1000 + 3) / 1e6:.1f} MB; the disk of {state} has ")
        assert said in log, log
        assert "<b>Disk space</b>: " + html.escape(said.removeprefix("warning: ")) in page
        from fedmix_engine.cli import main

        assert main(["status", "--state", str(state)]) == 0  # what an admin checks now and then says it too
        assert said in capsys.readouterr().out


def test_keep_models_keeps_the_last_rounds_and_the_best_scored_models_and_every_rounds_record(tmp_path: Path,
                                                                                              capsys) -> None:
    """Every round's global model stayed on disk (138 MB a round at the reference width). --keep-models K keeps
    the last K and the one the sites' held-out scores rate best; each round's record stays, and a restart with
    a smaller K frees the space at once."""
    from fedmix_engine.cli import main

    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    args = ["--sites", "1", "--min-sites", "1", "--rounds", "5", *TINY_SETTINGS]

    def scored(url: str, r: int, dice: float) -> None:
        report = {"images": 4, "dice": dice, "classes": {"lesion": {"images": 4, "lesion_images": 2, "dice": dice,
                                                                    "iou": dice}}}
        assert httpx.post(f"{url}/v1/rounds/{r}/evaluation", json=report, timeout=30,
                          headers={"Authorization": f"Bearer {token}"}).status_code == 200

    def train_round(url: str, r: int) -> None:
        pair, at = global_pair(url, token)
        assert at == r - 1
        assert upload(url, token, r, fake_update(pair, seed=r)).status_code == 200

    def models() -> list[int]:
        return sorted(int(p.parent.name) for p in (state / "rounds").glob("*/global.safetensors"))

    with running_server(state, [*args, "--keep-models", "2"]) as server:
        scored(server.url, 0, 0.1)
        for r, dice in ((1, 0.9), (2, 0.3), (3, None), (4, None)):
            train_round(server.url, r)
            if dice is not None:
                scored(server.url, r, dice)
        assert models() == [1, 3, 4], "the last two, and round 1: the best held-out Dice"
        assert server.status()["last_round"] == 4 and len(server.status()["history"]) == 4
    assert sorted(int(p.name) for p in (state / "rounds").iterdir()) == [0, 1, 2, 3, 4], "every round's record"
    with running_server(state, [*args, "--keep-models", "1"]) as server:  # fewer: removed at the start
        assert models() == [1, 4]
        train_round(server.url, 5)
        assert server.status()["finished"] and models() == [1, 5]
    assert main(["status", "--state", str(state)]) == 0
    out = capsys.readouterr().out
    assert all(f"round {r}: site-a" in out for r in range(1, 6)), out
    # the newest round's model is never removed; lost all the same (disk damage), it is named with the remedy
    (state / "rounds" / "000005" / "global.safetensors").unlink()
    from fedmix_engine.federation.state import ServerState

    with pytest.raises(InputError, match=r"000005/global.safetensors: the newest round's global model is missing: "
                                         r"restore it from a backup, or move .*000005 \(and evaluations/000005\)"):
        ServerState(state, None)


def flip_a_weight(state: Path, r: int) -> None:
    """One bit of round ``r``'s last weight in a state directory: the header, and so safetensors, cannot tell."""
    model = state / "rounds" / f"{r:06d}" / "global.safetensors"
    data = bytearray(model.read_bytes())
    data[-3] ^= 0x40
    model.write_bytes(bytes(data))


def test_a_global_model_damaged_on_the_servers_disk_is_never_trained_on(sample: Path, tmp_path: Path) -> None:
    """safetensors checks a file's header, not its numbers: a weight changed on the server's disk (a failing
    disk, a restore gone wrong) was sent to every site, and trained on. Each round's record now holds its
    model's SHA-256 as written; the running server checks its newest model before sending it, and answers
    503 (retried by the sites) while it is damaged, telling its admin (log, page, /healthz) where only the
    sites had known; a model restored from a backup is served at once. A restart names the damage and its
    remedy, and round 0's model (made from the seed) is made again. A state directory whose rounds/ lost
    every round was an IndexError."""
    import hashlib
    import shutil

    from fedmix_engine.federation.client import FederationClient, FederationError
    from fedmix_engine.federation.state import ServerState
    from fedmix_engine.federation.status import read_status
    from fedmix_engine.file_digest import file_sha256

    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]

    def recorded(r: int) -> str:
        return json.loads((state / "rounds" / f"{r:06d}" / "meta.json").read_text())["model_sha256"]

    with running_server(state, ["--sites", "1", "--min-sites", "1", "--rounds", "3", *TINY_SETTINGS]) as server:
        client = FederationClient(server.url, token, sample / "site-a", device="cpu")
        data, r = client.download_global()
        assert r == 0 and hashlib.sha256(data).hexdigest() == recorded(0)
        assert upload(server.url, token, 1, fake_update(global_pair(server.url, token)[0], seed=1)).status_code == 200
        assert client.download_global()[1] == 1
        model = state / "rounds" / "000001" / "global.safetensors"
        written = model.read_bytes()
        flip_a_weight(state, 1)
        impatient = FederationClient(server.url, token, sample / "site-a", device="cpu", give_up_after=0)
        for _ in range(2):
            with pytest.raises(FederationError, match=r"^gave up after 0 s: server error 503 \(the server's global "
                                                      r"model of round 1 is damaged \(its bytes are not those written: "
                                                      r"a failing disk, a restore gone wrong\): its admin must restore "
                                                      r"it; this request is retried\)"):
                impatient.download_global()
        health = httpx.get(f"{server.url}/healthz", timeout=10)
        assert health.status_code == 503 and health.json()["failing"] == [
            "round 1's global model is damaged or missing: no site can download it"]
        assert "<b>No site can download the global model</b>: round 1&#x27;s global model is damaged" in \
            httpx.get(server.url + "/", timeout=10).text
        model.write_bytes(written)  # restored from a backup: served at once, no restart
        data, r = client.download_global()
        assert r == 1 and hashlib.sha256(data).hexdigest() == recorded(1)
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        flip_a_weight(state, 1)
    said = [line for line in server.log.read_text().splitlines() if "no site can download" in line.lower()
            or "the sites cannot download it" in line]
    assert len(said) == 1, said  # said once, not at every site's retry
    assert f"{model}: round 1's global model is damaged (its bytes are not those written: a failing disk, a restore " \
           "gone wrong): restore it from a backup, or move" in said[0]
    with pytest.raises(InputError, match=r"000001/global\.safetensors: the newest round's global model is damaged "
                                         r"\(its bytes are not those written.*\): restore it from a backup, or move "
                                         r".*000001 \(and evaluations/000001\) out of the state directory"):
        ServerState(state, None)
    shutil.move(state / "rounds" / "000001", tmp_path / "round-1-damaged")  # the remedy it names
    initial = recorded(0)
    flip_a_weight(state, 0)
    assert ServerState(state, None).last_round == 0  # round 0's model is made again from the seed, byte for byte
    assert file_sha256(state / "rounds" / "000000" / "global.safetensors") == initial == recorded(0)
    # a round recorded before digests: nothing to check it by, so it is served as it is, without the header
    meta = json.loads((state / "rounds" / "000000" / "meta.json").read_text())
    (state / "rounds" / "000000" / "meta.json").write_text(json.dumps({k: v for k, v in meta.items()
                                                                        if k != "model_sha256"}))
    with running_server(state, []) as server:
        response = httpx.get(f"{server.url}/v1/model", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert response.status_code == 200 and "x-fedmix-sha256" not in response.headers
        assert FederationClient(server.url, token, sample / "site-a", device="cpu").download_global()[1] == 0
    shutil.rmtree(state / "rounds" / "000000")
    said = r"rounds: holds no committed round, not even round 0 \(the initial model\): restore it from a backup"
    with pytest.raises(InputError, match=said):
        ServerState(state, None)
    with pytest.raises(InputError, match=said):
        read_status(state)


def test_a_site_refuses_a_global_model_whose_bytes_are_not_those_the_server_wrote(
        sample: Path, tmp_path: Path, monkeypatch) -> None:
    """The site's own check stays beside the server's: bytes other than those written, from a server that
    sends its model unchecked (one from before that check) or a proxy that changes them, are refused by the
    recorded SHA-256 the server sends with them, never trained on."""
    from fedmix_engine.federation.client import FederationClient, FederationError
    from fedmix_engine.federation.state import ServerState
    from fedmix_engine.federation.status import model_digest

    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    monkeypatch.setattr(ServerState, "served_model", lambda self: (self.global_path(), self.last_round,
                                                                    model_digest(self.root, self.last_round)))
    with serving_in_process(tiny_server_app(state, sites=1)) as url:
        client = FederationClient(url, token, sample / "site-a", device="cpu")
        assert client.download_global()[1] == 0
        flip_a_weight(state, 0)
        with pytest.raises(FederationError, match=r"^the global model of round 0 that the server sent is not the one "
                                                  r"it wrote \(its SHA-256 differs\): the server's copy is damaged"):
            client.download_global()


def test_status_verify_checks_every_kept_model_and_names_the_damaged_ones_with_their_remedy(
        tmp_path: Path, capsys) -> None:
    """A start checks the newest round's model only; an older one damaged (a failing disk, a backup restored
    wrong) went unnoticed until someone used it. 'status --verify' reads every kept model against the
    SHA-256 recorded as it was written, says what it found, and exits 2 for damage."""
    from fedmix_engine.cli import main
    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState

    state_dir = tmp_path / "state"
    state = ServerState(state_dir, ServerConfig(sites=1, min_sites=1, rounds=4, keep_models=3,
                                                model=ModelConfig(base_width=4)))
    for r in (1, 2, 3, 4):
        body = tmp_path / "update.part"
        body.write_bytes(fake_update(state.global_pair(r - 1), seed=r))
        assert state.accept_upload("site-a", r, body).status == 200
    rounds = state_dir / "rounds"
    assert sorted(p.parent.name for p in rounds.glob("*/global.safetensors")) == ["000002", "000003", "000004"]
    assert main(["status", "--state", str(state_dir), "--verify"]) == 0
    assert capsys.readouterr().out.endswith("\nmodels: 3 intact, 2 removed by --keep-models\n")

    flip_a_weight(state_dir, 2)
    meta = json.loads((rounds / "000003" / "meta.json").read_text())
    (rounds / "000003" / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "model_sha256"}))
    assert main(["status", "--state", str(state_dir), "--verify"]) == 2
    out, err = capsys.readouterr()
    assert out.endswith("\nmodels: 1 intact, 1 unchecked (recorded before digests), 2 removed by --keep-models, "
                        "1 DAMAGED\n"), out
    assert err == (f"error: {rounds / '000002' / 'global.safetensors'}: round 2's global model is damaged (its bytes "
                   "are not those written: a failing disk, a restore gone wrong): restore it from a backup, or delete "
                   "it: it is kept for the record, no site is sent it\n")
    assert main(["status", "--state", str(state_dir), "--json", "--verify"]) == 2
    assert json.loads(capsys.readouterr().out)["models"] == {"intact": [4], "damaged": [2], "unchecked": [3],
                                                             "removed": [0, 1], "missing": []}
    (rounds / "000004" / "global.safetensors").unlink()
    assert main(["status", "--state", str(state_dir), "--verify"]) == 2
    err = capsys.readouterr().err
    assert f"error: {rounds / '000004' / 'global.safetensors'}: round 4's global model is missing: restore it " \
           f"from a backup, or move {rounds / '000004'} (and evaluations/000004) out of the state directory and " \
           "the server runs that round again\n" in err, err
    assert main(["status", "--state", str(state_dir)]) == 0, "without --verify, status reads no model"


def test_status_verify_checks_the_open_rounds_acknowledged_updates_too(tmp_path: Path, capsys) -> None:
    """An acknowledged update damaged on disk is dropped by the server before its round closes; 'status
    --verify' says so beforehand (the disk that damaged it is in doubt), and exits 2 as for a damaged model."""
    from fedmix_engine.cli import main

    state = tmp_path / "state"
    _state_with_two_rounds(state, [1000.0])  # site-a's update to the open round 3 is acknowledged
    assert main(["status", "--state", str(state), "--verify"]) == 0
    assert capsys.readouterr().out.endswith("\nmodels: 3 intact\nupdates to round 3: 1 intact\n")
    weights = state / "current" / "site-a.safetensors"
    _damage_update_file(weights, "NaN over a weight")
    assert main(["status", "--state", str(state), "--verify"]) == 2
    out, err = capsys.readouterr()
    assert out.endswith("\nmodels: 3 intact\nupdates to round 3: 1 DAMAGED\n"), out
    assert err == (f"error: {weights}: site-a's acknowledged update to round 3 is damaged (its bytes, or its report, "
                   "are not those acknowledged: a failing disk, a restore gone wrong): the server drops it before the "
                   "round closes (or at its start), and the site sends a new one; check the disk\n")
    assert main(["status", "--state", str(state), "--json", "--verify"]) == 2
    assert json.loads(capsys.readouterr().out)["uploads"] == {"intact": [], "damaged": ["site-a"]}
    assert main(["status", "--state", str(state)]) == 0, "without --verify, status reads no update"
    assert "uploaded: site-a" in capsys.readouterr().out


def test_status_verify_beside_a_running_server_takes_files_it_removes_meanwhile_for_no_damage(
        tmp_path: Path, capsys, monkeypatch) -> None:
    """'status --verify' reads a state directory that a running server changes: a round closing removes the
    open round's updates, --keep-models an older model, between verify's listing and its reading. A model
    removed so was a FileNotFoundError (exit 1, as a failure of the machine), an update a false DAMAGED."""
    from fedmix_engine.cli import main
    from fedmix_engine.federation import status

    state = tmp_path / "state"
    _state_with_two_rounds(state, [1000.0])  # models of rounds 0-2, site-a's update to round 3
    real = status.file_sha256

    def removed_while_read(path: Path) -> str:
        if path.name == "site-a.safetensors":  # the round closes: every file of current/ goes
            for leftover in path.parent.iterdir():
                leftover.unlink()
        elif path.parent.name == "000001":  # --keep-models removes round 1's model
            path.unlink()
        return real(path)

    monkeypatch.setattr(status, "file_sha256", removed_while_read)
    assert main(["status", "--state", str(state), "--verify"]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\nmodels: 2 intact, 1 removed by --keep-models\n") and err == "", (out, err)


def test_a_server_whose_disk_fills_says_so_keeps_every_update_and_closes_the_round_once_space_is_back(
        sample: Path, tmp_path: Path) -> None:
    """The state directory on a real, small file system that the test fills. An upload that cannot be stored
    is answered 507 with the reason; the last site's upload that fits while the new global model does not
    is kept and acknowledged, and the round closes by itself once space is freed. Before, the close failed
    inside the upload (500 and a traceback), killed the deadline watcher for good, and the round, every
    site's update in, waited for an upload that would never come, until a restart."""
    from fedmix_engine.federation.client import FederationClient, FederationError

    state = tmp_path / "state"
    with small_disk(state, 16 * 2**20):
        tokens = make_tokens(state, SITES)
        with running_server(state, ["--sites", "3", "--min-sites", "3", "--rounds", "2", "--round-timeout",
                                    "600", *TINY_SETTINGS]) as server:
            pair, _ = global_pair(server.url, tokens["site-a"])
            bodies = {name: fake_update(pair, seed=k, n=10 * (k + 1), loss=0.2 * (k + 1))
                      for k, name in enumerate(SITES)}
            size = len(bodies["site-a"])
            filler = state / "filler"
            assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200

            fill_disk_leaving(filler, size // 4)
            full = upload(server.url, tokens["site-a"], 1, bodies["site-a"])
            assert full.status_code == 507 and "the server cannot store this now (No space left on device)" \
                in full.json()["detail"]
            assert not list((state / "incoming").iterdir()) and server.status()["uploaded"] == []
            client = FederationClient(server.url, tokens["site-a"], sample / "site-a", device="cpu",
                                      give_up_after=0)
            with pytest.raises(FederationError, match=r"server error 507 \(the server cannot store this now"):
                client._request("POST", "/v1/rounds/1/update", content=bodies["site-a"])

            fill_disk_leaving(filler, 3 * size + size // 2)  # the three uploads fit, the new model does not
            for name in SITES:
                answer = upload(server.url, tokens[name], 1, bodies[name])
                assert answer.status_code == 200 and answer.json()["round_closed"] is False, answer.text
            time.sleep(2)  # the deadline watcher retries the close every 0.5 s, in vain
            status = server.status()
            assert status["round"] == 1 and status["uploaded"] == SITES
            assert status["close_failure"]["round"] == 1 and "No space left" in status["close_failure"]["error"]
            page = httpx.get(server.url + "/").text
            assert "Round 1 is due to close but cannot be</b>: [Errno 28] No space left on device" in page
            health = httpx.get(server.url + "/healthz", timeout=10)  # what a monitor sees: no token, no paths
            assert health.status_code == 503 and health.json()["status"] == "failing"
            assert health.json()["failing"] == ["round 1 is due to close but cannot be (No space left on device)"]
            # each retry writes rounds/000001.tmp and removes it when the disk refuses: one may be in progress
            # now (seen under load), but none stays: a tenth of a second with none within 15 s
            deadline, quiet = time.monotonic() + 15, 0
            while quiet < 3:
                assert time.monotonic() < deadline, "a half-written model would hold the last space"
                quiet = 0 if list((state / "rounds").glob("*.tmp")) else quiet + 1
                time.sleep(0.05)
            waiting = FederationClient(server.url, tokens["site-c"], sample / "site-c", device="cpu")
            said = next(e for e in waiting.iter_join() if e.kind == "waiting").message  # site-c has uploaded
            assert said == ("round 1: this site's update was delivered by an earlier join; the server cannot "
                            "close the round (No space left on device): its admin must fix that, and it closes "
                            "by itself then"), said  # uploaded above, not by this join

            filler.unlink()
            # no further upload: the server closes it by itself
            wait_until(lambda: server.status()["last_round"] >= 1, "the round closing once space was freed", 30,
                       server.proc, every=0.2)
            assert server.status()["history"][0]["reason"] == "every expected site reported"
            assert server.status()["close_failure"] is None and "cannot be</b>" not in httpx.get(server.url).text
            health = httpx.get(server.url + "/healthz", timeout=10)
            assert health.status_code == 200 and health.json()["failing"] == [] and health.json()["round"] == 2
        served, _, _ = load_checkpoint(state / "rounds" / "000001" / "global.safetensors")
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "cannot write to" in log and "round 1 could not be closed: OSError: [Errno 28]" in log
    assert log.count("round 1 could not be closed") == 1, "said once, not every half second"
    expected, _ = aggregate([(name, load_bytes(bodies[name]), 10 * (k + 1), 0.2 * (k + 1))
                             for k, name in enumerate(SITES)], AggregationRule(10.0, 1.5))
    assert max(float((served[k] - expected[k]).abs().max()) for k in expected) < 1e-6


def test_a_server_whose_file_system_turns_read_only_says_so_in_one_line_and_takes_the_upload_once_writable(
        sample: Path, tmp_path: Path, capsys) -> None:
    """A disk with errors is remounted read-only by the kernel (ext4's errors=remount-ro). Each upload then
    logged a traceback for the admin and told the site 'server error: OSError: … <the server's path>'; it is
    now a 503 saying what is wrong, one line in the log with what to do, and the retried upload counts once
    the file system is writable again. A server (re)started on it is refused at once: it started, and then
    refused every upload."""
    from fedmix_engine.cli import main

    state = tmp_path / "state"
    with small_disk(state, 16 * 2**20):
        tokens = make_tokens(state, SITES[:2])
        with running_server(state, ["--sites", "2", "--rounds", "1", *TINY_SETTINGS]) as server:
            pair, _ = global_pair(server.url, tokens["site-a"])
            body = fake_update(pair, seed=0)
            subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
            try:
                refused = upload(server.url, tokens["site-a"], 1, body)
                assert main(["serve", "--state", str(state), "--port", str(free_port())]) == 2
                assert f"{state}: the server cannot write here (Read-only file system); it stores every upload" \
                    in capsys.readouterr().err
                # what only reads the state still works: the admin sees where the federation stands
                assert main(["token", "add", "site-c", "--state", str(state)]) == 2
                assert "the server cannot write here (Read-only file system)" in capsys.readouterr().err
                assert main(["status", "--state", str(state)]) == 0
                assert "rounds: 0 of 1 done; round 1 open" in capsys.readouterr().out
                assert main(["token", "list", "--state", str(state)]) == 0
                assert capsys.readouterr().out.startswith("site-a\tcreated ")
            finally:
                subprocess.run(["mount", "-o", "remount,rw", str(state)], check=True)
            assert refused.status_code == 503, refused.text
            assert refused.json()["detail"] == ("the server cannot store this now (Read-only file system); its "
                                                "admin must fix its storage, and this request is retried")
            taken = upload(server.url, tokens["site-a"], 1, body)
            assert taken.status_code == 200 and server.status()["uploaded"] == ["site-a"], taken.text
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "Read-only file system" in log and "check the disk, remount it (the sites retry)" in log


def test_a_round_closing_at_its_deadline_on_a_full_disk_is_shown_as_due_and_closes_once_space_is_back(
        tmp_path: Path) -> None:
    """The other way a round closes, at its deadline with a quorum, fails on a full disk the same way; the
    failure is recorded for the admin page from either way, not only when every site reported."""
    from fedmix_engine.federation.admin import render_admin_page
    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState
    from fedmix_engine.model import ModelConfig

    now = [1000.0]
    with small_disk(tmp_path / "disk", 8 * 2**20) as disk:
        state = ServerState(disk / "state", ServerConfig(sites=3, min_sites=2, round_timeout=60,
                                                          model=ModelConfig(base_width=4)), clock=lambda: now[0])
        size = (disk / "state" / "rounds" / "000000" / "global.safetensors").stat().st_size
        for k, site in enumerate(SITES[:2]):
            body = disk / f"{site}.part"  # where the server streams uploads: on the state's file system
            body.write_bytes(fake_update(state.global_pair(0), seed=k))
            assert state.accept_upload(site, 1, body).status == 200
        filler = disk / "filler"
        fill_disk_leaving(filler, size // 2)
        now[0] += 61
        with pytest.raises(OSError, match="No space left on device"):
            state.close_if_due()
        failure = state.status()["close_failure"]
        assert failure["round"] == 1 and failure["since"] == 1061.0 and "No space left" in failure["error"]
        assert "Round 1 is due to close but cannot be</b>" in render_admin_page(state.status())
        assert "Free space in the state directory; the server retries by itself." in render_admin_page(state.status())
        now[0] += 5
        with pytest.raises(OSError):
            state.close_if_due()
        assert state.status()["close_failure"]["since"] == 1061.0, "since the first failure, not the last"
        # each attempt aggregates and writes the model to the disk's last byte: after two failures the next
        # waits 2 s, and the waits double up to CLOSE_RETRY_LONGEST
        now[0] += 1.9
        assert state.close_if_due() is False and not list((disk / "state" / "rounds").glob("*.tmp"))
        waits = []
        for _ in range(5):
            before = now[0]
            while True:
                now[0] += 0.5
                try:
                    state.close_if_due()
                except OSError:
                    break
            waits.append(now[0] - before)
        assert waits == [0.5, 4.0, 8.0, 10.0, 10.0], waits  # 2 s after the second failure (1.9 s of it waited)
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)  # another storage fault, its own advice
        try:
            now[0] += 10
            with pytest.raises(OSError, match="Read-only file system"):
                state.close_if_due()
            page = render_admin_page(state.status())
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        assert "The file system is read-only (remounted so after disk errors?): check the disk, remount it; the " \
               "server retries by itself." in page and "Free space" not in page
        assert state.close_if_due() is False, "10 s after the last failure"
        now[0] += 10
        assert state.close_if_due() and state.last_round == 1 and state.status()["close_failure"] is None
        assert state.history()[0]["reason"] == "deadline passed with 2 of 3 sites"


def test_a_join_whose_site_disk_fills_names_the_file_and_run_again_ends_as_if_uninterrupted(
        sample: Path, tmp_path: Path) -> None:
    """site-a's folder on a real, small file system, full but for half a model: its join trains round 1,
    cannot save the moments it would upload with, and stops with the file and the OS's words (the line
    named no file before); nothing half-written is left. Space freed, the same command again finishes the
    federation, equal to the simulator's."""
    sites = SITES[:2]
    state = tmp_path / "state"
    tokens = make_tokens(state, sites)
    with small_disk(tmp_path / "disk", 32 * 2**20), \
            running_server(state, ["--sites", "2", "--min-sites", "2", "--rounds", "2", *TINY_SETTINGS]) as server:
        copies = {**copied_sites(sample, ["site-a"], tmp_path / "disk"), **copied_sites(sample, ["site-b"], tmp_path)}
        model_size = (state / "rounds" / "000000" / "global.safetensors").stat().st_size
        filler = tmp_path / "disk" / "filler"
        fill_disk_leaving(filler, model_size // 2)

        def join(name: str) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "fedmix_engine.cli", "join", "--server", server.url,
                                     "--token", tokens[name], "--site", str(copies[name]), "--device", "cpu",
                                     "--poll", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)

        site_b = join("site-b")
        try:
            stopped = join("site-a")
            said = stopped.communicate(timeout=120)[0].decode()
            models = copies["site-a"] / "models"
            assert stopped.returncode == 1, said
            assert re.search(rf"error: {re.escape(str(models))}/federation-[0-9a-f]+-state-pending-0001\.pt: "
                             r"No space left on device \(OSError\)", said), said
            assert [p.name for p in models.iterdir() if ".tmp" in p.name] == [], "a half-written file is left"
            assert "site-a" not in server.status()["uploaded"], "an update whose moments were not kept is not sent"

            filler.unlink()
            again = join("site-a")
            outputs = [again.communicate(timeout=300)[0].decode(), site_b.communicate(timeout=300)[0].decode()]
            assert [again.returncode, site_b.returncode] == [0, 0], "\n".join(outputs)[-4000:]
            assert server.status()["finished"]
            worst = drift_from_the_simulator(state, sample, sites, 2, tmp_path / "sim")
        finally:
            if site_b.poll() is None:
                site_b.kill()
    assert worst < 1e-5, f"the full disk changed what was trained: max |Δθ| = {worst}"


def test_a_join_through_a_proxy_that_cannot_reach_the_server_names_the_proxy_and_no_proxy(
        sample: Path, tmp_path: Path, monkeypatch) -> None:
    """A hospital's HTTP_PROXY also carries the requests to an intranet server unless NO_PROXY names it; a
    proxy that cannot reach the server made the join say 'the server does not answer (Connection refused)'
    for an hour while the server was up. The message now names the proxy (not its password) and NO_PROXY;
    with the server in NO_PROXY the join connects directly."""
    from fedmix_engine.federation.client import FederationClient, FederationError

    state = tmp_path / "state"
    tokens = make_tokens(state, ["site-a"])
    site = copied_sites(sample, ["site-a"], tmp_path)["site-a"]
    with running_server(state, ["--sites", "1", "--min-sites", "1", "--rounds", "1", *TINY_SETTINGS]) as server, \
            socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))  # bound, not listening: a proxy that refuses the connection
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
            monkeypatch.delenv(name.lower(), raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://clinic:s3cret@127.0.0.1:{proxy.getsockname()[1]}")
        client = FederationClient(server.url, tokens["site-a"], site, device="cpu", give_up_after=0)
        with pytest.raises(FederationError) as failed:
            next(client.iter_join())
        message = str(failed.value)
        assert f"; the requests go through the proxy http://127.0.0.1:{proxy.getsockname()[1]} (this machine's " \
               "HTTP_PROXY/HTTPS_PROXY settings): if the server is reached directly, add 127.0.0.1 to NO_PROXY" \
               in message, message
        assert "s3cret" not in message
        monkeypatch.setenv("NO_PROXY", "localhost, 127.0.0.1")
        events = FederationClient(server.url, tokens["site-a"], site, device="cpu", give_up_after=0).iter_join()
        connected = next(events)
        events.close()
        assert connected.kind == "connected" and "proxy" not in connected.message, connected
    import httpx

    from fedmix_engine.federation.client import environment_proxy

    monkeypatch.setenv("HTTPS_PROXY", "proxy.example.org:3128")
    monkeypatch.setenv("NO_PROXY", "hospital.org,[::1]")
    assert environment_proxy(httpx.URL("https://fedmix.hospital.org:8765")) is None, "a name is a suffix"
    assert environment_proxy(httpx.URL("https://[::1]:8765")) is None
    assert environment_proxy(httpx.URL("https://fedmix.other.org")) == "http://proxy.example.org:3128"
    monkeypatch.setenv("NO_PROXY", "*")
    assert environment_proxy(httpx.URL("https://fedmix.other.org")) is None


def test_a_join_of_a_read_only_site_folder_says_so_before_it_asks_the_server_anything(
        sample: Path, tmp_path: Path) -> None:
    """A site folder on a file system turned read-only (or another user's) ended the join with
    'join.lock: Read-only file system (OSError)', exit 1, as if a bug; it is bad input of the site's, said
    with the folder and what to do, before any request."""
    from fedmix_engine.federation.client import FederationClient

    with small_disk(tmp_path / "disk", 16 * 2**20) as disk:
        site = copied_sites(sample, ["site-a"], disk)["site-a"]
        (site / "models").mkdir(exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        client = FederationClient("http://127.0.0.1:9", "fmx_token", site, device="cpu", give_up_after=0)
        with pytest.raises(InputError, match=re.escape(f"{site / 'models'}: cannot be written (Read-only file "
                                                       "system); a join keeps its lock")):
            next(client.iter_join())


def test_a_join_whose_optimiser_state_is_damaged_names_the_file_and_runs_once_it_is_deleted(
        sample: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """The site's Adam moments (torch's zip format) torn by a failing disk ended the join in torch's
    'PytorchStreamReader failed reading zip archive' traceback, naming no file; now the file and the remedy."""
    from fedmix_engine.cli import main

    site = copied_sites(sample, ["site-a"], tmp_path)["site-a"]
    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    with running_server(state, ["--sites", "1", "--rounds", "1", *TINY_SETTINGS]) as server:
        moments = site / "models" / f"federation-{(state / 'federation-id').read_text().strip()}-state.pt"
        moments.parent.mkdir(exist_ok=True)  # a copy of the shared sample may hold one already
        torch.save({"optimizers": [], "rounds_done": 3}, moments)
        moments.write_bytes(moments.read_bytes()[:200])  # torn
        monkeypatch.setenv("FEDMIX_TOKEN", token)
        join = ["join", "--server", server.url, "--site", str(site), "--device", "cpu"]
        assert main(join) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {moments}: damaged optimiser state, cannot be read (ValueError: not a "
                              "whole zip archive (File is not a zip file))"), err
        assert err.rstrip().endswith("delete it, and this site's optimiser starts afresh at its next round (only "
                                     "Adam's moments are lost, not the model)"), err
        assert server.status()["uploaded"] == [], "stopped before it trained"
        moments.unlink()
        assert main(join) == 0 and server.status()["finished"]


def test_join_check_finds_what_a_join_would_meet_without_taking_part(sample: Path, tmp_path: Path, capsys,
                                                                      monkeypatch) -> None:
    """A site's IT could learn that the server, its certificate, the token or the site's classes were wrong
    only by joining, on the federation's day. 'join --check' asks the server and checks the site, and stops
    before training; a server that does not answer fails it in seconds, not after an hour of retries."""
    from fedmix_engine.cli import main
    from fedmix_engine.data.site_store import SiteStore
    from fedmix_engine.federation import client

    site = copied_sites(sample, ["site-a"], tmp_path)["site-a"]
    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    (tmp_path / "site-a.token").write_text(token)
    check = ["join", "--site", str(site), "--device", "cpu", "--token-file", str(tmp_path / "site-a.token"),
             "--check"]
    with running_server(state, ["--sites", "1", "--rounds", "1", *TINY_SETTINGS]) as server:
        assert main([*check, "--server", server.url]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"server: {server.url} answers (plain HTTP), API v1, version ")
        assert out[1:3] == ["token: accepted, as site 'site-a'", "federation: fedmix, 1 round; round 1 open"]
        with SiteStore.open(site, readonly=True) as store:
            counts = store.summary()
        assert out[3] == (f"site: {site} fits the model ({counts['images']} images: {counts['mask']} with a mask, "
                          f"{counts['box']} with boxes, {counts['tag']} with tags)")
        assert out[4:] == [f"writable: {site / 'models'}", "device: cpu (CPU requested)",
                           "check passed: the same command without --check takes part in the federation"], out
        assert server.status()["uploaded"] == [] and server.status()["last_round"] == 0, "it did not train"
        # with --eval: how many held-out images each global model is scored on, and how many are left out
        import shutil

        held_out = shutil.copytree(sample / "eval" / "site-a" / "test", tmp_path / "held-out")
        with SiteStore.open(held_out) as store:
            labelled = len(store)
            store.add_image(np.zeros((40, 48), np.uint8), "boxed")
            store.add_box("boxed", "lesion", 5, 5, 20, 20)
        assert main([*check, "--server", server.url, "--eval", str(held_out)]) == 0
        assert capsys.readouterr().out.splitlines()[4] == (
            f"held-out: {held_out} fits the model; each global model is scored there on its {labelled} fully labelled "
            f"image(s) (1 of its {labelled + 1} images left out: a box, a tag of a present class or no label gives no "
            "mask to score against)")

        (tmp_path / "site-a.token").write_text("fmx_" + "x" * 43)
        assert main([*check, "--server", server.url]) == 3
        assert "error: the server refused this site's token (unknown or revoked token" in capsys.readouterr().out
        (tmp_path / "site-a.token").write_text(token)
        two = tmp_path / "two-classes"
        SiteStore.create(two, ["lesion", "cyst"]).close()
        assert main([*check, "--server", server.url, "--site", str(two)]) == 3
        said = capsys.readouterr().out.splitlines()  # what passed comes first, then what failed
        assert said[0].startswith(f"server: {server.url} answers") and said[1:3] == out[1:3]
        assert said[3:] == [f"error: {two}: site has 2 class(es) (lesion, cyst) and 1 channel(s); the federation's "
                            "model expects 1 and 1"], said
    monkeypatch.setattr(client, "CHECK_PATIENCE", 1.0)
    started = time.monotonic()
    assert main([*check, "--server", f"http://127.0.0.1:{free_port()}"]) == 4, "gave up: not a refusal"
    assert "error: gave up after 1 s: the server does not answer (ConnectError" in capsys.readouterr().out
    assert time.monotonic() - started < 15


def test_a_second_join_of_one_site_is_refused_until_the_first_is_gone_even_by_sigkill(
        sample: Path, tmp_path: Path) -> None:
    """Two joins of one site (a terminal and napari) both trained every round, lost one upload of the two
    with a 409, and could keep the loser's optimiser moments on disk. The second is refused now; the lock
    is the OS's, so a join SIGKILLed while holding it leaves nothing that blocks the next."""
    sites = SITES[:2]
    copies = copied_sites(sample, sites, tmp_path)
    state = tmp_path / "state"
    tokens = make_tokens(state, sites)
    with running_server(state, ["--sites", "2", "--min-sites", "2", "--rounds", "1", *TINY_SETTINGS]) as server:
        def join(name: str) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "fedmix_engine.cli", "join", "--server", server.url,
                                     "--token", tokens[name], "--site", str(copies[name]), "--device", "cpu",
                                     "--poll", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)

        first = join("site-a")
        later: list[subprocess.Popen] = []
        try:
            # it holds the site, waiting for site-b
            wait_until(lambda: server.status()["uploaded"] == ["site-a"], "site-a's first join uploading", 120,
                       first)
            second = join("site-a")
            said = second.communicate(timeout=60)[0].decode()
            assert second.returncode == 3, said
            assert f"error: {copies['site-a']}: another join of this site is running" in said
            assert "round 1" not in said, "refused before it trained or asked for a round"

            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)
            assert (copies["site-a"] / "models" / "join.lock").exists(), "the file stays; the OS lock went"
            later = [join("site-a"), join("site-b")]
            outputs = [c.communicate(timeout=300)[0].decode() for c in later]
            assert [c.returncode for c in later] == [0, 0], "\n".join(outputs)[-4000:]
            assert server.status()["finished"]
        finally:
            for process in [first, *later]:
                if process.poll() is None:
                    process.kill()


def test_join_processes_ride_out_a_server_sigkill_and_the_federation_ends_as_if_uninterrupted(sample: Path,
                                                                                             tmp_path: Path) -> None:
    """NVFlare's high-availability test, on the built-in server with real `join` processes: the server is
    SIGKILLed while round 2 is open and restarted seconds later; the clients retry with backoff, the round
    resumes, and the final model equals the simulator's, which no server crash interrupted."""
    sites = SITES[:2]
    copies = copied_sites(sample, sites, tmp_path)
    state = tmp_path / "state"
    tokens = make_tokens(state, sites)
    server = Server(state, ["--sites", "2", "--min-sites", "2", "--rounds", "3", *TINY_SETTINGS]).start()
    clients = [subprocess.Popen([sys.executable, "-m", "fedmix_engine.cli", "join", "--server", server.url,
                                 "--token", tokens[name], "--site", str(copies[name]), "--device", "cpu",
                                 "--poll", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
               for name in sites]
    try:
        def round_two_open() -> dict | None:  # round 1 closed, round 2 open (with an upload, when it is caught)
            status = server.status()
            return status if status["last_round"] >= 2 or (status["last_round"] == 1 and status["uploaded"]) else None

        status = wait_until(round_two_open, "round 1 closing", 120, *clients, every=0.02, detail=server.status)
        assert not status["finished"], "killed mid-federation"
        server.kill()
        time.sleep(3)  # the clients meet refused connections and back off
        server.start()
        outputs = [c.communicate(timeout=300)[0].decode() for c in clients]
        assert [c.returncode for c in clients] == [0, 0], "\n".join(outputs)[-4000:]
        status = server.status()
    finally:
        server.kill()
        for client in clients:
            if client.poll() is None:
                client.kill()
    assert status["finished"] and status["last_round"] == 3
    assert all("retrying" in output for output in outputs), "each client met the dead server and retried"
    worst = drift_from_the_simulator(state, sample, sites, 3, tmp_path / "sim")
    assert worst < 1e-5, f"the crash changed what was trained: max |Δθ| = {worst}"


def test_a_joined_site_says_it_retries_a_dead_server_and_says_its_wait_again_once_the_server_is_back(
        sample: Path, tmp_path: Path) -> None:
    """Retries of a server that does not answer happen inside one step of the join's generator, for up to an
    hour, and yielded nothing: napari's Train kept saying "waiting for the other sites" (or "starting…")
    while its server was down. The client now calls ``on_retry`` with each retry and with the server's
    return, and says its wait again afterwards, so a GUI can replace the retry message."""
    from fedmix_engine.federation.client import FederationClient

    copies = copied_sites(sample, ["site-a"], tmp_path)
    state = tmp_path / "state"
    token = make_tokens(state, ["site-a", "site-b"])["site-a"]
    server = Server(state, ["--sites", "2", "--min-sites", "2", "--rounds", "2", *TINY_SETTINGS]).start()
    join = JoinThread(FederationClient(server.url, token, copies["site-a"], device="cpu", poll_seconds=0.2))
    told = join.told
    try:
        join.wait_for(lambda: join.waiting(), "site-a's update sent")
        assert told == []
        waits = join.waiting()
        server.kill()
        join.wait_for(lambda: len(told) >= 3, "three retries of the dead server")
        assert {e.kind for e in told} == {"retrying"}
        assert re.fullmatch(r"the server does not answer \(ConnectError: .*\); trying again in 0.5 s", told[0].message)
        assert re.search(r"; trying again in 2 s \(for \d s; gives up after 60 min\)$", told[2].message), told[2]
        server.start()
        join.wait_for(lambda: told[-1].kind == "reconnected", "the server back")
        join.wait_for(lambda: len(join.waiting()) == 2, "the wait said again")
    finally:
        join.end()
        server.kill()
    assert re.fullmatch(r"the server answers again \(after \d+ s\)", told[-1].message), told[-1]
    assert join.waiting() == waits * 2 and waits[0].startswith("round 1: update delivered, waiting for the other sites")


def test_a_second_join_with_a_sites_token_is_stopped_and_told_why_and_its_step_does_not_count(
        sample: Path, tmp_path: Path) -> None:
    """One site's token on two machines (a token file copied, a site folder copied to a second workstation):
    both trained every round, the slower one's upload was refused with a 409 and it went on saying "update
    delivered, waiting for the other sites", round after round, its clinic believing it took part, and it
    kept the refused update's optimiser step as if it had counted. The second join now stops at once and
    says why; its step is dropped."""
    from fedmix_engine.federation import pending_state
    from fedmix_engine.federation.client import FederationClient, FederationError

    copies = copied_sites(sample, ["site-a", "site-b"], tmp_path)
    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    with running_server(state, ["--sites", "2", "--min-sites", "1", "--round-timeout", "600", "--rounds", "2",
                                *TINY_SETTINGS]) as server:
        second = FederationClient(server.url, token, copies["site-b"], device="cpu", poll_seconds=0.2)
        events = second.iter_join()
        while next(events).kind != "training":  # it trains round 1: the round is open, nothing uploaded yet
            pass
        first = JoinThread(FederationClient(server.url, token, copies["site-a"], device="cpu", poll_seconds=0.2))
        try:
            first.wait_for(lambda: any(e.kind == "uploaded" for e in first.events), "the first join's upload")
            with pytest.raises(FederationError) as stopped:
                for event in events:
                    assert "update delivered" not in event.message
        finally:
            first.end()
        assert str(stopped.value).startswith(
            "round 1: the server already holds another update of site 'site-a' for this round, sent by another "
            "join with this site's token (on another machine, or with a copy of this site's folder)")
        assert "this join stops; its update did not count" in str(stopped.value)
        assert server.status()["uploaded"] == ["site-a"]  # the first join's update, still the one that counts
    models = copies["site-b"] / "models"
    assert not list(models.glob("*-state-pending-*.pt")), "the refused update's step is not kept"
    assert not (models / pending_state.committed_name(second.prefix)).exists(), "nor counted as the site's state"
    log = server.log.read_text()
    assert "two joins are using this site's token" in log


def test_a_join_whose_delivered_update_the_server_drops_as_damaged_says_so_and_sends_a_new_one(
        sample: Path, tmp_path: Path) -> None:
    """The whole loop on a real server: site-a's update is acknowledged, then damaged on the server's disk;
    site-b's upload makes the round due, the server drops site-a's update instead of aggregating it, and
    site-a's join, polling, is told it has not uploaded: it says why, trains the round again and sends a new
    update, which closes the round with both sites."""
    from fedmix_engine.federation.client import FederationClient

    copies = copied_sites(sample, ["site-a"], tmp_path)
    state = tmp_path / "state"
    tokens = make_tokens(state, ["site-a", "site-b"])
    with running_server(state, ["--sites", "2", "--min-sites", "2", "--rounds", "1", *TINY_SETTINGS]) as server:
        join = JoinThread(FederationClient(server.url, tokens["site-a"], copies["site-a"], device="cpu",
                                           poll_seconds=0.2))
        try:
            join.wait_for(lambda: join.waiting(), "site-a's update delivered")
            weights = state / "current" / "site-a.safetensors"
            weights.write_bytes(weights.read_bytes()[:-4] + np.float32("nan").tobytes())
            initial, _ = global_pair(server.url, tokens["site-b"])
            assert upload(server.url, tokens["site-b"], 1, fake_update(initial, seed=1)).status_code == 200
            join.wait_for(lambda: any(e.kind == "finished" for e in join.events), "the federation finished")
        finally:
            join.end()
        status = server.status()
    assert sum(e.kind == "uploaded" for e in join.events) == 2, "site-a sent round 1 twice"
    assert "round 1: the server no longer holds this site's update (damaged on its disk, its log says); this " \
           "site trains the round again" in join.waiting()
    assert status["finished"] and sorted(status["history"][-1]["sites"]) == ["site-a", "site-b"]
    load_checkpoint(state / "rounds" / "000001" / "global.safetensors")  # finite: loading refuses NaN
    assert "round 1: site-a's acknowledged update is damaged on disk" in server.log.read_text()


def test_a_join_process_sigkilled_after_training_a_round_restarts_and_the_federation_ends_as_if_uninterrupted(
        sample: Path, tmp_path: Path) -> None:
    """A site's workstation loses power after training round 2, before its upload: the restarted `join`
    trains round 2 again from the Adam moments of its last accepted update, to the same update, and the
    final model equals the simulator's."""
    sites = SITES[:2]
    copies = copied_sites(sample, sites, tmp_path)
    state = tmp_path / "state"
    tokens = make_tokens(state, sites)
    logs = {name: tmp_path / f"{name}.log" for name in sites}

    def join(name: str) -> subprocess.Popen:
        with open(logs[name], "ab") as log:
            return subprocess.Popen([sys.executable, "-m", "fedmix_engine.cli", "join", "--server", server.url,
                                     "--token", tokens[name], "--site", str(copies[name]), "--device", "cpu",
                                     "--poll", "0.2"], stdout=log, stderr=subprocess.STDOUT, env=ENV)

    with running_server(state, ["--sites", "2", "--min-sites", "2", "--rounds", "3", *TINY_SETTINGS]) as server:
        clients = {name: join(name) for name in sites}
        try:
            wait_until(lambda: re.search(r"^round 2: train (\d+)/\1$", logs["site-a"].read_text(), re.M),
                       "site-a training round 2's last batch", 120, clients["site-a"], every=0.01,
                       detail=logs["site-a"].read_text)
            os.kill(clients["site-a"].pid, signal.SIGKILL)
            assert clients["site-a"].wait(timeout=10) == -signal.SIGKILL
            assert "round 2: sent" not in logs["site-a"].read_text(), "killed before its round-2 upload"
            clients["site-a"] = join("site-a")
            for name, client in clients.items():
                assert client.wait(timeout=300) == 0, logs[name].read_text()[-3000:]
            status = server.status()
        finally:
            for client in clients.values():
                if client.poll() is None:
                    client.kill()
    assert status["finished"] and [sorted(meta["sites"]) for meta in status["history"]] == [sites] * 3
    worst = drift_from_the_simulator(state, sample, sites, 3, tmp_path / "sim")
    assert worst < 1e-5, f"the killed round trained from other moments: max |Δθ| = {worst}"


def load_bytes(body: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(body)


PARTIAL_UPLOAD = """
import socket, sys, time
port, token, total = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
s.sendall((f"POST /v1/rounds/1/update HTTP/1.1\\r\\nHost: x\\r\\nAuthorization: Bearer {token}\\r\\n"
           f"Content-Length: {total}\\r\\nContent-Type: application/octet-stream\\r\\n\\r\\n").encode())
s.sendall(b"\\0" * (total // 2))
print("half sent", flush=True)
time.sleep(60)
"""


def test_client_killed_mid_upload_round_closes_on_quorum_and_client_rejoins(tmp_path: Path) -> None:
    state = tmp_path / "state"
    tokens = make_tokens(state, SITES)
    args = ["--sites", "3", "--min-sites", "2", "--rounds", "2", "--round-timeout", "3", *TINY_SETTINGS]
    with running_server(state, args) as server:
        pair, _ = global_pair(server.url, tokens["site-a"])
        body_c = fake_update(pair, seed=9)
        uploader = subprocess.Popen([sys.executable, "-c", PARTIAL_UPLOAD, str(server.port), tokens["site-c"],
                                     str(len(body_c))], stdout=subprocess.PIPE, text=True)
        assert uploader.stdout.readline().strip() == "half sent"
        os.kill(uploader.pid, signal.SIGKILL)
        uploader.wait(10)
        for k, name in enumerate(SITES[:2]):
            assert upload(server.url, tokens[name], 1, fake_update(pair, seed=k)).status_code == 200
        wait_until(lambda: server.status()["last_round"] >= 1, "round 1 closing at its deadline", 30, server.proc,
                   every=0.3)
        status = server.status()
        assert status["last_round"] == 1, status
        closed = status["history"][0]
        assert set(closed["sites"]) == {"site-a", "site-b"} and "deadline passed with 2 of 3" in closed["reason"]
        assert not list((state / "incoming").iterdir()), "the cut body must not be kept"
        late = upload(server.url, tokens["site-c"], 1, body_c)
        assert late.status_code == 409 and "round 1 is closed" in late.json()["detail"]
        pair2, r = global_pair(server.url, tokens["site-c"])  # the client rejoins for round 2
        assert r == 1
        assert upload(server.url, tokens["site-c"], 2, fake_update(pair2, seed=3)).status_code == 200
        assert server.status()["uploaded"] == ["site-c"]


def raw_post(port: int, token: str, path: str, declared: int) -> socket.socket:
    """A POST's head on a socket of its own, its body left to the caller (Connection: close: the answer ends
    where the server closes)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n"
               f"Content-Length: {declared}\r\n\r\n").encode())
    return s


def answer_until_closed(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
    return answer


def test_a_request_whose_connection_goes_silent_is_dropped_with_its_part_file_and_a_slow_one_is_not(
        tmp_path: Path, caplog) -> None:
    """A site whose link dies without a FIN or RST (a VPN dropped, a laptop asleep) is never heard from again:
    its upload's connection and half-written part file were kept until the server stopped, one more at every
    retry. A body that sends nothing for the idle limit is now dropped (408, in the admin's log) with its part
    file; one that is slow but alive is not."""
    state = tmp_path / "state"
    tokens = make_tokens(state, SITES[:2])
    caplog.set_level("WARNING", logger="fedmix_engine.federation")
    with serving_in_process(tiny_server_app(state, 2, body_idle_seconds=1.0)) as url:
        port = int(url.rsplit(":", 1)[1])
        pair, _ = global_pair(url, tokens["site-a"])
        body = fake_update(pair, seed=0)
        for path, declared, sent in (("/v1/rounds/1/update", len(body), len(body) // 2),
                                     ("/v1/rounds/1/evaluation", 500, 10)):
            with raw_post(port, tokens["site-a"], path, declared) as s:
                s.sendall(b"\0" * sent)
                if path.endswith("update"):  # an evaluation report is read into memory, an update to a file
                    wait_until(lambda: list((state / "incoming").iterdir()), "the upload's part file", 10)
                started = time.monotonic()
                answer = answer_until_closed(s, 20).decode()
            assert time.monotonic() - started < 5, "dropped after the idle limit, and its connection closed"
            assert answer.startswith("HTTP/1.1 408 "), answer
            assert f"nothing arrived for 1 s after {sent} bytes of the body: the request was dropped" in answer
            assert not list((state / "incoming").iterdir()), "the part file is removed"
        logged = [r.getMessage() for r in caplog.records]
        assert any(m.startswith("round 1, site-a: refused (408): nothing arrived") for m in logged), logged
        assert any(m.startswith("round 1, site-a: evaluation refused (408)") for m in logged), logged
        with raw_post(port, tokens["site-a"], "/v1/rounds/1/update", len(body)) as s:  # 2.4 s, never 1 s idle
            for piece in range(6):
                time.sleep(0.4)
                s.sendall(body[piece * len(body) // 6:(piece + 1) * len(body) // 6])
            answer = answer_until_closed(s, 20).decode()
        assert answer.startswith("HTTP/1.1 200 ") and '"accepted":true' in answer, answer
        assert httpx.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {tokens['site-b']}"}
                         ).json()["uploaded"] == ["site-a"]


def test_more_or_fewer_sites_than_a_round_waits_for_is_said_to_the_admin(tmp_path: Path, capsys) -> None:
    """Three sites held tokens and the server expected two (--sites 2: set too low, or a site added later): a
    round closed as soon as two had uploaded, and the slowest site (in a demo, the one with masks) was left
    out of every round, told only 'round 1 is closed'. serve, token add and status now say it, and so does
    the late site's refusal."""
    from fedmix_engine.cli import main

    state = tmp_path / "state"
    tokens = make_tokens(state, ["site-a", "site-b"])
    with running_server(state, ["--sites", "2", "--min-sites", "2", "--rounds", "2", *TINY_SETTINGS]) as server:
        assert main(["token", "add", "site-c", "--state", str(state)]) == 0
        added = capsys.readouterr()
        tokens["site-c"] = added.out.strip()
        warning = ("3 sites hold tokens (site-a, site-b, site-c), but a round closes as soon as 2 have uploaded "
                   "(--sites 2): the slowest is left out of every round; restart serve with --sites 3")
        assert f"warning: {warning}" in added.err
        pair, _ = global_pair(server.url, tokens["site-a"])
        for k, name in enumerate(["site-b", "site-c"]):
            assert upload(server.url, tokens[name], 1, fake_update(pair, seed=k)).status_code == 200
        late = upload(server.url, tokens["site-a"], 1, fake_update(pair, seed=5))
        assert late.status_code == 409
        assert late.json()["detail"] == (
            "round 1 is closed (the server is at round 2): it closed when the 2 expected sites had uploaded "
            "(site-b, site-c), before site-a; if every site should count, the server's admin raises --sites; "
            "download the new global model and train again")
        assert main(["status", "--state", str(state)]) == 0
        assert f"warning: {warning}" in capsys.readouterr().out
        assert f"<b>Sites</b>: {html.escape(warning)}" in httpx.get(server.url + "/", timeout=10).text
    with running_server(state, []) as server:  # restarted as it was: said at the start
        pass
    assert f"warning: {warning}" in server.log.read_text()
    # too few: below the quorum no round can close; below --sites every round waits for its deadline
    for site in ("site-b", "site-c"):
        assert main(["token", "revoke", site, "--state", str(state)]) == 0
    capsys.readouterr()
    assert main(["status", "--state", str(state)]) == 0
    assert ("warning: only 1 site(s) hold tokens (site-a) and a round needs at least 2 (--min-sites 2): no round "
            "can close until more sites have tokens") in capsys.readouterr().out
    assert main(["token", "add", "site-d", "--state", str(state)]) == 0
    assert "warning" not in capsys.readouterr().err, "as many sites as a round waits for"
    with running_server(state, ["--sites", "3"]) as server:
        pass
    assert ("warning: 2 sites hold tokens (site-a, site-d) and a round waits for 3 (--sites 3): every round waits "
            "for its deadline (") in server.log.read_text()


def test_bad_uploads_are_refused_with_reasons_and_leave_the_round_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    tokens = make_tokens(state, [*SITES, "site-x"])
    args = ["--sites", "3", "--min-sites", "3", "--rounds", "2", "--max-upload-mb", "2", *TINY_SETTINGS]
    with running_server(state, args) as server:
        url = server.url
        pair, _ = global_pair(url, tokens["site-a"])
        good = fake_update(pair, seed=1)
        from fedmix_engine.federation.tokens import TokenStore

        TokenStore(state).revoke("site-x")
        renamed = {("net1.bogus" if k == "net1.outc.conv.bias" else k): v for k, v in pair.items()}
        reshaped = {**pair, "net1.outc.conv.bias": torch.zeros(2)}
        poisoned = {**pair, "net2.outc.conv.weight": pair["net2.outc.conv.weight"] * float("nan")}
        infinite = {**pair, "net1.inc.block.0.weight": pair["net1.inc.block.0.weight"] + float("inf")}
        overflowed = {k: v.clamp(-1, 1) * 65504 for k, v in pair.items()}  # finite: fp16's largest value
        malformed_header = with_header(good, lambda header: header["net1.outc.conv.bias"].update(shape=2))
        cases = [
            ("wrong token", "fmx_not-a-token", good, 1, 401, "unknown or revoked token"),
            ("revoked token", tokens["site-x"], good, 1, 401, "unknown or revoked token"),
            ("wrong key", tokens["site-a"], encode_update(renamed, UpdateReport(5, 0.3)), 1, 422, "keys differ"),
            ("wrong shape", tokens["site-a"], encode_update(reshaped, UpdateReport(5, 0.3)), 1, 422,
             "tensor 'net1.outc.conv.bias': shape (2,)"),
            ("NaN", tokens["site-a"], encode_update(poisoned, UpdateReport(5, 0.3)), 1, 422, "NaN or infinite"),
            ("Inf", tokens["site-a"], encode_update(infinite, UpdateReport(5, 0.3)), 1, 422, "NaN or infinite"),
            ("huge", tokens["site-a"], encode_update(overflowed, UpdateReport(5, 0.3)), 1, 422,
             "update: moves the model by "),
            ("oversized", tokens["site-a"], b"\0" * (3 * 2**20), 1, 413, "exceeds the server's limit"),
            ("truncated", tokens["site-a"], good[: len(good) // 2], 1, 422, "truncated"),
            ("malformed header", tokens["site-a"], malformed_header, 1, 422,  # was a TypeError: HTTP 500
             "tensor 'net1.outc.conv.bias': shape 2 is not a list of sizes"),
            ("closed round", tokens["site-a"], good, 0, 409, "round 0 is closed"),
            ("future round", tokens["site-a"], good, 2, 409, "round 2 is not open"),
            ("negative n", tokens["site-a"], encode_update(pair, UpdateReport(-3, 0.3)), 1, 422,
             "sample count must be an integer ≥ 0"),
            ("NaN loss", tokens["site-a"], save(pair, metadata={"fedmix-report": '{"n": 5, "loss": NaN}'}), 1, 422,
             "loss: must be a finite number"),
            ("no report", tokens["site-a"], save(pair), 1, 422, "carries no report"),
            ("loss above the soft Dice's 1", tokens["site-a"], encode_update(pair, UpdateReport(5, 3.0)), 1, 422,
             "fedmix-report.loss: 3 is above 1, the most the federation's 'dice' training loss can be"),
        ]
        for name, token, body, r, code, reason in cases:
            response = upload(url, token, r, body)
            assert response.status_code == code, (name, response.status_code, response.text)
            assert reason in response.json()["detail"], (name, response.json())
        status = server.status()
        assert status["uploaded"] == [] and status["round"] == 1, "no bad update may count"
        assert upload(url, tokens["site-a"], 1, good).status_code == 200
        assert upload(url, tokens["site-a"], 1, good).status_code == 200, "a resend (a lost response) is harmless"
        duplicate = upload(url, tokens["site-a"], 1, fake_update(pair, seed=5))
        assert duplicate.status_code == 409 and "already uploaded a different update" in duplicate.json()["detail"]
        assert server.status()["uploaded"] == ["site-a"]
        page = httpx.get(url + "/").text
        assert "FedMix aggregation server" in page and "site-a" in page and "<svg" in page
        for name in ("site-b", "site-c"):
            assert upload(url, tokens[name], 1, fake_update(pair, seed=2)).status_code == 200
        assert server.status()["last_round"] == 1
    # the admin's journal (serve's stdout): every refusal with its site and reason, every round's weights
    log = server.log.read_text()
    assert "warning: no --class-names: a joining site is checked for its number of classes only" in log
    assert "plain HTTP" not in log, "on 127.0.0.1 nothing crosses the network"
    assert "WARNING refused POST /v1/rounds/1/update from 127.0.0.1: unknown or revoked token" in log
    assert "WARNING round 1, site-a: refused (422): update refused: " in log
    assert "WARNING round 1, site-a: refused (413): update of 3.0 MB exceeds the server's limit of 2 MB" in log
    assert "WARNING round 0, site-a: refused (409): round 0 is closed" in log
    assert re.search(r"INFO round 1, site-a: accepted for round 1 \(n=\d+, loss \d\.\d{3}\)", log), log
    assert "INFO round 1, site-a: a resend of its accepted update (harmless)" in log
    assert "WARNING round 1, site-a: refused (409): site 'site-a' already uploaded a different update" in log
    assert re.search(r"INFO round 1 closed \(every expected site reported\): weights site-a 0\.\d\d, "
                     r"site-b 0\.\d\d, site-c 0\.\d\d", log), log
    # in the order it happened: the last site's update, then the close it triggered
    assert log.index("round 1, site-c: accepted for round 1") < log.index("round 1 closed"), log


def test_plot_legend_names_fit_beside_their_lines() -> None:
    """The legend sat in a fixed 28-px margin: "samples used (hundreds)" in the napari widget and any site
    name longer than four letters on the admin page ran off the chart; a series without points (no
    validation site) was named all the same."""
    import xml.etree.ElementTree as ET

    from fedmix_engine.federation.admin import COLOURS, LEGEND_CHAR_PX, svg_lines

    def drawn(series: dict) -> tuple[list[str], float, float]:
        root = ET.fromstring(svg_lines(series, "this site per round"))
        ns = "{http://www.w3.org/2000/svg}"
        legend = [t for t in root.iter(f"{ns}text") if t.get("fill") in COLOURS]
        lines_end = max(float(xy.split(",")[0]) for line in root.iter(f"{ns}polyline")
                        for xy in line.get("points").split())
        legend_start = min(float(t.get("x")) for t in legend)
        assert lines_end < legend_start, "lines stop before the legend"
        assert len({t.get("fill") for t in legend}) == len(legend), "each name in its line's colour"
        assert all(float(t.get("x")) + LEGEND_CHAR_PX * len(t.text) <= int(root.get("width")) for t in legend)
        return [t.text for t in legend], lines_end, legend_start

    rounds = [(r, 0.1 * r) for r in range(1, 6)]
    names, _, _ = drawn({"loss": rounds, "weight": rounds, "samples used (hundreds)": rounds, "validation Dice": []})
    assert names == ["loss", "samples used (hundreds)", "weight"], "a series without points is not named"
    long = "radiology-department-university-hospital-north"
    names, lines_end, _ = drawn({long: rounds, "site-b": rounds})
    assert names[0].endswith("…") and long.startswith(names[0][:-1]) and names[1] == "site-b"
    assert lines_end >= 360 / 2 - 10, "a long name takes at most half the chart"


def test_a_site_that_trained_on_nothing_has_no_loss_on_the_admin_page_or_in_its_own_log() -> None:
    """A site with nothing labelled yet, or whose pseudo-labels were all rejected, reports n=0 and ℓ=0.0 (so its
    update stays finite); the admin page and the site's log read that as a perfect fit, and the loss plot
    dipped to 0."""
    from fedmix_engine.dice_text import shown_loss
    from fedmix_engine.federation.admin import render_admin_page

    sites = {"busy": {"n": 12, "loss": 0.4321, "weight": 1.0}, "new": {"n": 0, "loss": 0.0, "weight": 0.0}}
    status = {"history": [{"round": r, "sites": sites, "reason": "all sites uploaded"} for r in (1, 2)],
              "finished": False, "round": 3, "uploaded": [], "last_round": 2, "rounds": 5, "method": "fedmix",
              "lam": 10.0, "beta": 1.5, "sites_expected": 2, "min_sites": 2}
    page = render_admin_page(status)
    assert "busy: n=12 ℓ=0.432 w=1.00; new: n=0 ℓ=— w=0.00" in page
    loss_plot = page[page.index("training loss ℓ_k per round"):page.index("samples used n_k per round")]
    assert ">busy<" in loss_plot and ">new<" not in loss_plot, "no loss line for a site without a loss"
    assert shown_loss(0, 0.0) == "—" and shown_loss(3, 0.0) == "0.000"


def _outward_address() -> str:
    """This machine's address on its network, where a request from another machine arrives (no packet
    is sent: connecting a UDP socket only picks the interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 9))
        address = probe.getsockname()[0]
    assert not address.startswith("127."), "this test needs a network interface besides loopback"
    return address


def test_the_round_history_is_for_the_admin_and_the_sites_unless_made_public(tmp_path: Path) -> None:
    """/v1/status and the admin page name every site with its sample counts, losses and weights, and
    anyone who reached the port could read them. Now: the admin on the server's machine (loopback),
    the sites with their tokens, and everyone only with --status-access public."""
    from fedmix_engine.federation.server import machine_name

    state = tmp_path / "state"
    tokens = make_tokens(state, ["site-a"])
    outward = _outward_address()
    site = {"Authorization": f"Bearer {tokens['site-a']}"}
    wrong = {"Authorization": "Bearer fmx_not-a-token"}
    seen = {}
    for access in ("sites", "local", "public"):
        args = ["--host", "0.0.0.0", "--status-access", access, "--sites", "1", "--min-sites", "1", *TINY_SETTINGS]
        with running_server(state, args if access == "sites" else args[:4]) as server:
            remote = f"http://{outward}:{server.port}"
            for who, headers in (("remote", {}), ("remote site", site), ("remote wrong token", wrong)):
                for path in ("/v1/status", "/"):
                    seen[access, who, path] = httpx.get(remote + path, headers=headers, timeout=10).status_code
            health = httpx.get(remote + "/healthz", timeout=10)  # a monitor's: open to all, naming no site
            assert health.status_code == 200 and health.json() == {"status": "ok", "failing": [], "warnings": [],
                                                                   "round": 1, "finished": False}
            page = httpx.get(server.url + "/", timeout=10)
            seen[access, "admin here", "/"] = page.status_code
            # relative, so that it also leads to the JSON behind a reverse proxy's path prefix (/fedmix/)
            assert "<a href='v1/status'>" in page.text
            if access == "sites":
                refused = httpx.get(remote + "/v1/status", timeout=10)
                assert refused.json()["detail"] == (
                    "the federation's status is for the admin on this machine and the sites (with their tokens); "
                    "the server's admin can open it to anyone with 'serve --status-access public'")
        log = server.log.read_text()  # on a network address without TLS
        assert "warning: plain HTTP on 0.0.0.0: site tokens and model weights cross the network in clear text" \
            in log
        assert f"FedMix server: http://{machine_name()}:{server.port}/ (listening on every interface; this machine " \
               f"is also {outward}) " in log, log
    expected = {"sites": {"remote": 403, "remote site": 200, "remote wrong token": 403},
                "local": {"remote": 403, "remote site": 403, "remote wrong token": 403},
                "public": {"remote": 200, "remote site": 200, "remote wrong token": 200}}
    for access, answers in expected.items():
        for who, code in answers.items():
            assert seen[access, who, "/v1/status"] == seen[access, who, "/"] == code, (access, who)
        assert seen[access, "admin here", "/"] == 200, access


def test_a_site_takes_part_when_the_server_keeps_its_history_to_its_admin(sample: Path, tmp_path: Path) -> None:
    """A site's client reads its weight from /v1/status after each round; refused it (--status-access
    local) it must go on training, not stop with the 403."""
    import shutil

    from fedmix_engine.federation.client import FederationClient

    site = tmp_path / "site-a"
    shutil.copytree(sample / "site-a", site)
    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    args = ["--host", "0.0.0.0", "--status-access", "local", "--sites", "1", "--min-sites", "1", "--rounds", "2",
            *TINY_SETTINGS]
    with running_server(state, args) as server:
        client = FederationClient(f"http://{_outward_address()}:{server.port}", token, site, device="cpu",
                                  poll_seconds=0.1)
        kinds = [event.kind for event in client.iter_join()]
        assert server.status()["finished"] and server.status()["last_round"] == 2
    assert kinds.count("uploaded") == 2 and kinds[-1] == "finished" and "round-closed" not in kinds
    assert (site / "models" / "global.safetensors").is_file()


def test_a_site_with_nothing_annotated_is_told_it_takes_part_with_weight_zero(tmp_path: Path, rng) -> None:
    """A site joining before its clinicians annotated anything trained on nothing each round, and only
    'sent n=0, loss=—' hinted why: the join now says so at once, and what changes it."""
    from fedmix_engine.data.site_store import SiteStore
    from fedmix_engine.federation.client import FederationClient

    with SiteStore.create(tmp_path / "new-clinic", ["lesion"], name="new-clinic") as store:
        store.add_image(rng.integers(0, 256, (32, 32), np.uint8), "scan-01")
    token = make_tokens(tmp_path / "state", ["new-clinic"])["new-clinic"]
    with running_server(tmp_path / "state", ["--sites", "1", "--min-sites", "1", "--rounds", "1",
                                             *TINY_SETTINGS]) as server:
        events = list(FederationClient(server.url, token, tmp_path / "new-clinic", device="cpu",
                                       poll_seconds=0.1).iter_join())
    connected = next(event for event in events if event.kind == "connected").message
    assert ("note: none of this site's 1 image(s) has a mask, a box or a tag yet, so it receives each global model "
            "but adds nothing to it (weight 0)") in connected, connected
    assert [event.message for event in events if event.kind == "uploaded"] == [
        "round 1: sent n=0, loss=— (accepted for round 1)"]
    assert events[-1].kind == "finished" and (tmp_path / "new-clinic" / "models" / "global.safetensors").is_file()


def test_a_waiting_site_is_told_which_sites_the_round_waits_for(sample: Path, tmp_path: Path) -> None:
    """A clinician whose site has delivered its update sees which hospital the round is waiting for
    (the napari status line shows the same message), not only that it waits."""
    import shutil

    from fedmix_engine.federation.client import FederationClient

    site = tmp_path / "site-a"
    shutil.copytree(sample / "site-a", site)
    state = tmp_path / "state"
    tokens = make_tokens(state, ["site-a", "site-b"])
    with running_server(state, ["--sites", "2", "--min-sites", "2", "--rounds", "2", *TINY_SETTINGS]) as server:
        events = FederationClient(server.url, tokens["site-a"], site, device="cpu", poll_seconds=0.1).iter_join()
        waiting = next(event for event in events if event.kind == "waiting")
        events.close()
        # joined again (the workstation restarted): the update it finds delivered is said to be an earlier join's
        events = FederationClient(server.url, tokens["site-a"], site, device="cpu", poll_seconds=0.1).iter_join()
        told = [next(events).kind]
        rejoined = next(event for event in events if event.kind in ("waiting", "training", "uploaded"))
        events.close()
    assert waiting.message == ("round 1: update delivered, waiting for the other sites "
                               "(not yet: site-b (in no round yet))"), waiting.message
    assert told == ["connected"] and rejoined.message == (
        "round 1: this site's update was delivered by an earlier join, waiting for the other sites "
        "(not yet: site-b (in no round yet))"), rejoined.message


def test_tls_client_that_trusts_the_certificate_works_and_plain_http_is_refused(sample: Path, tmp_path: Path) -> None:
    """... and a join that does not trust the certificate, or names the server by an address the certificate
    does not, stops at once saying so: it retried that for an hour as if the server were down."""
    from fedmix_engine.errors import FederationError
    from fedmix_engine.federation.client import FederationClient

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=fedmix-test", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    state = tmp_path / "state"
    tokens = make_tokens(state, SITES)
    args = ["--sites", "1", "--min-sites", "1", "--rounds", "1", *TINY_SETTINGS]
    with running_server(state, args, tls=(cert, key)) as server:
        trust = ssl.create_default_context(cafile=str(cert))
        pair, _ = global_pair(server.url, tokens["site-a"], verify=trust)
        assert upload(server.url, tokens["site-a"], 1, fake_update(pair, 1), verify=trust).status_code == 200
        assert server.status()["finished"]
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port
            httpx.get(f"http://127.0.0.1:{server.port}/v1/status", timeout=5).raise_for_status()
        with pytest.raises(httpx.ConnectError):  # TLS without trusting the self-signed certificate
            httpx.get(f"{server.url}/v1/status", timeout=5)
        started = time.monotonic()
        for url, ca_cert, why in ((server.url, None, "self-signed certificate"),
                                  (f"https://localhost:{server.port}", cert, "Hostname mismatch")):
            client = FederationClient(url, tokens["site-a"], sample / "site-a", device="cpu", ca_cert=ca_cert,
                                      give_up_after=5)  # a regression fails in seconds, not an hour
            with pytest.raises(FederationError, match=rf"the server's TLS certificate is not trusted \({why}.*\): "
                                                      "give the certificate the server's admin sends with --ca-cert"):
                next(client.iter_join())
        # the plain http:// address of this TLS server: 'Server disconnected without sending a response',
        # retried for an hour as if it were down
        plain = FederationClient(f"http://127.0.0.1:{server.port}", tokens["site-a"], sample / "site-a", device="cpu",
                                 give_up_after=5)
        with pytest.raises(FederationError, match=rf"^the server at 127.0.0.1:{server.port} speaks TLS: use "
                                                  rf"https://127.0.0.1:{server.port} \(with --ca-cert"):
            next(plain.iter_join())
        assert time.monotonic() - started < 10, "said at once, not retried"


def test_a_join_trusts_a_server_certificate_of_a_ca_in_the_machines_trust_store(sample: Path, tmp_path: Path) -> None:
    """A hospital's IT installs its own CA on every workstation, and browsers and curl trust it; a join trusted
    only certifi's public CAs (httpx's default), so the hospital's server was 'not trusted' until the site
    found the CA's file for --ca-cert. The join now trusts the machine's store (truststore). Here the
    machine's CA bundle is this test's CA, bind-mounted in a mount namespace of the join's own (unshare:
    nothing outside it changes; mounting needs root, as CI runs)."""
    ca, key, certs = make_certificates(tmp_path / "pki", {"server": (openssl_date(-3600), openssl_date(86400))})
    bundle = os.path.realpath(ssl.get_default_verify_paths().openssl_cafile)  # the machine's CA bundle
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"a mount namespace needs root: {probe.stderr.strip()}")
    state = tmp_path / "state"
    token_file = tmp_path / "site-a.token"
    token_file.write_text(make_tokens(state, ["site-a"])["site-a"])
    token_file.chmod(0o600)
    site = copied_sites(sample, ["site-a"], tmp_path)["site-a"]
    env = {k: v for k, v in ENV.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    args = ["--sites", "1", "--min-sites", "1", "--rounds", "1", *TINY_SETTINGS]
    with running_server(state, args, tls=(certs["server"], key), ca=ca) as server:
        join = [sys.executable, "-m", "fedmix_engine.cli", "join", "--server", server.url, "--token-file",
                str(token_file), "--site", str(site), "--device", "cpu", "--poll", "0.2"]
        alone = subprocess.run(join, env=env, capture_output=True, text=True, timeout=120)
        said = alone.stdout + alone.stderr
        assert alone.returncode == 3 and "the server's TLS certificate is not trusted" in said, said
        with_ca = subprocess.run(["unshare", "-m", "sh", "-c", f'mount --bind "$0" {bundle} && exec "$@"', str(ca),
                                  *join], env=env, capture_output=True, text=True, timeout=300)
        said = with_ca.stdout + with_ca.stderr
        assert with_ca.returncode == 0 and "federation finished after 1 rounds" in said, said
    with open(bundle, "rb") as machine:
        assert machine.read() != ca.read_bytes(), "the machine's own bundle is as it was"


def test_a_ca_without_key_usage_is_refused_alike_on_every_python_and_said_so(sample: Path, tmp_path: Path) -> None:
    """Python 3.13 checks certificates strictly by default: a site on 3.13 refused a server whose CA lacks
    keyUsage (as `openssl req -x509` makes a CA unless told), the sites on 3.11 joined it, and the refused site
    was told to give another --ca-cert, which cannot help. Every Python now checks alike and says what is
    wrong; and the server's own certificate as --ca-cert (a partial chain, 3.13's other new default) is
    trusted on every Python."""
    from fedmix_engine.errors import FederationError
    from fedmix_engine.federation.client import FederationClient, trust_store

    ca, key, certs = make_certificates(tmp_path / "pki", {"server": (openssl_date(-3600), openssl_date(86400))},
                                       ca_key_usage=False)
    state = tmp_path / "state"
    tokens = make_tokens(state, SITES)
    args = ["--sites", "1", "--min-sites", "1", "--rounds", "1", *TINY_SETTINGS]
    with running_server(state, args, tls=(certs["server"], key), ca=certs["server"]) as server:
        own = httpx.get(f"{server.url}/v1/status", verify=trust_store(certs["server"]), timeout=5)
        assert own.status_code == 200, "the server's own certificate is enough to trust it"
        client = FederationClient(server.url, tokens["site-a"], sample / "site-a", device="cpu", ca_cert=ca,
                                  give_up_after=5)  # a regression fails in seconds, not an hour
        started = time.monotonic()
        with pytest.raises(FederationError, match=r"^the server's TLS certificate \(or the CA certificate that signed "
                                                  r"it\) is not made as X.509 requires \(CA cert does not include key "
                                                  r"usage extension\): the server's admin must issue it again"):
            next(client.iter_join())
        assert time.monotonic() - started < 10, "said at once, not retried"


def test_a_join_of_a_plain_http_server_by_an_https_address_or_by_an_unknown_name_says_so_at_once(
        sample: Path, tmp_path: Path) -> None:
    """An https:// address of a server that serves plain HTTP failed the TLS handshake (WRONG_VERSION_NUMBER),
    and a mistyped host name did not resolve; both were retried for an hour as 'the server does not answer'."""
    from fedmix_engine.errors import FederationError
    from fedmix_engine.federation.client import FederationClient

    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    with running_server(state, ["--sites", "1", "--rounds", "1", *TINY_SETTINGS]) as server:
        client = FederationClient(server.url.replace("http://", "https://"), token, sample / "site-a", device="cpu",
                                  give_up_after=5)  # a regression fails in seconds, not an hour
        with pytest.raises(FederationError, match=r"^the server does not speak TLS at this address \(it answers in "
                                                  r"plain HTTP\): use http:// for it"):
            next(client.iter_join())
    mistyped = FederationClient("http://fedmix-no-such-host.invalid:8765", token, sample / "site-a", device="cpu",
                                give_up_after=5)  # a name that cannot resolve (RFC 2606), before any answer
    with pytest.raises(FederationError, match=r"^the server's name 'fedmix-no-such-host.invalid' is not known to "
                                              "this machine's name service: check the server address"):
        next(mistyped.iter_join())


@pytest.mark.parametrize("change, said", [
    ({"schedule": "cosine"}, r"train settings from the server: unknown setting\(s\) \['schedule'\]: written by a "
                             r"newer napari-fedmix\? Update it here"),
    ({"lr": "1e-3"}, r"train settings from the server\.lr: must be a finite number, not '1e-3'"),
    ({"flip": "no"}, r"train settings from the server\.flip: must be true or false, not 'no'"),
    ({"batch_size": 0}, r"train settings from the server\.batch_size: must be ≥ 1, not 0"),
])
def test_train_settings_a_site_cannot_use_are_refused_by_name_at_the_join(sample: Path, tmp_path: Path, capsys,
                                                                          change: dict, said: str) -> None:
    """A server of a newer version sends a setting this site does not know: the join and its --check were a
    TypeError traceback. A wrong type (a hand-edited server.json of an older version) trained on: "flip":
    "no" is true. The real server's app, its /v1/config changed on the way out, plays that server."""
    from fedmix_engine.cli import main
    from fedmix_engine.federation.client import FederationClient

    site = copied_sites(sample, ["site-a"], tmp_path)["site-a"]
    state_dir = tmp_path / "state"
    token = make_tokens(state_dir, ["site-a"])["site-a"]
    app = tiny_server_app(state_dir, sites=1)

    async def other_server(scope, receive, send):
        if scope.get("path") != "/v1/config":
            return await app(scope, receive, send)
        start = {}

        async def rewrite(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            config = json.loads(message["body"])
            config["train"].update(change)
            body = json.dumps(config).encode()
            headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
        await app(scope, receive, rewrite)

    with serving_in_process(other_server) as url:
        assert main(["join", "--check", "--server", url, "--token", token, "--site", str(site), "--device",
                     "cpu"]) == 2, "bad input, as a network this site has no package for is"
        said_there = capsys.readouterr()
        assert said_there.out.splitlines()[1] == "token: accepted, as site 'site-a'", "what passed comes first"
        assert re.fullmatch(f"error: {said}", said_there.err.splitlines()[-1]), said_there.err
        with pytest.raises(InputError, match=f"^{said}$"):
            next(FederationClient(url, token, site, device="cpu", poll_seconds=0.1).iter_join())
        assert httpx.get(f"{url}/v1/status").json()["uploaded"] == []
    assert TrainConfig.from_dict(json.loads(json.dumps(asdict(TrainConfig())))) == TrainConfig()


def test_no_request_body_contains_an_image(sample: Path, tmp_path: Path) -> None:
    """Record every request body the server receives during a real round (site-a also scoring the models
    on its held-out images); none may hold pixels, and an evaluation report holds only counts and means."""
    import threading

    from fedmix_engine.federation.client import FederationClient

    state_dir = tmp_path / "state"
    tokens = make_tokens(state_dir, SITES)
    app = tiny_server_app(state_dir, sites=3)
    bodies: list[bytes] = []

    async def recording(scope, receive, send):
        chunks: list[bytes] = []

        async def tap():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    bodies.append(b"".join(chunks))
            return message
        await app(scope, tap, send)

    with serving_in_process(recording) as url:
        held_out = {"site-a": sample / "eval" / "site-a" / "test"}
        threads = [threading.Thread(target=FederationClient(url, tokens[n], sample / n, device="cpu",
                                                            poll_seconds=0.1, held_out=held_out.get(n)).join)
                   for n in SITES]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    payload = b"".join(bodies)
    evaluations = [json.loads(b) for b in bodies if b.startswith(b"{")]
    uploads = [b for b in bodies if len(b) > 0 and not b.startswith(b"{")]
    assert len(uploads) >= 3, "the uploads were recorded"
    assert len(evaluations) == 2, "site-a scored round 0's model and the final one"
    for evaluation in evaluations:
        assert set(evaluation) == {"images", "dice", "classes"} and set(evaluation["classes"]) == {"lesion"}
        assert set(evaluation["classes"]["lesion"]) == {"images", "lesion_images", "dice", "iou"}
        assert all(isinstance(v, int | float) for v in evaluation["classes"]["lesion"].values())
    # no run of any site image's pixel data appears anywhere in what the server received
    from fedmix_engine.data.site_store import SiteStore

    for name in [*SITES, "eval/site-a/test"]:
        with SiteStore.open(sample / name, readonly=True) as store:
            for image_id in store.image_ids():
                pixels = store.read_image(image_id).tobytes()
                for start in range(0, len(pixels) - 64, 256):
                    assert pixels[start:start + 64] not in payload, f"pixels of {name}/{image_id} crossed the wire"
    # every body is exactly a safetensors update: header covers all bytes, only the report as
    # metadata, and tensors that are weights, never image-shaped
    import tempfile

    from fedmix_engine.federation.wire import read_header

    for body in uploads:
        with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
            f.write(body)
            f.flush()
            _, metadata = read_header(Path(f.name))  # refuses bodies with bytes the header does not describe
            tensors = load_file(f.name)
        assert set(metadata) == {"fedmix-report"}
        for key, value in tensors.items():
            assert value.dim() < 2 or max(value.shape[-2:]) <= 3, f"{key} {tuple(value.shape)} looks like pixels"
    report = json.loads((state_dir / "rounds" / "000001" / "meta.json").read_text())
    assert set(report["sites"]) == set(SITES)
    assert np.isfinite([s["loss"] for s in report["sites"].values()]).all()


def test_join_explains_a_bad_token_and_an_api_mismatch(sample: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_tokens(state, SITES)
    args = ["--sites", "3", "--min-sites", "3", "--rounds", "1", *TINY_SETTINGS]
    with running_server(state, args) as server:
        def join(url: str, token: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "fedmix_engine.cli", "join", "--server", url, "--token", token,
                                   "--site", str(sample / "site-a"), "--device", "cpu"],
                                  capture_output=True, text=True, timeout=120, env=ENV)

        bad = join(server.url, "fmx_wrong")
        assert bad.returncode == 3 and "refused this site's token" in bad.stdout
        assert "unknown or revoked token" in bad.stdout
        mismatch = join(server.url + "/v0", make_tokens(state, ["site-z"])["site-z"])
        assert mismatch.returncode == 3 and "does not speak API v1" in mismatch.stdout
        assert server.status()["uploaded"] == []


def test_join_refuses_a_missing_or_empty_token_file_a_url_without_scheme_and_a_bad_ca_cert(
        sample: Path, tmp_path: Path, capsys) -> None:
    from fedmix_engine.cli import main
    from fedmix_engine.errors import InputError
    from fedmix_engine.federation.client import FederationClient

    site = str(sample / "site-a")
    common = ["join", "--site", site, "--device", "cpu"]
    (tmp_path / "token").write_text("fmx_something\n")
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "not-a-cert.pem").write_text("hello\n")
    cases = [
        (["--server", "http://127.0.0.1:9", "--token-file", str(tmp_path / "missing")],
         f"{tmp_path / 'missing'}: token file not found"),
        (["--server", "http://127.0.0.1:9", "--token-file", str(tmp_path / "empty")],
         f"{tmp_path / 'empty'}: the token file is empty"),
        (["--server", "https://127.0.0.1:9", "--token-file", str(tmp_path / "token"),
          "--ca-cert", str(tmp_path / "nope.pem")], f"{tmp_path / 'nope.pem'}: CA certificate not found"),
        (["--server", "https://127.0.0.1:9", "--token-file", str(tmp_path / "token"),
          "--ca-cert", str(tmp_path / "not-a-cert.pem")], f"{tmp_path / 'not-a-cert.pem'}: not a PEM certificate"),
        # a pause of none (or NaN, which no comparison holds) polled the server without a break while waiting
        *[(["--server", "http://127.0.0.1:9", "--token-file", str(tmp_path / "token"), "--poll", poll],
           f"--poll: seconds between status checks must be a number ≥ 0.1, not {float(poll)}")
          for poll in ("-1", "0", "0.01", "nan", "inf")],
    ]
    for extra, expected in cases:
        assert main([*common, *extra]) == 2, extra
        assert expected in capsys.readouterr().err
    # without a scheme every request failed with UnsupportedProtocol, retried for an hour
    for server in ("127.0.0.1:9", "localhost:8765", "ftp://host", ""):
        with pytest.raises(InputError, match=r"--server: .* is not an http:// or https:// URL"):
            FederationClient(server, "fmx_something", site, device="cpu", give_up_after=1)
    assert FederationClient(" http://127.0.0.1:9/ ", "t", site, device="cpu").http.base_url == "http://127.0.0.1:9"
    # a port over 65535 was wrapped by the socket layer (99999 dialled 34463) and the refusal retried for an hour
    with pytest.raises(InputError, match=r"--server: 'http://127.0.0.1:99999': a TCP port is a number from 1 to "
                                         r"65535, not 99999"):
        FederationClient("http://127.0.0.1:99999", "t", site, device="cpu", give_up_after=1)


def test_token_add_redirected_to_a_file_makes_a_token_file_and_a_two_line_one_is_refused_at_once(
        sample: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """'token add SITE > site.token' wrote the token *and* the note after it into the file; join then sent both
    lines as one header, which the HTTP library refused locally, and join retried that for an hour as if
    the network had failed. The note now goes to stderr, and a token that is not one word is refused
    before the first request, naming where it came from."""
    from fedmix_engine.cli import main
    from fedmix_engine.cli_federation import _read_token_file

    state = tmp_path / "state"
    with open(tmp_path / "site-a.token", "wb") as out:
        added = subprocess.run([sys.executable, "-m", "fedmix_engine.cli", "token", "add", "site-a", "--state",
                                str(state)], stdout=out, stderr=subprocess.PIPE, text=False, timeout=60, env=ENV)
    assert added.returncode == 0 and b"shown once" in added.stderr
    written = (tmp_path / "site-a.token").read_text()
    assert written.count("\n") == 1 and written.startswith("fmx_")
    with running_server(state, ["--sites", "1", "--rounds", "1", *TINY_SETTINGS]) as server:
        answer = httpx.get(f"{server.url}/v1/config", headers={"Authorization": f"Bearer {written.strip()}"})
        assert answer.status_code == 200 and answer.json()["site"] == "site-a"
        # the same redirect in Windows PowerShell 5 writes UTF-16 with a byte-order mark; Notepad UTF-8 with one
        for encoding in ("utf-16", "utf-8-sig", "utf-16-be"):
            copy = tmp_path / f"{encoding}.token"
            copy.write_bytes((codecs.BOM_UTF16_BE if encoding == "utf-16-be" else b"")
                             + written.replace("\n", "\r\n").encode(encoding))
            read = _read_token_file(copy)
            answer = httpx.get(f"{server.url}/v1/config", headers={"Authorization": f"Bearer {read}"})
            assert answer.status_code == 200 and answer.json()["site"] == "site-a", encoding

    two_lines = tmp_path / "old.token"
    two_lines.write_text(written + "(token for site 'site-a': shown once, stored hashed in tokens.json)\n")
    two_lines.chmod(0o600)
    common = ["join", "--server", "http://127.0.0.1:9", "--site", str(sample / "site-a"), "--device", "cpu"]
    started = time.monotonic()
    assert main([*common, "--token-file", str(two_lines)]) == 2
    assert f"{two_lines}: 2 lines where a token is one (fmx_...)" in capsys.readouterr().err
    monkeypatch.setenv("FEDMIX_TOKEN", "fmx_one two")
    assert main(common) == 2
    assert "FEDMIX_TOKEN: the token holds spaces" in capsys.readouterr().err
    assert time.monotonic() - started < 30, "refused before any request, not retried"


def test_a_damaged_token_file_is_named_by_every_command_and_a_running_server_refuses_everyone_until_fixed(
        tmp_path: Path, capsys) -> None:
    """tokens.json is written whole by 'token add', so a damaged one was edited by hand (a revocation done
    in an editor) or by a failing disk. 'token list', 'token add' and 'serve' ended in a JSONDecodeError
    traceback, and a running server answered every request with a 500 and a traceback. Now each names the
    file and what to do; the running server fails closed (the edit may have been a revocation) with a 503
    the sites retry, and answers again once the file is fixed."""
    from fedmix_engine.cli import main

    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    good = (state / "tokens.json").read_bytes()
    with running_server(state, ["--sites", "1", "--rounds", "1", *TINY_SETTINGS]) as server:
        def config() -> httpx.Response:
            return httpx.get(f"{server.url}/v1/config", headers={"Authorization": f"Bearer {token}"}, timeout=10)

        assert config().status_code == 200
        (state / "tokens.json").write_text('{"site-a": {\n')
        refused, again = config(), config()
        assert refused.status_code == again.status_code == 503
        assert "its token file is damaged" in refused.json()["detail"]
        health = httpx.get(f"{server.url}/healthz", timeout=10)
        assert health.status_code == 503 and health.json()["failing"] == ["the token file is damaged: every site "
                                                                          "is refused"]
        for command in (["token", "--state", str(state), "list"], ["token", "--state", str(state), "add", "site-b"]):
            assert main(command) == 2, command
            err = capsys.readouterr().err
            assert err.startswith(f"error: {state / 'tokens.json'}: damaged token file (Expecting property name"), err
            assert "move it away and give every site a new token with 'fedmix-engine token add'" in err
        (state / "tokens.json").write_text('["site-a"]')  # JSON, but not a token file
        assert config().status_code == 503
        assert main(["status", "--state", str(state)]) == 0  # the rest of the status is still shown
        assert "sites not yet uploaded: unknown (tokens.json cannot be read: another user's, or damaged; " \
               "'fedmix-engine token list' says which)" in capsys.readouterr().out
        (state / "tokens.json").write_bytes(good)
        assert config().status_code == 200 and httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    (state / "tokens.json").write_text('{"site-a": {\n')  # the server stopped: serve names the file at start
    assert main(["serve", "--state", str(state), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {state / 'tokens.json'}: damaged token file (Expecting property name"), err
    log = server.log.read_text()
    assert "Traceback" not in log and "damaged token file (not a map of site names to entries" in log, log[-3000:]
    assert log.count("damaged token file (Expecting property name") == 1, "said once, not once per request"


def test_token_commands_run_at_once_lose_no_site(tmp_path: Path, monkeypatch) -> None:
    """``token add`` read the token file, added its site and wrote it back: two run at once (an admin's
    script adding sites in parallel, two admins) each wrote the file without the other's site; ten in
    parallel kept 3 of 10. Both tokens had been printed and handed out, and a site whose entry was lost
    was refused at joining. Here a second ``token add`` process starts between this one's read and
    its write."""
    from fedmix_engine.federation.tokens import TokenStore

    store = TokenStore(tmp_path)
    store.add("site-a")
    other: list[subprocess.Popen] = []
    save = TokenStore._save

    def racing_save(self: TokenStore, entries: dict) -> None:
        if not other:  # this add has read the file; another process adds its site now
            other.append(subprocess.Popen([sys.executable, "-m", "fedmix_engine.cli", "token", "add", "site-c",
                                           "--state", str(tmp_path)], stdout=subprocess.PIPE, text=True, env=ENV))
            with contextlib.suppress(subprocess.TimeoutExpired):
                other[0].wait(5)  # the old code let it write at once; now it waits for this add's lock
        save(self, entries)

    monkeypatch.setattr(TokenStore, "_save", racing_save)
    token_b = store.add("site-b")
    token_c = other[0].communicate(timeout=60)[0].strip()
    assert other[0].returncode == 0
    monkeypatch.undo()
    fresh = TokenStore(tmp_path)
    assert set(fresh.sites()) == {"site-a", "site-b", "site-c"}
    assert fresh.site_for(token_b) == "site-b" and fresh.site_for(token_c) == "site-c"


def test_token_add_refuses_site_names_that_cannot_be_file_names_on_every_server(tmp_path: Path) -> None:
    """A site's name names its update's file on the server; 'CON' passed, and a server on Windows could
    never have stored that site's update."""
    from fedmix_engine.errors import InputError
    from fedmix_engine.federation.tokens import TokenStore

    store = TokenStore(tmp_path)
    for bad in ("../x", "a b", "-a", "x" * 65, "site-a\n", "Süd"):  # a newline in a file name; not ASCII, said
        with pytest.raises(InputError, match="must use ASCII letters, digits"):
            store.add(bad)
    for device in ("CON", "nul", "Com1", "lpt9.site", "aux.txt"):
        with pytest.raises(InputError, match=f"site name '{re.escape(device)}' is a device name on Windows"):
            store.add(device)
    for fine in ("console", "com10", "site-a", "nullstadt", "A.1"):
        assert store.site_for(store.add(fine)) == fine
    assert set(store.sites()) == {"console", "com10", "site-a", "nullstadt", "A.1"}
    for twin in ("Site-A", "a.1"):  # one file on a case-insensitive file system
        with pytest.raises(InputError, match=f"site name '{twin}' differs from the existing site"):
            store.add(twin)
    renewed = store.add("site-a")
    assert store.site_for(renewed) == "site-a", "a new token for the same name is still allowed"
    assert set(store.sites()) == {"console", "com10", "site-a", "nullstadt", "A.1"}


NGINX_413 = (b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n<center><h1>413 "
             b"Request Entity Too Large</h1></center>\r\n<hr><center>nginx/1.24.0</center>\r\n</body>\r\n</html>\r\n")


def test_an_upload_a_reverse_proxy_refuses_as_too_large_says_what_the_proxys_admin_must_change(
        sample: Path, tmp_path: Path) -> None:
    """nginx in front of the server refuses bodies over 1 MB unless told otherwise, and a model at the
    reference width is 140 MB: every upload failed with '413 <html>\\r\\n<head><title>…' and 150 more
    characters of markup. The page's title, who answered and what to change are said instead."""
    import http.server
    import threading

    from fedmix_engine.federation.client import FederationClient, FederationError

    class Nginx(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(413)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(NGINX_413)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(NGINX_413)

        def version_string(self) -> str:  # the Server header
            return "nginx/1.24.0"

        def log_message(self, *args) -> None:
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Nginx)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        client = FederationClient(f"http://127.0.0.1:{proxy.server_port}", "fmx_token", sample / "site-a",
                                  device="cpu")
        response = client._request("POST", "/v1/rounds/1/update", content=b"x" * 2**20)
        with pytest.raises(FederationError) as refused:
            client._raise_for_refusal(response, "/v1/rounds/1/update")
    finally:
        proxy.shutdown()
    assert str(refused.value) == (
        "/v1/rounds/1/update: 413 Request Entity Too Large, answered by nginx/1.24.0: a reverse proxy in front of "
        "the server limits the size of uploads; its admin must allow the model's size (nginx: "
        "client_max_body_size, see docs/federation.md)")


NGINX_408 = (b"<html>\r\n<head><title>408 Request Time-out</title></head>\r\n<body>\r\n<center><h1>408 Request "
             b"Time-out</h1></center>\r\n<hr><center>nginx/1.24.0</center>\r\n</body>\r\n</html>\r\n")


def test_a_request_dropped_as_timed_out_is_sent_again(sample: Path) -> None:
    """408 says the server (ours, after its idle limit, or nginx's client_body_timeout in front of it) heard
    nothing for a while and dropped the request, which may be repeated. A join took it as a refusal and
    stopped; it now sends the request again, as after a 5xx."""
    import http.server
    import threading

    from fedmix_engine.federation.client import FederationClient

    answers = [408, 200]

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            status = answers.pop(0)
            page = NGINX_408 if status == 408 else b'{"accepted": true, "message": "taken"}'
            self.send_response(status)
            self.send_header("Content-Type", "text/html" if status == 408 else "application/json")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def version_string(self) -> str:
            return "nginx/1.24.0"

        def log_message(self, *args) -> None:
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    told = []
    try:
        client = FederationClient(f"http://127.0.0.1:{proxy.server_port}", "fmx_token", sample / "site-a",
                                  device="cpu")
        client._on_retry = told.append
        response = client._request("POST", "/v1/rounds/1/update", content=b"x" * 1000)
    finally:
        proxy.shutdown()
    assert response.status_code == 200 and response.json()["message"] == "taken" and not answers
    assert [e.kind for e in told] == ["retrying", "reconnected"]
    assert told[0].message == ("the server dropped the request (408: 408 Request Time-out, answered by "
                               "nginx/1.24.0); trying again in 0.5 s")


def test_join_warns_when_the_sites_token_can_be_read_by_other_users(tmp_path: Path, capsys) -> None:
    """The token is the site's identity, yet a token file any user could read, or a token on the command
    line (in every user's process list), passed without a word. ssh says so of a private key; so does join."""
    from fedmix_engine.cli import main

    token = tmp_path / "site-a.token"
    token.write_text("fmx_something\n")
    common = ["join", "--server", "http://127.0.0.1:9", "--site", str(tmp_path / "no-site")]  # stops at the site
    for mode, warned in ((0o644, True), (0o640, True), (0o600, False)):
        token.chmod(mode)
        assert main([*common, "--token-file", str(token)]) == 2
        err = capsys.readouterr().err
        assert (f"warning: {token}: other users of this machine can read this site's token (mode {mode:o}); "
                f"chmod 600 {token}" in err) is warned, err
        assert "no-site" in err, "the warning does not stop the join"
    assert main([*common, "--token", "fmx_something"]) == 2
    assert "warning: a token given with --token shows in the process list" in capsys.readouterr().err


def test_a_new_federation_is_not_started_in_a_folder_of_something_else(tmp_path: Path, sample: Path,
                                                                       capsys) -> None:
    """'serve --state' given a folder that is not a state directory started a new federation in it: in a
    site folder beside its patient images, in a simulate run, or, for a --state one level too high
    (/srv/fedmix for /srv/fedmix/state), as a second federation beside the real one, whose sites then
    met a new federation id and a fresh model. A new federation starts in a new or empty folder (or one
    holding only the tokens made for it) and elsewhere is refused, naming what the folder holds."""
    import shutil

    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState

    config = ServerConfig(rounds=1, model=ModelConfig(base_width=4))
    site = shutil.copytree(sample / "site-a", tmp_path / "site-a", ignore=shutil.ignore_patterns("models"))
    before = sorted(p.name for p in site.iterdir())
    real = tmp_path / "srv" / "state"
    ServerState(real, config)
    for folder, holds in ((site, "annotations.db, images, masks, site.json"), (tmp_path / "srv", "state")):
        with pytest.raises(InputError) as refused:
            ServerState(folder, config)
        assert str(refused.value).startswith(f"{folder}: is not a server state directory (no server.json) and "
                                             f"not empty ({holds}")
        assert "give a new or empty folder" in str(refused.value)
    # the first 'token add' too (it wrote tokens.json beside the patient images, or above the real state)
    from fedmix_engine.cli import main

    for folder in (site, tmp_path / "srv"):
        assert main(["token", "add", "site-b", "--state", str(folder)]) == 2
        assert f"{folder}: is not a server state directory (no server.json) and not empty" in capsys.readouterr().err
    assert main(["token", "add", "site-b", "--state", str(real)]) == 0, "a federation's own folder"
    assert sorted(p.name for p in site.iterdir()) == before and sorted(os.listdir(tmp_path / "srv")) == ["state"]
    tokens_first = tmp_path / "new"  # the documented order: the sites' tokens, then the first serve
    make_tokens(tokens_first, ["site-a"])
    assert ServerState(tokens_first, config).current_round == 1


def test_more_tokens_than_a_one_site_round_waits_for_is_said_in_the_singular(tmp_path: Path) -> None:
    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.status import more_sites_than_expected
    from fedmix_engine.federation.tokens import TokenStore

    make_tokens(tmp_path / "state", ["site-a", "site-b"])
    said = more_sites_than_expected(TokenStore(tmp_path / "state"), ServerConfig(sites=1, min_sites=1))
    assert said.startswith("2 sites hold tokens (site-a, site-b), but a round closes as soon as 1 has uploaded "
                           "(--sites 1): the slowest is left out of every round; restart serve with --sites 2")


def test_token_and_serve_cli_refuse_a_file_as_state_and_a_bad_port_and_say_when_a_token_is_replaced(
        tmp_path: Path, capsys) -> None:
    from fedmix_engine.cli import main
    from fedmix_engine.federation.tokens import TokenStore

    state = tmp_path / "state"
    assert main(["token", "add", "site-a", "--state", str(state)]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["token", "add", "site-a", "--state", str(state)]) == 0
    replaced = capsys.readouterr()
    second = replaced.out.strip()
    assert "the earlier token of this site no longer works" in replaced.err
    tokens = TokenStore(state)
    assert tokens.site_for(first) is None and tokens.site_for(second) == "site-a"
    assert main(["token", "revoke", "--state", str(state)]) == 2
    assert "SITE: name the site: fedmix-engine token revoke SITE --state DIR" in capsys.readouterr().err
    assert main(["token", "revoke", "site-A", "--state", str(state)]) == 2  # a typing error names the real ones
    assert "SITE: no token for site 'site-A'; the sites with tokens: site-a" in capsys.readouterr().err
    assert TokenStore(state).site_for(second) == "site-a"
    assert main(["token", "list", "--state", str(tmp_path / "typo")]) == 0
    listed = capsys.readouterr()
    assert listed.out == "" and f"no site tokens in {tmp_path / 'typo'}" in listed.err
    assert not (tmp_path / "typo").exists()
    assert main(["token", "list", "--state", str(state)]) == 0
    assert capsys.readouterr().out.startswith("site-a\tcreated ")
    # the site after --state, as an admin types it: argparse alone left it over as "unrecognized arguments"
    assert main(["token", "add", "--state", str(state), "site-c"]) == 0
    assert "(token for site 'site-c'" in capsys.readouterr().err
    assert main(["token", "revoke", "--state", str(state), "site-c"]) == 0
    assert capsys.readouterr().out == "revoked the token of site 'site-c'\n"
    with pytest.raises(SystemExit):
        main(["token", "add", "--state", str(state), "site-c", "site-d"])
    assert "fedmix-engine token: error: unrecognized arguments: site-d" in capsys.readouterr().err
    # 'status' between 'token add' and the first serve: the folder is not foreign, the federation not started
    assert main(["token", "add", "site-b", "--state", str(state)]) == 0
    assert main(["token", "revoke", "site-b", "--state", str(state)]) == 0
    capsys.readouterr()
    assert main(["status", "--state", str(state)]) == 2
    assert capsys.readouterr().err == (f"error: {state}: no federation here yet (tokens of 1 site(s): site-a): "
                                       f"'fedmix-engine serve --state {state}' starts it\n")
    assert main(["status", "--state", str(tmp_path / "stat")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'stat'}: no such folder: give the folder 'serve "
                                       "--state' was started with\n")
    assert not (tmp_path / "stat").exists()

    (tmp_path / "a-file").write_text("keep me")
    for argv in (["token", "add", "site-b"], ["serve"]):
        assert main([*argv, "--state", str(tmp_path / "a-file")]) == 2
        assert "a-file: is a file, not a server state directory" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "keep me"
    with pytest.raises(SystemExit) as refused:
        main(["serve", "--state", str(state), "--port", "99999"])
    assert refused.value.code == 2
    assert "--port: a TCP port is a number from 1 to 65535, not '99999'" in capsys.readouterr().err


def test_serve_names_a_missing_garbled_or_mismatched_tls_file_before_starting(tmp_path: Path, capsys) -> None:
    from fedmix_engine.cli import main

    pem = {}
    for name in ("one", "two"):
        cert, key = tmp_path / f"{name}-cert.pem", tmp_path / f"{name}-key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
        pem[name] = (cert, key)
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    state = tmp_path / "state"
    cases = [
        ((tmp_path / "missing.pem", pem["one"][1]), f"{tmp_path / 'missing.pem'}: TLS certificate not found"),
        ((pem["one"][0], tmp_path / "missing.key"), f"{tmp_path / 'missing.key'}: TLS key not found"),
        ((tmp_path / "garbage.pem", pem["one"][1]), f"{tmp_path / 'garbage.pem'}: certificate and key"),
        ((pem["one"][0], pem["two"][1]), "KEY_VALUES_MISMATCH"),
    ]
    for (cert, key), expected in cases:
        assert main(["serve", "--state", str(state), "--sites", "1", "--tls-cert", str(cert), "--tls-key", str(key),
                     "--port", "9"]) == 2
        assert expected in capsys.readouterr().err
    assert not state.exists(), "refused before the state directory was created"
    # a private key other users may read is said, as ssh says it (the run stops here at a file given as --state)
    (tmp_path / "a-file").write_text("")
    for mode, warned in ((0o644, True), (0o600, False)):
        pem["one"][1].chmod(mode)
        assert main(["serve", "--state", str(tmp_path / "a-file"), "--tls-cert", str(pem["one"][0]),
                     "--tls-key", str(pem["one"][1])]) == 2
        err = capsys.readouterr().err
        assert (f"warning: {pem['one'][1]}: other users of this machine can read the server's TLS private key "
                f"(mode 644); chmod 600" in err) is warned, err


def test_a_restart_may_extend_a_finished_federation_but_never_change_what_sites_train(tmp_path: Path) -> None:
    """An admin restarts ``serve`` with more rounds (or the same command minus some options): the
    federation goes on from its last round. A change to what sites train or how they are weighed is
    refused, naming each field, and leaves server.json as it was."""
    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    created = ["--sites", "1", "--min-sites", "1", "--rounds", "1", *TINY_SETTINGS]
    with running_server(state, created) as server:
        pair, _ = global_pair(server.url, token)
        assert upload(server.url, token, 1, fake_update(pair, seed=1)).status_code == 200
        assert server.status()["finished"]
    with running_server(state, ["--rounds", "1"]) as server:  # a subset of the creating options, all the same
        assert server.status()["finished"] and server.status()["last_round"] == 1
    with running_server(state, ["--rounds", "2", "--round-timeout", "900"]) as server:
        status = server.status()
        assert not status["finished"] and status["round"] == 2 and status["rounds"] == 2
        (change,) = status["settings_changes"]  # the run's provenance, for the admin page and the JSON
        assert change["from_round"] == 2 and change["changes"] == ["round_timeout: 600.0 → 900.0", "rounds: 1 → 2"]
        assert "from round 2" in httpx.get(f"{server.url}/", timeout=10).text
        pair, round_number = global_pair(server.url, token)
        assert round_number == 1
        assert upload(server.url, token, 2, fake_update(pair, seed=2)).status_code == 200
        assert server.status()["finished"] and server.status()["last_round"] == 2
    log = "".join(p.read_text() for p in tmp_path.glob("server-*.log"))
    assert "settings changed on this start: round_timeout: 600.0 → 900.0; rounds: 1 → 2" in log
    assert "INFO federation finished after 1 rounds; final model: " in log
    assert f"INFO federation finished after 2 rounds; final model: {state / 'rounds' / '000002'}" in log
    settings = json.loads((state / "server.json").read_text())
    assert settings["rounds"] == 2 and settings["round_timeout"] == 900.0
    with running_server(state, []) as server:  # the extended settings are the federation's from now on
        assert server.status()["finished"] and server.status()["rounds"] == 2

    saved = (state / "server.json").read_bytes()
    refusals = [
        (["--lam", "3", "--lr", "0.01", "--rounds", "3"],
         # named by the options typed, which are what to leave out or set back
         "these settings are fixed for the life of a federation (--lam: 10.0 → 3.0; --lr: 0.001 → 0.01); leave them "
         "out to resume it, or use a new --state directory for a new one (adjustable on a restart: --sites, "
         "--min-sites, --round-timeout, --rounds, --max-upload-mb, --keep-models)"),
        (["--width", "8"], "(--width: 4 → 8)"),
        (["--rounds", "1"], "--rounds: the federation has completed 2 rounds; give --rounds 2 or more"),
        (["--min-sites", "2"], "--min-sites: need 1 ≤ min-sites (2) ≤ sites (1)"),
    ]
    for args, message in refusals:
        run = subprocess.run([sys.executable, "-m", "fedmix_engine.cli", "serve", "--state", str(state),
                              "--port", str(free_port()), *args], capture_output=True, text=True, timeout=60, env=ENV)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr)
        assert (state / "server.json").read_bytes() == saved
    (state / "server.json").write_text('{"sites": 1, "rounds": ')
    run = subprocess.run([sys.executable, "-m", "fedmix_engine.cli", "serve", "--state", str(state), "--port",
                          str(free_port())], capture_output=True, text=True, timeout=60, env=ENV)
    assert run.returncode == 2 and f"{state / 'server.json'}: unreadable federation settings" in run.stderr


@pytest.mark.parametrize("change, said", [
    ({"lam": []}, "lam: must be a finite number, not []"),  # was a TypeError in the weights' own check
    ({"rounds": "10"}, "rounds: must be an integer, not '10'"),
    ({"sites": True}, "sites: must be an integer, not True"),
    ({"method": 1}, "method: must be a text, not 1"),
    ({"class_names": "lesion"}, "class_names: must be a list of class names, not 'lesion'"),
    ({"train": {"lr": None}}, "train.lr: must be a finite number, not None"),
])
def test_a_hand_edited_server_json_of_the_wrong_types_is_named_by_field(tmp_path: Path, change: dict,
                                                                        said: str) -> None:
    from fedmix_engine.federation.server_config import ServerConfig, load_server_config

    stored = ServerConfig(class_names=("lesion",)).to_dict()
    path = tmp_path / "server.json"
    path.write_text(json.dumps({**stored, **change}))
    with pytest.raises(InputError) as refused:
        load_server_config(path)
    assert refused.value.where == str(path) and said in refused.value.reason, refused.value
    path.write_text(json.dumps({**stored, "round_timeout": None, "lam": 10}))  # null: no deadline; 10 for 10.0
    assert load_server_config(path) == replace(ServerConfig(class_names=("lesion",)), round_timeout=math.inf)


def test_a_site_in_two_federations_keeps_an_optimiser_state_for_each(sample: Path, tmp_path: Path) -> None:
    """Adam's moments are kept per federation: a site that joins a second federation with another model
    width used to load the first one's moments and crash on its first step (a size mismatch); one with
    the same width would have trained on another run's moments without a word."""
    def join(server, token: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedmix_engine.cli", "join", "--server", server.url, "--token",
                               token, "--site", str(site), "--device", "cpu", "--poll", "0.2"],
                              capture_output=True, text=True, timeout=300, env=ENV)

    import shutil

    site = tmp_path / "site-a"
    shutil.copytree(sample / "site-a", site, ignore=shutil.ignore_patterns("models"))  # others' joins wrote there
    for name, width in (("first", "4"), ("second", "8")):
        state = tmp_path / name
        token = make_tokens(state, ["site-a"])["site-a"]
        with running_server(state, ["--sites", "1", "--min-sites", "1", "--rounds", "1", *TINY_SETTINGS,
                                    "--width", width]) as server:
            run = join(server, token)
            assert run.returncode == 0, run.stdout + run.stderr
            assert server.status()["finished"]
    ids = [(tmp_path / name / "federation-id").read_text() for name in ("first", "second")]
    assert ids[0] != ids[1]
    assert sorted(p.name for p in (site / "models").glob("*-state.pt")) == sorted(
        f"federation-{i}-state.pt" for i in ids)
    # both end at round 1: each final model keeps its own copy
    assert sorted(p.name for p in (site / "models").glob("*-round-*.safetensors")) == sorted(
        f"federation-{i}-round-0001.safetensors" for i in ids)

    from fedmix_engine.federation.client import FederationError, federation_prefix

    assert federation_prefix(None) == "client"  # a server from before federation ids: client-state.pt
    for bad in ("../../etc/cron.d/x", "ABC", "", "0" * 65):  # the id names files: nothing but a hex id
        with pytest.raises(FederationError, match="malformed federation id"):
            federation_prefix(bad)


def test_a_running_server_sees_a_replaced_token_even_within_one_tick_of_the_file_clock(tmp_path: Path) -> None:
    """The server re-reads tokens.json when it changes. File times come from a coarse clock (a few ms), so
    an admin's change can leave the mtime the server already saw: the old token must stop working anyway."""
    from fedmix_engine.federation.tokens import TokenStore

    state = tmp_path / "state"
    server_view, admin = TokenStore(state), TokenStore(state)
    old = admin.add("site-a")
    assert server_view.site_for(old) == "site-a"
    seen = (state / "tokens.json").stat()
    new = admin.add("site-a")  # replaced: the same size of file
    assert (state / "tokens.json").stat().st_size == seen.st_size
    os.utime(state / "tokens.json", ns=(seen.st_atime_ns, seen.st_mtime_ns))  # as if within the same tick
    assert server_view.site_for(old) is None and server_view.site_for(new) == "site-a"


def test_a_sites_update_in_the_open_round_is_left_out_when_its_token_is_revoked(tmp_path: Path) -> None:
    """An admin revokes a site (its data found mislabelled, its machine compromised) after it has uploaded
    this round: its update still went into the round's model, and with it the round closed early as if
    every expected site had reported. Now it is left out (said in the log) and the round closes on the
    sites that count."""
    from fedmix_engine.federation.tokens import TokenStore

    state = tmp_path / "state"
    tokens = make_tokens(state, ["site-a", "site-b"])
    with running_server(state, ["--sites", "2", "--min-sites", "1", "--round-timeout", "4", "--rounds", "2",
                                *TINY_SETTINGS]) as server:
        pair, _ = global_pair(server.url, tokens["site-b"])
        assert upload(server.url, tokens["site-a"], 1, fake_update(pair, 1, n=50)).status_code == 200
        TokenStore(state).revoke("site-a")
        # the server's deadline poll (every 0.5 s) sees the revocation
        wait_until(lambda: server.status()["uploaded"] == [], "the revoked site's update no longer counting", 30,
                   server.proc)
        closed = upload(server.url, tokens["site-b"], 1, fake_update(pair, 2, n=10)).json()
        assert closed["round_closed"] is False, "not every expected site has reported: site-a's does not count"
        wait_until(lambda: server.status()["history"], "round 1 closing at its deadline", 30, server.proc,
                   every=0.2)
        [meta] = server.status()["history"]
    assert sorted(meta["sites"]) == ["site-b"] and meta["sites"]["site-b"]["weight"] == 1.0
    assert not (state / "current" / "site-a.safetensors").exists()
    log = server.log.read_text()
    assert "round 1: site-a's update is left out: its token was revoked" in log


def test_a_client_stopped_before_its_upload_is_taken_trains_that_round_again_to_the_same_update(
        sample: Path, tmp_path: Path) -> None:
    """Adam's moments are saved only once the server has taken the update. They used to be saved
    before the upload, so a client (or server) stopped during it trained the round again from moments
    that already held that round's step, and the federation drifted from the uninterrupted one."""
    import shutil

    from federation_helpers import Server
    from fedmix_engine.federation.client import FederationClient, FederationError

    site = tmp_path / "site-a"
    shutil.copytree(sample / "site-a", site, ignore=shutil.ignore_patterns("models"))
    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    args = ["--sites", "1", "--min-sites", "1", "--rounds", "2", *TINY_SETTINGS]
    server = Server(state, args).start()
    torch.set_num_threads(1)  # as the site processes (the autouse fixture restores it)
    try:
        client = FederationClient(server.url, token, site, device="cpu", poll_seconds=0.1, give_up_after=1.0)
        with pytest.raises(FederationError, match="gave up"):
            for event in client.iter_join():
                progress = event.progress
                if progress is not None and progress.stage == "train" and progress.step == progress.total:
                    server.kill()  # round 1 trained; its upload can no longer be taken
        assert not list((site / "models").glob("*-state.pt")), "moments saved for an update never taken"
        server = Server(state, args).start()  # the round is still open, with no upload
        FederationClient(server.url, token, site, device="cpu", poll_seconds=0.1).join()
        assert server.status()["finished"]
    finally:
        server.kill()
    worst = drift_from_the_simulator(state, sample, ["site-a"], 2, tmp_path / "sim")
    assert worst < 1e-5, f"the stopped round trained from other moments: max |Δθ| = {worst}"


def test_a_client_that_dies_after_the_server_took_its_update_resumes_with_that_rounds_moments(
        sample: Path, tmp_path: Path, monkeypatch) -> None:
    """The other side of the window above: the server has taken round 2's update, and the client dies before
    it learns so. Its moments were saved only after the answer, so the restarted client trained round 3 from
    round 1's moments and the federation drifted. They are now kept as pending before the upload, and the
    restarted client commits them because the server says (last_accepted) that round 2's update counted."""
    import shutil

    from federation_helpers import Server
    from fedmix_engine.federation import pending_state
    from fedmix_engine.federation.client import FederationClient

    site = tmp_path / "site-a"
    shutil.copytree(sample / "site-a", site, ignore=shutil.ignore_patterns("models"))
    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    server = Server(state, ["--sites", "1", "--min-sites", "1", "--rounds", "3", *TINY_SETTINGS]).start()
    real_settle = pending_state.settle

    def dies_once_round_2_is_taken(models_dir, prefix, accepted_round):
        if accepted_round == 2:
            raise KeyboardInterrupt("the workstation lost power")
        return real_settle(models_dir, prefix, accepted_round)

    torch.set_num_threads(1)  # as the site processes (the autouse fixture restores it)
    try:
        monkeypatch.setattr(pending_state, "settle", dies_once_round_2_is_taken)
        with pytest.raises(KeyboardInterrupt):
            FederationClient(server.url, token, site, device="cpu", poll_seconds=0.1).join()
        assert server.status()["uploaded"] == [] and server.status()["last_round"] == 2, "round 2 was taken"
        kept = sorted(p.name.split("-state")[-1] for p in (site / "models").glob("federation-*-state*.pt"))
        assert kept == ["-pending-0002.pt", ".pt"], "round 1's moments committed, round 2's still pending"
        monkeypatch.setattr(pending_state, "settle", real_settle)
        FederationClient(server.url, token, site, device="cpu", poll_seconds=0.1).join()
        assert server.status()["finished"]
    finally:
        server.kill()
    assert not list((site / "models").glob("*-state-pending-*.pt"))
    worst = drift_from_the_simulator(state, sample, ["site-a"], 3, tmp_path / "sim")
    assert worst < 1e-5, f"round 3 trained from moments without round 2's step: max |Δθ| = {worst}"


def test_an_upload_whose_answer_is_lost_after_it_closed_the_round_still_advances_the_sites_moments(
        sample: Path, tmp_path: Path) -> None:
    """A proxy drops the answer to a site's upload after the server took it; that upload closed the round.
    The client sends it again and hears 409 (round closed): it dropped the round's moments although its
    update had counted, and the federation drifted. It now asks the server (last_accepted) and keeps them."""
    import shutil

    from federation_helpers import Server
    from fedmix_engine.federation.client import FederationClient

    site = tmp_path / "site-a"
    shutil.copytree(sample / "site-a", site, ignore=shutil.ignore_patterns("models"))
    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    server = Server(state, ["--sites", "1", "--min-sites", "1", "--rounds", "3", *TINY_SETTINGS]).start()
    torch.set_num_threads(1)  # as the site processes (the autouse fixture restores it)
    try:
        client = FederationClient(server.url, token, site, device="cpu", poll_seconds=0.1)
        real_request, lost = client.http.request, []

        def answer_lost_once(method, path, **kwargs):
            response = real_request(method, path, **kwargs)
            if path.endswith("/rounds/2/update") and not lost:
                lost.append(response.status_code)
                raise httpx.ReadError("connection reset by the proxy after the server answered")
            return response

        client.http.request = answer_lost_once
        events = list(client.iter_join())
        assert lost == [200] and server.status()["finished"]
    finally:
        server.kill()
    assert any(e.kind == "waiting" and "round 2 is closed" in e.message for e in events), "the resend heard 409"
    worst = drift_from_the_simulator(state, sample, ["site-a"], 3, tmp_path / "sim")
    assert worst < 1e-5, f"round 3 trained from moments without round 2's step: max |Δθ| = {worst}"


def test_a_site_whose_classes_are_named_or_ordered_otherwise_is_refused_at_joining(tmp_path: Path) -> None:
    """Only the class count was compared: a site labelling cyst as 1 and lesion as 2 would have trained a
    lesion-and-cyst federation's class 1 on cysts, silently. With --class-names the order is the
    federation's; the global models carry the names (for DICOM SEG), and a restart cannot change them."""
    from fedmix_engine.data.site_store import SiteStore

    make_sample(tmp_path / "fed", sites=1, images=4, eval_images=1, seed=0, size=32, classes=2)  # lesion, cyst
    swapped = tmp_path / "swapped"
    with SiteStore.create(swapped, ["cyst", "lesion"]) as store:
        store.add_image(np.zeros((32, 32), np.uint8), image_id="scan")
    state = tmp_path / "state"
    tokens = make_tokens(state, ["site-a", "other"])
    args = ["--sites", "1", "--min-sites", "1", "--rounds", "1", "--class-names", "lesion,cyst", *TINY_SETTINGS]

    def join(site: Path, token: str, url: str, *more: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedmix_engine.cli", "join", "--server", url, "--token", token,
                               "--site", str(site), "--device", "cpu", *more], capture_output=True, text=True,
                              timeout=300, env=ENV)

    with running_server(state, args) as server:
        refused = join(swapped, tokens["other"], server.url)
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "site's classes are cyst, lesion; the federation's are lesion, cyst, in this label order" \
            in refused.stdout
        assert server.status()["uploaded"] == []
        held_out = tmp_path / "fed" / "eval" / "site-a" / "test"
        joined = join(tmp_path / "fed" / "site-a", tokens["site-a"], server.url, "--eval", str(held_out))
        assert joined.returncode == 0, joined.stdout + joined.stderr
    _, model, meta = load_checkpoint(state / "rounds" / "000001" / "global.safetensors")
    assert model.num_classes == 2 and meta["classes"] == ["lesion", "cyst"]
    # the site's held-out scores name each class: their mean would hide a class the model misses
    from fedmix_engine.evaluation import mean_image_dice, score_site, summarise
    from fedmix_engine.predict import Predictor

    rows = score_site(Predictor.from_checkpoint(state / "rounds" / "000001" / "global.safetensors", "cpu"), held_out)
    lesion, cyst = (c.dice_mean for c in summarise(rows))
    assert (f"round 1's global model: Dice {mean_image_dice(rows):.3f} (lesion {lesion:.3f} · cyst {cyst:.3f}) "
            f"on {len(rows) // 2} held-out images (sent to the server)") in joined.stdout, joined.stdout
    saved = (state / "server.json").read_bytes()
    for where, change, message in (
            (state, ["--class-names", "cyst,lesion"], "(--class-names: ('lesion', 'cyst') → ('cyst', 'lesion'))"),
            (tmp_path / "new", ["--class-names", "lesion", "--classes", "2"],
             "--class-names: lesion: give the model's 2 class(es), each once, in label order"),
            (tmp_path / "new", ["--class-names", "lesion,lesion"], "--class-names: lesion, lesion: give")):
        run = subprocess.run([sys.executable, "-m", "fedmix_engine.cli", "serve", "--state", str(where), "--port",
                              str(free_port()), *change], capture_output=True, text=True, timeout=60, env=ENV)
        assert run.returncode == 2 and message in run.stderr, run.stderr
    assert (state / "server.json").read_bytes() == saved and not (tmp_path / "new" / "server.json").exists()


def _state_with_two_rounds(root: Path, now: list[float]):
    """A server state that has closed rounds 1 and 2 (two sites each), scored round 2's model, restarted once
    with more rounds (a settings change) and holds one acknowledged update of the open round 3."""
    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState

    config = ServerConfig(sites=2, min_sites=2, rounds=3, model=ModelConfig(base_width=4))
    state = ServerState(root, config, clock=lambda: now[0])
    for r in (1, 2):
        for k, site in enumerate(SITES[:2]):
            body = root.parent / f"{site}.part"
            body.write_bytes(fake_update(state.global_pair(r - 1), seed=10 * r + k))
            assert state.accept_upload(site, r, body).status == 200
    report = {"images": 2, "dice": 0.5, "classes": {"lesion": {"images": 2, "lesion_images": 1, "dice": 0.5,
                                                                "iou": 0.4}}}
    assert state.accept_evaluation("site-a", 2, report).status == 200
    state = ServerState(root, ServerConfig(**{**config.__dict__, "rounds": 4}), clock=lambda: now[0])
    body = root.parent / "site-a.part"
    body.write_bytes(fake_update(state.global_pair(2), seed=99))
    assert state.accept_upload("site-a", 3, body).status == 200
    return state


@pytest.mark.parametrize("damage", ["rounds/000001/meta.json", "rounds/000002/meta.json", "meta without sites",
                                    "settings-changes.json", "federation-id cut short", "federation-id garbled"])
def test_a_damaged_server_file_is_named_with_what_to_do_by_serve_and_status(tmp_path: Path, capsys,
                                                                         damage: str) -> None:
    """The server writes each of these files whole, so a damaged one is a failing disk or a hand edit.
    A round record (meta.json) or settings-changes.json ended 'serve' and 'status' in a JSONDecodeError
    or KeyError traceback; a meta.json without its sites started a server whose admin page and sites'
    clients would trip over it; a shortened federation id silently started every site's optimiser afresh,
    a garbled one stopped every site with 'the server sent a malformed federation id'. Each is now named,
    with what to do, before the server starts."""
    from fedmix_engine.cli import main
    from fedmix_engine.federation.state import ServerState

    state = tmp_path / "state"
    _state_with_two_rounds(state, [1000.0])
    path, expected = {
        "rounds/000001/meta.json": (state / "rounds/000001/meta.json", "damaged round record (Expecting"),
        "rounds/000002/meta.json": (state / "rounds/000002/meta.json", "damaged round record (Expecting"),
        "meta without sites": (state / "rounds/000002/meta.json", "damaged round record (its sites lack n, loss"),
        "settings-changes.json": (state / "settings-changes.json", "damaged record of changed settings (Unterminated"),
        "federation-id cut short": (state / "federation-id", "damaged federation id (not 32 hex digits)"),
        "federation-id garbled": (state / "federation-id", "damaged federation id (not 32 hex digits)"),
    }[damage]
    good = path.read_text()
    if damage == "meta without sites":
        damaged = json.dumps({**json.loads(good), "sites": {"site-a": {"n": 3}}})
    elif damage.startswith("federation-id"):
        damaged = good[:20] if damage.endswith("short") else good[:10] + "\x00\x00" + good[12:]
    else:
        damaged = good[:len(good) // 2]
    path.write_text(damaged)
    for command in (["status", "--state", str(state)], ["serve", "--state", str(state), "--port", str(free_port())]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: {expected}"), err
        assert "Traceback" not in err
    assert ("rounds/000002 and evaluations/000002 (if there) out of the state directory, and the server runs "
            "round 2 again" in err) == (damage in ("rounds/000002/meta.json", "meta without sites")), \
        "running the round again is offered for the newest round only"
    assert ("restore it from a backup" in err) and path.read_text() == damaged, "nothing rewritten"
    path.write_text(good)
    assert ServerState(state).status()["uploaded"] == ["site-a"], "restored, the state is whole again"


def test_the_newest_round_moved_away_as_its_damaged_record_advises_runs_again(tmp_path: Path) -> None:
    """What the error for a damaged newest meta.json advises works: with rounds/000002 and evaluations/000002
    moved out, the server reopens round 2 from round 1's model and round 2 closes again."""
    import shutil

    from fedmix_engine.federation.state import ServerState

    state = tmp_path / "state"
    now = [1000.0]
    _state_with_two_rounds(state, now)
    (state / "rounds/000002/meta.json").write_text("{")
    with pytest.raises(InputError, match="damaged round record"):
        ServerState(state)
    aside = tmp_path / "aside"
    aside.mkdir()
    shutil.move(state / "rounds/000002", aside / "round")
    shutil.move(state / "evaluations/000002", aside / "evaluations")
    again = ServerState(state, clock=lambda: now[0])
    assert (again.current_round, again.last_round, again.status()["uploaded"]) == (2, 1, [])
    assert [m["round"] for m in again.history()] == [1]
    for k, site in enumerate(SITES[:2]):
        body = tmp_path / f"{site}.part"
        body.write_bytes(fake_update(again.global_pair(1), seed=k))
        assert again.accept_upload(site, 2, body).status == 200
    assert again.last_round == 2 and [m["round"] for m in again.history()] == [1, 2]


@pytest.mark.parametrize("damage", ["not JSON", "no sha256", "weights changed"])
def test_an_acknowledged_update_damaged_on_disk_is_said_and_dropped_so_the_site_sends_it_again(
        tmp_path: Path, caplog, capsys, damage: str) -> None:
    """current/<site>.json, damaged, ended the server's start in a JSONDecodeError traceback; an update whose
    weights no longer match their SHA-256 was dropped without a word. Now either is logged, naming the site
    and the file, and dropped: the site is told it has not uploaded and sends a new update."""
    import logging

    from fedmix_engine.cli import main
    from fedmix_engine.federation.state import ServerState

    state = tmp_path / "state"
    now = [1000.0]
    _state_with_two_rounds(state, now)
    report = state / "current" / "site-a.json"
    if damage == "not JSON":
        report.write_text(report.read_text()[:30])
    elif damage == "no sha256":
        report.write_text(json.dumps({k: v for k, v in json.loads(report.read_text()).items() if k != "sha256"}))
    else:
        weights = state / "current" / "site-a.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    assert main(["status", "--state", str(state)]) == 0
    if damage != "weights changed":  # status reads, it does not hash every upload
        assert "uploaded: site-a" not in capsys.readouterr().out, "a damaged report is not an upload"
    with caplog.at_level(logging.WARNING, logger="fedmix_engine.federation.state"):
        restarted = ServerState(state, clock=lambda: now[0])
    assert restarted.round_info("site-a")["uploaded"] is False and restarted.status()["uploaded"] == []
    assert f"round 3: site-a's acknowledged update is damaged on disk ({report} or its .safetensors); it does " \
           "not count and is removed: the site trains the round again and sends a new one" in caplog.text
    assert not report.exists() and not (state / "current" / "site-a.safetensors").exists()
    body = tmp_path / "again.part"
    body.write_bytes(fake_update(restarted.global_pair(2), seed=7))
    assert restarted.accept_upload("site-a", 3, body).status == 200, "the site's new update is taken"


def _damage_update_file(path: Path, damage: str) -> None:
    """An acknowledged update's file as a failing disk or a hand leaves it."""
    if damage == "removed":
        path.unlink()
    elif damage == "cut":
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    else:  # the last float32 weight's bytes turned into a NaN: still a well-formed safetensors file
        path.write_bytes(path.read_bytes()[:-4] + np.float32("nan").tobytes())


@pytest.mark.parametrize("damage", ["removed", "cut", "NaN over a weight"])
def test_an_update_damaged_on_disk_before_its_round_closes_is_dropped_not_aggregated(
        tmp_path: Path, caplog, damage: str) -> None:
    """A restart dropped an acknowledged update whose file was damaged, but a running server aggregated it:
    a NaN written over one weight went into the committed global model (and every site then refused it), a
    removed file failed every close until a restart, and a cut one failed the close with an error naming the
    upload that triggered it. The close now checks every update against the SHA-256 it was acknowledged
    with and drops a damaged one, as a restart does; the site sends it again and the round closes whole."""
    import logging

    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState

    root = tmp_path / "state"
    state = ServerState(root, ServerConfig(sites=2, min_sites=2, rounds=2, model=ModelConfig(base_width=4)),
                        clock=lambda: 1000.0)
    initial = state.global_pair(0)

    def send(site: str, seed: int) -> object:
        body = tmp_path / f"{site}.part"
        body.write_bytes(fake_update(initial, seed=seed))
        return state.accept_upload(site, 1, body)

    assert send("site-a", 1).status == 200
    weights = root / "current" / "site-a.safetensors"
    _damage_update_file(weights, damage)
    with caplog.at_level(logging.WARNING, logger="fedmix_engine.federation.state"):
        outcome = send("site-b", 2)
    assert (outcome.status, outcome.message, outcome.round_closed) == (200, "accepted for round 1", False)
    assert (state.current_round, state.status()["uploaded"]) == (1, ["site-b"]), "the round waits for site-a"
    assert state.round_info("site-a")["uploaded"] is False and state.round_info("site-b")["uploaded"] is True
    assert "round 1: site-a's acknowledged update is damaged on disk" in caplog.text
    assert not weights.exists() and not (root / "current" / "site-a.json").exists()
    assert state.close_if_due() is False and state.close_failure is None
    assert send("site-a", 3).round_closed, "site-a's new update closes the round"
    model = state.global_pair(1)  # loading refuses NaN
    expected, _ = aggregate([(site, load_bytes(fake_update(initial, seed=seed)), 10, 0.5)
                             for site, seed in (("site-a", 3), ("site-b", 2))], state.rule)
    assert max(float((model[k] - expected[k]).abs().max()) for k in expected) < 1e-6, "the intact updates only"
    assert sorted(state.history()[-1]["sites"]) == ["site-a", "site-b"]


def test_a_due_round_whose_updates_are_damaged_closes_only_with_a_quorum_of_intact_ones(
        tmp_path: Path, caplog) -> None:
    """At the deadline the close counts the intact updates only: with one of two damaged the quorum of two
    is short and the round stays open; a third site's update then makes the quorum and the round closes."""
    import logging

    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState

    now = [1000.0]
    root = tmp_path / "state"
    state = ServerState(root, ServerConfig(sites=3, min_sites=2, rounds=2, round_timeout=60,
                                           model=ModelConfig(base_width=4)), clock=lambda: now[0])
    for k, site in enumerate(["site-a", "site-b"]):
        body = tmp_path / f"{site}.part"
        body.write_bytes(fake_update(state.global_pair(0), seed=k))
        assert state.accept_upload(site, 1, body).status == 200
    _damage_update_file(root / "current" / "site-b.safetensors", "NaN over a weight")
    now[0] += 61
    with caplog.at_level(logging.WARNING, logger="fedmix_engine.federation.state"):
        assert state.close_if_due() is False
    assert "round 1: site-b's acknowledged update is damaged on disk" in caplog.text
    assert (state.current_round, state.status()["uploaded"]) == (1, ["site-a"])
    body = tmp_path / "site-c.part"
    body.write_bytes(fake_update(state.global_pair(0), seed=5))
    assert state.accept_upload("site-c", 1, body).round_closed is False, "two of three: the deadline closes it"
    assert state.close_if_due() is True
    assert state.history()[-1]["reason"] == "deadline passed with 2 of 3 sites"
    assert sorted(state.history()[-1]["sites"]) == ["site-a", "site-c"]


def test_no_deadline_is_stored_as_strict_json_and_read_back_as_no_deadline(tmp_path: Path, capsys) -> None:
    """``--round-timeout inf`` was written to server.json as ``Infinity``, which is not JSON: jq, a browser
    or a monitoring script refused the file. It is null now, and a restart reads it back as no deadline."""
    from fedmix_engine.cli import main
    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState

    def strict(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    config = ServerConfig(sites=1, min_sites=1, round_timeout=float("inf"), model=ModelConfig(base_width=4))
    ServerState(tmp_path / "state", config)
    stored = json.loads((tmp_path / "state" / "server.json").read_text(), parse_constant=strict)
    assert stored["round_timeout"] is None and stored["rounds"] == 10
    again = ServerState(tmp_path / "state", config)
    assert again.config.round_timeout == float("inf") and again.adjusted == []
    assert main(["status", "--state", str(tmp_path / "state")]) == 0
    assert "closes when 1 site has uploaded (no deadline: --round-timeout inf)" in capsys.readouterr().out
    # status --json, for a monitoring script: strict JSON too, with the warnings the text prints
    make_tokens(tmp_path / "state", ["site-a", "site-b"])
    assert main(["status", "--state", str(tmp_path / "state")]) == 0
    text = capsys.readouterr().out
    assert main(["status", "--state", str(tmp_path / "state"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out, parse_constant=strict)
    assert (status["round"], status["deadline_in"], status["uploaded"]) == (1, None, [])
    assert [s["site"] for s in status["not_uploaded"]] == ["site-a", "site-b"]
    (warning,) = status["warnings"]
    assert warning.startswith("2 sites hold tokens (site-a, site-b), but a round closes as soon as 1 has uploaded")
    assert f"warning: {warning}\n" in text
    timed = ServerState(tmp_path / "state", replace(config, round_timeout=600.0))
    assert timed.adjusted == ["round_timeout: inf → 600.0"]
    assert json.loads((tmp_path / "state" / "server.json").read_text(), parse_constant=strict)["round_timeout"] == 600


def test_a_fixed_setting_changed_is_named_by_field_in_the_engine_and_by_option_on_the_command_line(
        tmp_path: Path) -> None:
    """A restart that changed the width read 'model.base_width: 4 → 8', which the admin never typed; the command
    line now names '--width' (tested with serve above). Called as a library, the engine still names the field,
    and the error crosses a process boundary as the message it wrote."""
    import pickle

    from fedmix_engine.errors import SettingsDiffer
    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState

    config = ServerConfig(sites=1, min_sites=1, model=ModelConfig(base_width=4))
    ServerState(tmp_path / "state", config)
    with pytest.raises(SettingsDiffer) as refused:
        ServerState(tmp_path / "state", replace(config, model=ModelConfig(base_width=8), lam=3.0))
    assert refused.value.reason.startswith("these settings are fixed for the life of a federation (lam: 10.0 → 3.0; "
                                           "model.base_width: 4 → 8); ")
    assert refused.value.reason.endswith("(adjustable on a restart: sites, min_sites, round_timeout, rounds, "
                                         "max_upload_mb, keep_models)")
    assert refused.value.describe(str.upper).startswith("these settings are fixed for the life of a federation "
                                                        "(LAM: 10.0 → 3.0; MODEL.BASE_WIDTH: 4 → 8)")
    carried = pickle.loads(pickle.dumps(refused.value))
    assert type(carried) is InputError and str(carried) == str(refused.value)


def test_a_damaged_round_opening_time_restarts_the_rounds_deadline(tmp_path: Path) -> None:
    """current/opened.json holding JSON of another shape (a list, a text time) raised from the server's start;
    it is read as unknown now, and the open round's deadline starts again, as when it could not be written."""
    from fedmix_engine.federation.state import ServerState
    from fedmix_engine.federation.status import read_status

    state = tmp_path / "state"
    now = [1000.0]
    _state_with_two_rounds(state, now)
    opened = state / "current" / "opened.json"
    for damaged in ("[1, 2]", '{"round": 3, "opened_at": "yesterday"}', '{"round": 3, "opened_at": NaN}'):
        opened.write_text(damaged)
        now[0] = 5000.0
        assert read_status(state, now=now[0])["open_for"] is None, damaged
        restarted = ServerState(state, clock=lambda: now[0])
        assert restarted.opened_at == 5000.0, damaged
        assert json.loads(opened.read_text()) == {"round": 3, "opened_at": 5000.0}, "written again, whole"


def test_a_stop_ends_the_join_promptly_while_a_request_hangs_on_a_server_that_does_not_answer(
        sample: Path, tmp_path: Path) -> None:
    """A server that takes the connection but never answers (stopped, hung, or a network that drops the
    packets) held a request for httpx's whole 120 s timeout, and napari's Stop, or napari closing, waited
    for it. A stop now ends the join within a second; the abandoned request ends on its own."""
    from fedmix_engine.federation.client import FederationClient

    copies = copied_sites(sample, ["site-a"], tmp_path)
    state = tmp_path / "state"
    token = make_tokens(state, ["site-a", "site-b"])["site-a"]
    server = Server(state, ["--sites", "2", "--min-sites", "2", "--rounds", "2", *TINY_SETTINGS]).start()
    client = FederationClient(server.url, token, copies["site-a"], device="cpu", poll_seconds=0.2)
    join = JoinThread(client)
    try:
        join.wait_for(lambda: join.waiting(), "site-a's update sent")
        os.kill(server.proc.pid, signal.SIGSTOP)  # it polls /v1/round every 0.2 s: the next poll hangs
        time.sleep(2)
        took = join.end(timeout=10)
        assert not join.thread.is_alive(), "the join still waits on the hung request"
        closing = time.monotonic()
        client.close()  # napari's Train closes it in its worker, before the panel says it stopped
        closed_in = time.monotonic() - closing
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.kill()
    assert took < 1.5, f"the stop took {took:.1f} s"
    assert closed_in < 1, f"closing the client waited {closed_in:.1f} s for the abandoned request"
    lock = copies["site-a"] / "models" / "join.lock"
    from filelock import FileLock
    FileLock(lock).acquire(timeout=0)  # released: napari's next Start is not refused as a second join


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Path]]:
    return make_certificates(tmp_path_factory.mktemp("certs"), {
        "valid": (openssl_date(-86400), openssl_date(20 * 86400)),
        "expired": (openssl_date(-400 * 86400), openssl_date(-35 * 86400)),
        "not-yet-valid": (openssl_date(30 * 86400), openssl_date(400 * 86400)),
        "expiring": (openssl_date(-86400), openssl_date(5 * 86400)),
    })


def test_serve_refuses_an_out_of_date_tls_certificate_and_warns_of_one_expiring_soon(
        tmp_path: Path, capsys, certificates) -> None:
    """An expired certificate (or one not valid yet: a wrong clock) started a server every site refused, each
    site being told to get another --ca-cert. serve now names it and what to do; one expiring within two weeks
    is warned of, since mid-federation no site can connect from that day."""
    from fedmix_engine.cli import main

    _, key, certs = certificates
    state = tmp_path / "state"
    for name, expected in (("expired", r"the certificate expired on \d{4}-\d\d-\d\d \d\d:\d\d UTC; every site "
                                       r"refuses it: renew it"),
                           ("not-yet-valid", r"the certificate is valid only from \d{4}-\d\d-\d\d \d\d:\d\d UTC: "
                                             r"this machine's clock is wrong")):
        # a process, not main(): a server that starts anyway must fail the test, not hang it
        refused = subprocess.run([sys.executable, "-m", "fedmix_engine.cli", "serve", "--state", str(state),
                                  "--sites", "1", "--tls-cert", str(certs[name]), "--tls-key", str(key), "--port",
                                  str(free_port())], capture_output=True, text=True, timeout=60, env=ENV)
        assert refused.returncode == 2, refused.stdout
        assert re.match(rf"error: {re.escape(str(certs[name]))}: {expected}", refused.stderr), name
    assert not state.exists(), "refused before anything was written"
    for name, warned in (("expiring", True), ("valid", False)):
        (tmp_path / "a-file").write_text("")  # the run stops here, after the certificate checks
        assert main(["serve", "--state", str(tmp_path / "a-file"), "--tls-cert", str(certs[name]),
                     "--tls-key", str(key)]) == 2
        err = capsys.readouterr().err
        assert bool(re.search(rf"warning: {re.escape(str(certs[name]))}: the server's TLS certificate expires on "
                              r"\S+ \S+ UTC \(in [45] days\): no site can connect from then", err)) is warned, err


def test_a_site_is_told_the_servers_certificate_is_out_of_date_not_untrusted(tmp_path: Path, sample: Path,
                                                                              certificates) -> None:
    """On first contact an expired certificate (or one not valid yet) was called untrusted, and the site
    was told to give the admin's --ca-cert, which would not help. Said at once, with who must act."""
    from fedmix_engine.errors import FederationError
    from fedmix_engine.federation.client import FederationClient

    ca, key, certs = certificates
    copies = copied_sites(sample, ["site-a"], tmp_path)
    port = free_port()
    for name, expected in (("expired", "the server's TLS certificate (or the CA certificate that signed it) has "
                                       "expired: the server's admin must renew it and restart the server"),
                           ("not-yet-valid", "the server's TLS certificate is not valid yet: this machine's clock "
                                             "is wrong")):
        client = FederationClient(f"https://127.0.0.1:{port}", "t0ken", copies["site-a"], ca_cert=str(ca),
                                  give_up_after=5)
        with tls_listener(port, certs[name], key), pytest.raises(FederationError) as failed:
            list(client.iter_join())
        assert str(failed.value).startswith(expected), failed.value


def test_a_certificate_expiring_during_a_federation_is_retried_while_the_admin_renews_it(
        tmp_path: Path, sample: Path, certificates) -> None:
    """After the server has answered, its certificate expiring is something its admin mends in place (renew,
    restart): the site says why it retries, and goes on once the server presents a valid certificate."""
    from fedmix_engine.federation.client import FederationClient

    ca, key, certs = certificates
    copies = copied_sites(sample, ["site-a"], tmp_path)
    state = tmp_path / "state"
    token = make_tokens(state, ["site-a", "site-b"])["site-a"]
    server = Server(state, ["--sites", "2", "--min-sites", "2", "--rounds", "2", *TINY_SETTINGS],
                    tls=(certs["valid"], key), ca=ca).start()
    join = JoinThread(FederationClient(server.url, token, copies["site-a"], device="cpu", ca_cert=str(ca),
                                       poll_seconds=0.2, max_backoff=0.5))
    told = join.told
    try:
        join.wait_for(lambda: join.waiting(), "site-a's update sent")
        server.kill()
        with tls_listener(server.port, certs["expired"], key):
            join.wait_for(lambda: sum("has expired" in e.message for e in told) >= 2, "retries naming the expired one")
        server.start()
        join.wait_for(lambda: told[-1].kind == "reconnected", "the renewed server")
    finally:
        join.end()
        server.kill()
    expired = next(e for e in told if "has expired" in e.message)
    assert expired.kind == "retrying" and expired.message.startswith(
        "the server's TLS certificate (or the CA certificate that signed it) has expired: the server's admin must "
        "renew it and restart the server"), expired


def test_a_site_too_slow_for_the_round_timeout_is_told_why_its_update_came_too_late(sample: Path,
                                                                                    tmp_path: Path) -> None:
    """A site slower than --round-timeout (a CPU among GPU sites) trains every round and misses every one;
    it was told only that the round was closed and to train again. It now hears how long it took against the
    time the round had left, and what would help."""
    import threading

    from fedmix_engine.federation.client import FederationClient

    copies = copied_sites(sample, ["site-a"], tmp_path)
    state = tmp_path / "state"
    tokens = make_tokens(state, ["site-a", "site-b"])
    server = Server(state, ["--sites", "2", "--min-sites", "1", "--round-timeout", "4", "--rounds", "3",
                            *TINY_SETTINGS]).start()
    events, slowed = [], threading.Event()

    def slow_training() -> bool:  # asked between training steps: here, one step takes longer than the round
        if not slowed.is_set() and any(e.kind == "training" for e in events):
            slowed.set()
            time.sleep(6)
        return any(e.kind == "waiting" for e in events)

    try:
        pair, _ = global_pair(server.url, tokens["site-b"])
        assert upload(server.url, tokens["site-b"], 1, fake_update(pair, seed=1)).status_code == 200  # a quorum
        client = FederationClient(server.url, tokens["site-a"], copies["site-a"], device="cpu", poll_seconds=0.2)
        for event in client.iter_join(slow_training):
            events.append(event)
    finally:
        server.kill()
    (late,) = [e.message for e in events if e.kind == "waiting"]
    assert re.fullmatch(r"round 1: round 1 is closed \(the server is at round 2\); download the new global model "
                        r"and train again \(this site took \d+ s; the round had [0-4] s left when it began: if this "
                        r"repeats, ask the server's admin for a longer --round-timeout, or train this site on a GPU "
                        r"\(--device cuda; napari: device\)\)", late), late


def test_a_late_update_is_explained_only_when_the_site_was_slower_than_the_time_left() -> None:
    from fedmix_engine.federation.client import _too_late

    assert _too_late(None, 50.0) == "" and _too_late(60.0, 50.0) == "", "no deadline known, or in time: nothing"
    assert _too_late(30.0, 50.0).startswith(" (this site took 50 s; the round had 30 s left when it began")
    assert _too_late(-5.0, 50.0).startswith(" (the round was past its deadline when this site began, open only "
                                            "until enough sites reported; this site took 50 s")


def test_a_second_server_on_the_same_state_directory_is_refused_before_it_touches_anything(tmp_path: Path) -> None:
    """A second 'serve' on a state directory in use (a forgotten terminal beside the service) started: it
    recovers the state as its own before binding its port (what the first is writing looks like a crash's
    leftovers), then both take uploads and close the same rounds. It is refused now, and changes nothing;
    once the first server is gone (even SIGKILLed) the state directory can be served again."""
    state = tmp_path / "state"
    tokens = make_tokens(state, ["site-a", "site-b"])
    with running_server(state, ["--sites", "2", "--min-sites", "2", "--rounds", "2", *TINY_SETTINGS]) as server:
        pair, _ = global_pair(server.url, tokens["site-a"])
        assert upload(server.url, tokens["site-a"], 1, fake_update(pair, seed=1)).status_code == 200
        before = {p.relative_to(state): p.read_bytes() for p in state.rglob("*") if p.is_file()}
        try:  # a process with a timeout: a second server that starts must fail the test, not hang it
            second = subprocess.run([sys.executable, "-m", "fedmix_engine.cli", "serve", "--state", str(state),
                                     "--port", str(free_port())], capture_output=True, text=True, timeout=60, env=ENV)
        except subprocess.TimeoutExpired:
            pytest.fail("a second server started on the same state directory")
        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stderr.startswith(f"error: {state}: another server is running on this state directory (it "
                                         "holds the directory's lock); stop it first"), second.stderr
        after = {p.relative_to(state): p.read_bytes() for p in state.rglob("*") if p.is_file()}
        assert after == before, "the second server changed nothing"
        import logging

        from fedmix_engine.cli import main

        handlers = list(logging.getLogger("fedmix_engine.federation").handlers)
        assert main(["serve", "--state", str(state), "--port", str(free_port())]) == 2  # refused in this process:
        assert logging.getLogger("fedmix_engine.federation").handlers == handlers, "its log handler not left behind"
        assert server.status()["uploaded"] == ["site-a"]
        server.kill()  # SIGKILL: the OS releases the lock
        server.start()
        assert server.status()["uploaded"] == ["site-a"], "served again after the kill, the upload kept"


def test_serve_names_a_port_in_use_or_an_address_not_of_this_machine_before_anything_starts(tmp_path: Path,
                                                                                           capsys) -> None:
    """A port in use ended in uvicorn's 'address already in use', exit 3, after the server had announced
    'FedMix server: http://…' and made the new state directory. Each is named now, exit 2, nothing made."""
    from fedmix_engine.cli import main

    state = tmp_path / "state"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--state", str(state), "--sites", "1", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: --port: {port} is in use on 127.0.0.1 by another program (another server?): "
                          "stop it, or choose another --port"), err
    assert "FedMix server" not in out and not state.exists()
    assert main(["serve", "--state", str(state), "--sites", "1", "--host", "192.0.2.1", "--port", "8765"]) == 2
    assert capsys.readouterr().err.startswith("error: --host: 192.0.2.1 is not an address of this machine")
    assert main(["serve", "--state", str(state), "--sites", "1", "--host", "no-such-host.invalid"]) == 2
    assert capsys.readouterr().err.startswith("error: --host: 'no-such-host.invalid' does not resolve")
    assert not state.exists()


def test_the_test_server_moves_to_another_port_when_its_port_is_taken_before_it_binds(tmp_path: Path) -> None:
    """free_port()'s port is free when chosen, not a second later when the server binds it: another test's
    connection may take it meanwhile. The harness's first start moves on (the server refused the port at
    once); a start again after a kill keeps its port, as the sites know it."""
    state = tmp_path / "state"
    server = Server(state, ["--sites", "1", "--rounds", "1", *TINY_SETTINGS])
    first_port, first_log = server.port, server.log
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first_port))
        taken.listen()
        try:
            server.start()
            assert server.port != first_port and server.status()["round"] == 1
            assert f"--port: {first_port} is in use on 127.0.0.1" in first_log.read_text()
            server.kill()
            kept = server.port
            with socket.socket() as second:
                second.bind(("127.0.0.1", kept))
                second.listen()
                with pytest.raises(AssertionError, match=r"the server answering /v1/status: .* ended first") as e:
                    server.start(timeout=30)
            assert server.port == kept and f"--port: {kept} is in use" in str(e.value)
        finally:
            server.kill()


def test_a_running_server_warns_its_admin_of_a_certificate_nearing_expiry(tmp_path: Path, certificates) -> None:
    """A warning at start is missed in a federation that runs for months: the admin page and the status
    say it while the certificate expires within two weeks, and the log says it once a day."""
    ca, key, certs = certificates
    for name, warned in (("expiring", True), ("valid", False)):
        state = tmp_path / name
        with running_server(state, ["--sites", "1", "--rounds", "1", *TINY_SETTINGS], tls=(certs[name], key),
                            ca=ca) as server:
            verify = ssl.create_default_context(cafile=str(ca))
            page = html.unescape(httpx.get(f"{server.url}/", verify=verify, timeout=10).text)
            expires = server.status()["tls_expires_at"]
            log_file = server.log
            deadline = time.monotonic() + (30 if warned else 1.5)  # the deadline watcher's first polls (0.5 s apart)
            while time.monotonic() < deadline and "WARNING the server's TLS" not in log_file.read_text():
                time.sleep(0.1)
        assert ("<b>Renew the TLS certificate</b>: the server's TLS certificate expires on" in page) is warned, name
        assert expires == pytest.approx(time.time() + (5 if warned else 20) * 86400, abs=86400)
        log = log_file.read_text()
        assert log.count("WARNING the server's TLS certificate expires on") == warned, log[-2000:]


def test_the_address_serve_prints_for_the_sites_is_a_url_for_ipv6_too(tmp_path: Path) -> None:
    """'serve --host ::' printed http://:::8765/, which no site can join; IPv6 addresses go in brackets.
    On every interface (0.0.0.0, ::) it printed http://0.0.0.0:8765/, which reaches no server from another
    machine: the machine's name now, or with TLS the name the certificate is for (the one the sites must use)."""
    import httpx

    from fedmix_engine.federation.client import server_url
    from fedmix_engine.federation.server import address_for_sites, machine_name, server_address

    assert server_address("http", "::1", 8765) == "http://[::1]:8765/"
    assert server_address("https", "fedmix.example.org", 443) == "https://fedmix.example.org:443/"
    assert httpx.URL(server_url(server_address("http", "fe80::1", 9))).port == 9
    assert address_for_sites("http", "10.1.2.3", 8765) == "http://10.1.2.3:8765/"
    for every in ("0.0.0.0", "::"):
        assert address_for_sites("http", every, 8765) == f"http://{machine_name()}:8765/"
    assert machine_name() not in ("", "localhost", "0.0.0.0")
    cert = tmp_path / "server.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "k.pem"),
                    "-out", str(cert), "-days", "2", "-subj", "/CN=fedmix", "-addext",
                    "subjectAltName=DNS:*.example.org,IP:10.0.0.5,DNS:fedmix.example.org"],
                   check=True, capture_output=True)
    assert address_for_sites("https", "0.0.0.0", 8765, cert) == "https://fedmix.example.org:8765/"
    assert address_for_sites("https", "10.0.0.5", 8765, cert) == "https://10.0.0.5:8765/", "as given"
