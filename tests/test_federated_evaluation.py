"""Federated evaluation: sites score every global model on held-out images, the server pools the scores."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from federation_helpers import (
    ENV,
    TINY_SETTINGS,
    make_tokens,
    one_torch_thread,
    running_server,
    serving_in_process,
    simulate_like_the_sites,
    tiny_server_app,
)
from fedmix_engine.checkpoint import load_checkpoint
from fedmix_engine.data.site_store import SiteStore
from fedmix_engine.data.synthetic import make_sample
from fedmix_engine.errors import InputError
from fedmix_engine.evaluation import NO_FULL_TRUTH, mean_image_dice, score_site, summarise
from fedmix_engine.federation.admin import render_admin_page
from fedmix_engine.federation.client import FederationClient
from fedmix_engine.federation.federated_evaluation import EvaluationReport, pooled
from fedmix_engine.predict import Predictor

SITES = ["site-a", "site-b"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fedeval") / "sample"
    make_sample(out, sites=2, images=8, eval_images=3, seed=0, size=32)
    return out


def test_sites_score_every_global_model_on_held_out_images_and_the_server_pools_them(
        sample: Path, tmp_path: Path, capsys) -> None:
    """Sites sent only n and ℓ: nobody learnt how good a global model was except by copying it to labelled
    images by hand. With --eval each site scores every model it receives (round 0's to the final one), the
    server pools the figures per round, keeps them over a SIGKILL, and training is unchanged by it."""
    sites = {}
    for name in SITES:  # copies: the clients write models/ into their site
        sites[name] = tmp_path / name
        shutil.copytree(sample / name, sites[name])
    held_out = {name: sample / "eval" / name / "test" for name in SITES}
    state = tmp_path / "state"
    tokens = make_tokens(state, SITES)
    args = ["--sites", "2", "--min-sites", "2", "--rounds", "2", "--class-names", "lesion", *TINY_SETTINGS]
    with running_server(state, args) as server:
        other = subprocess.Popen([sys.executable, "-m", "fedmix_engine.cli", "join", "--server", server.url,
                                  "--token", tokens["site-b"], "--site", str(sites["site-b"]), "--device", "cpu",
                                  "--poll", "0.2", "--eval", str(held_out["site-b"])],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
        client = FederationClient(server.url, tokens["site-a"], sites["site-a"], device="cpu", poll_seconds=0.2,
                                  held_out=held_out["site-a"])
        with one_torch_thread():  # as the join process beside it
            events = list(client.iter_join())
        output = other.communicate(timeout=300)[0].decode()
        assert other.returncode == 0, output
        status = server.status()
        page = httpx.get(server.url + "/").text
        server.kill()
        server.start()
        assert server.status()["evaluations"] == status["evaluations"], "scores lost with a SIGKILL"

    scored = [e for e in events if e.kind == "evaluated"]
    assert [e.round for e in scored] == [0, 1, 2], "round 0's model, each round's and the final one, once each"
    assert all("(sent to the server)" in e.message for e in scored)
    kinds = [e.kind for e in events]
    uploaded = kinds.index("uploaded")  # a model is scored after the site's upload, while the others finish
    assert kinds[uploaded + 1] == "evaluating" and kinds.index("evaluated") > uploaded, kinds
    assert "round 2's global model: Dice " in output and "on 3 held-out images (sent to the server)" in output
    assert "scoring held-out image" not in output, "the command line prints results, not every image"

    evaluations = status["evaluations"]
    assert [e["round"] for e in evaluations] == [0, 1, 2]
    for evaluation in evaluations:
        assert sorted(evaluation["sites"]) == SITES and evaluation["images"] == 6
        by_hand = sum(s["dice"] * s["images"] for s in evaluation["sites"].values()) / 6
        assert evaluation["dice"] == pytest.approx(by_hand, abs=1e-12)
        assert evaluation["classes"]["lesion"] == pytest.approx(
            sum(s["classes"]["lesion"]["dice"] * 3 for s in evaluation["sites"].values()) / 6, abs=1e-12)
    # each site's figure is what `evaluate` says of that round's model on its images (round 1's is scored
    # after the site trained from it: training must not have touched the pair it scores)
    for r in (1, 2):
        for name in SITES:
            rows = score_site(Predictor.from_checkpoint(state / "rounds" / f"{r:06d}" / "global.safetensors", "cpu"),
                              held_out[name])
            sent = evaluations[r]["sites"][name]
            assert sent["dice"] == pytest.approx(mean_image_dice(rows), abs=1e-9)
            assert sent["classes"]["lesion"]["iou"] == pytest.approx(summarise(rows)[0].iou_mean, abs=1e-9)
            assert sent["classes"]["lesion"]["lesion_images"] == summarise(rows)[0].lesion_images
    assert json.loads((state / "evaluations" / "000002" / "site-a.json").read_text()) == evaluations[2]["sites"][
        "site-a"]
    assert f"Held-out Dice of round 2's global model: <b>{evaluations[2]['dice']:.3f}</b> over 6 images" in page
    assert "held-out Dice of each round" in page
    # what the sites train, for the admin to check: on the page, at the server's start and in status
    trained = ("network unet, width 4, 1 class, 1 channel; sites train at 32 px (crops 32, batch 4, 1 local epoch a "
               "round, lr 0.001)")
    assert f"<p>Model: {trained}.</p>" in page
    assert f"\nmodel: {trained}\n" in server.log.read_text()

    _status_reads_what_the_server_says(state, status, capsys)

    served, _, _ = load_checkpoint(state / "rounds" / "000002" / "global.safetensors")
    simulated = simulate_like_the_sites(sample, SITES, 2, tmp_path / "sim")
    worst = max(float((served[k] - simulated[k]).abs().max()) for k in served)
    assert worst < 1e-5, f"scoring changed what the sites trained: max |Δθ| = {worst}"


def _status_reads_what_the_server_says(state: Path, served: dict, capsys) -> None:
    """``fedmix-engine status`` reads the state directory (the server may be running) and writes nothing."""
    from fedmix_engine.cli import main
    from fedmix_engine.federation.status import read_status

    before = sorted((p, p.stat().st_mtime_ns) for p in state.rglob("*"))
    status = read_status(state)
    for key in ("last_round", "rounds", "finished", "uploaded", "history", "evaluations", "settings_changes",
                "method", "lam", "beta", "sites_expected", "min_sites"):
        assert status[key] == served[key], key
    capsys.readouterr()
    assert main(["status", "--state", str(state)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("federation ") and "fedmix (λ=10, β=1.5), classes lesion; 2 sites expected" in lines[0]
    assert lines[1] == ("model: network unet, width 4, 1 class, 1 channel; sites train at 32 px (crops 32, batch 4, "
                        "1 local epoch a round, lr 0.001)")
    assert lines[2] == "rounds: 2 of 2 done; finished"
    final = served["evaluations"][2]
    assert lines[3].startswith(f"round 0 (initial model): held-out Dice {served['evaluations'][0]['dice']:.3f} over 6")
    assert lines[5].startswith("round 2: site-a w=") and lines[5].endswith(
        f"held-out Dice {final['dice']:.3f} over 6 images (site-a {final['sites']['site-a']['dice']:.3f}, "
        f"site-b {final['sites']['site-b']['dice']:.3f}) (closed: every expected site reported)")
    assert sorted((p, p.stat().st_mtime_ns) for p in state.rglob("*")) == before, "status wrote to the state"
    assert main(["status", "--state", str(state / "rounds")]) == 2
    assert "not a server state directory" in capsys.readouterr().err


def test_the_server_refuses_a_bad_evaluation_naming_the_field_and_keeps_what_it_had(tmp_path: Path) -> None:
    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    good = {"images": 4, "dice": 0.5, "classes": {"lesion": {"images": 4, "lesion_images": 2, "dice": 0.5,
                                                             "iou": 0.4}}}
    args = ["--sites", "1", "--min-sites", "1", "--rounds", "1", "--class-names", "lesion", *TINY_SETTINGS]
    with running_server(state, args) as server:
        def post(body, round_number: int = 0, **kwargs) -> httpx.Response:
            return httpx.post(f"{server.url}/v1/rounds/{round_number}/evaluation", timeout=30,
                              headers={"Authorization": f"Bearer {kwargs.pop('token', token)}"},
                              **({"content": body} if isinstance(body, bytes) else {"json": body}), **kwargs)

        assert post(good).status_code == 200
        nan = {**good, "classes": {"lesion": {**good["classes"]["lesion"], "dice": float("nan")}}}
        refused = {
            "NaN": (post(json.dumps(nan).encode()), 422,
                    "evaluation.classes.lesion.dice: must be a number from 0 to 1"),
            "other class": (post({**good, "classes": {"cyst": good["classes"]["lesion"]}}), 422,
                            "evaluation.classes: names cyst; the federation's classes are lesion"),
            "counts": (post({**good, "images": 5}), 422, "evaluation.classes.lesion: counts 4 images"),
            "no model yet": (post(good, round_number=1), 409, "round 1 has no global model to evaluate"),
            "not JSON": (post(b"{truncated"), 400, "not JSON"),
            "nested deep": (post(b"[" * 20_000 + b"]" * 20_000), 400, "not JSON"),  # was a RecursionError: 500
            "too large": (post(b" " * (65 * 1024)), 413, "at most 64 KiB"),
            "wrong token": (post(good, token="nope"), 401, "unknown or revoked token"),
        }
        for case, (response, code, message) in refused.items():
            assert response.status_code == code and message in response.json()["detail"], (case, response.text)
        evaluations = server.status()["evaluations"]
    assert evaluations == [{"round": 0, "images": 4, "dice": 0.5, "classes": {"lesion": 0.5},
                            "sites": {"site-a": good}}], "a refused report changed what was recorded"


def test_a_held_out_folder_must_have_full_truth_and_not_be_the_training_site(sample: Path, tmp_path: Path,
                                                                              capsys) -> None:
    from fedmix_engine.cli import main

    unlabelled = tmp_path / "unlabelled"
    with SiteStore.create(unlabelled, ["lesion"]) as store:
        store.add_image(np.zeros((32, 32), np.uint8), image_id="scan")
    for held_out, message in ((sample / "site-a", "is the site this client trains on"),
                              (unlabelled, NO_FULL_TRUTH), (tmp_path / "missing", "missing")):
        with pytest.raises(InputError, match=re.escape(message)):
            FederationClient("http://127.0.0.1:9", "token", sample / "site-a", held_out=held_out)
    assert main(["join", "--server", "http://127.0.0.1:9", "--token-file", str(_token(tmp_path)), "--site",
                 str(sample / "site-a"), "--eval", str(unlabelled)]) == 2
    assert f"{unlabelled}: {NO_FULL_TRUTH}" in capsys.readouterr().err
    # another folder holding copies of training images (the same scans imported twice) flattered the model too
    import shutil

    held_out = shutil.copytree(sample / "eval" / "site-a" / "test", tmp_path / "held-out")
    with SiteStore.open(sample / "site-a", readonly=True) as site, SiteStore.open(held_out) as store:
        trained = site.image_ids()[3]
        store.add_image(site.read_image(trained), image_id="scan-copy")
        store.set_mask("scan-copy", np.pad(np.ones((8, 8), np.uint8), 12))  # full truth: it would be scored
    with pytest.raises(InputError, match=re.escape(f"{held_out}: 1 of its images is also in the training site "
                                                   f"(scan-copy = {trained}): the model would be scored "
                                                   "on images it trained on")):
        FederationClient("http://127.0.0.1:9", "token", sample / "site-a", held_out=held_out)


def test_pooled_weights_each_site_by_the_images_it_scored() -> None:
    def report(images: int, dice: float) -> EvaluationReport:
        return EvaluationReport.from_dict({"images": images, "dice": dice, "classes": {
            "lesion": {"images": images, "lesion_images": 0, "dice": dice, "iou": dice}}})

    figures = pooled({"big": report(30, 0.9), "small": report(10, 0.5)})
    assert figures["images"] == 40 and figures["dice"] == pytest.approx(0.8) and \
        figures["classes"]["lesion"] == pytest.approx(0.8)
    assert pooled({}) == {"images": 0, "dice": None, "classes": {}}
    assert "Held-out" not in render_admin_page({
        "history": [], "finished": False, "round": 1, "uploaded": [], "last_round": 0, "rounds": 2, "method": "fedmix",
        "lam": 10, "beta": 1.5, "sites_expected": 1, "min_sites": 1}), "no chart without evaluations"


def _token(folder: Path) -> Path:
    path = folder / "token"
    path.write_text("t0ken\n")
    path.chmod(0o600)
    return path


def test_a_hand_edited_evaluation_file_stops_the_server_naming_it(tmp_path: Path) -> None:
    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState
    from fedmix_engine.model import ModelConfig

    state = ServerState(tmp_path / "state", ServerConfig(model=ModelConfig(base_width=4)))
    report = {"images": 2, "dice": 0.25, "classes": {"lesion": {"images": 2, "lesion_images": 1, "dice": 0.25,
                                                                "iou": 0.2}}}
    assert state.accept_evaluation("site-a", 0, report).status == 200
    assert ServerState(tmp_path / "state").evaluations()[0]["sites"] == {"site-a": report}, "kept over a restart"
    saved = tmp_path / "state" / "evaluations" / "000000" / "site-a.json"
    saved.write_text(json.dumps({**report, "dice": 7}))
    with pytest.raises(InputError, match=re.escape(f"{saved}: not an evaluation report (evaluation.dice: must be")):
        ServerState(tmp_path / "state")


def test_a_server_from_before_federated_evaluation_is_told_apart_and_training_goes_on(sample: Path,
                                                                                      tmp_path: Path) -> None:
    """Against a server without the evaluation route (404) the client says the scores were not sent and
    takes part as before."""
    state_dir = tmp_path / "state"
    token = make_tokens(state_dir, ["site-a"])["site-a"]
    app = tiny_server_app(state_dir, sites=1)
    app.router.routes = [r for r in app.router.routes if not getattr(r, "path", "").endswith("/evaluation")]
    site = tmp_path / "site-a"
    shutil.copytree(sample / "site-a", site)
    with serving_in_process(app) as url:
        client = FederationClient(url, token, site, device="cpu", poll_seconds=0.1,
                                  held_out=sample / "eval" / "site-a" / "test")
        events = list(client.iter_join())
    scored = [e for e in events if e.kind == "evaluated"]
    assert [e.round for e in scored] == [0, 1]
    assert all(e.message.endswith("(not sent: the server predates federated evaluation)") for e in scored)
    assert events[-1].kind == "finished" and [e.kind for e in events].count("uploaded") == 1
    assert not (state_dir / "evaluations").exists()


def test_a_federation_without_class_names_pools_its_sites_classes_by_label_index(tmp_path: Path) -> None:
    """Without --class-names only the class count is fixed: site-b may call label 1 'tumour' where site-a
    says 'lesion'. Pooling looked the first site's name up in the second's report and the status failed."""
    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState
    from fedmix_engine.model import ModelConfig

    state = ServerState(tmp_path / "state", ServerConfig(model=ModelConfig(base_width=4)))

    def report(label: str, images: int, dice: float) -> dict:
        return {"images": images, "dice": dice, "classes": {label: {"images": images, "lesion_images": 0,
                                                                    "dice": dice, "iou": dice}}}

    assert state.accept_evaluation("site-b", 0, report("tumour", 1, 0.2)).status == 200
    assert state.accept_evaluation("site-a", 0, report("lesion", 3, 0.6)).status == 200
    two = {**report("lesion", 3, 0.6), "classes": {**report("lesion", 3, 0.6)["classes"],
                                                  **report("cyst", 3, 0.6)["classes"]}}
    refused = state.accept_evaluation("site-a", 0, two)
    assert refused.status == 422 and "evaluation.classes: scores 2 class(es); the federation's model has 1" \
        in refused.message
    evaluation, = state.status()["evaluations"]
    assert evaluation["images"] == 4 and evaluation["dice"] == pytest.approx(0.5)
    assert evaluation["classes"] == {"lesion": pytest.approx(0.5)}


def test_status_of_a_two_class_federation_gives_each_class_pooled_held_out_dice(tmp_path: Path, capsys) -> None:
    """The server pooled each class's held-out Dice, but ``status`` printed only their mean: a federation
    whose model found every lesion and no cyst read as half good."""
    from fedmix_engine.cli import main
    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState
    from fedmix_engine.model import ModelConfig

    state = ServerState(tmp_path / "state", ServerConfig(model=ModelConfig(base_width=4, num_classes=2),
                                                         class_names=("lesion", "cyst")))

    def report(images: int, lesion: float, cyst: float) -> dict:
        return {"images": images, "dice": (lesion + cyst) / 2, "classes": {
            name: {"images": images, "lesion_images": 1, "dice": dice, "iou": dice}
            for name, dice in (("lesion", lesion), ("cyst", cyst))}}

    recorded = state.accept_evaluation("site-a", 0, report(3, 0.9, 0.1))
    assert recorded.status == 200 and recorded.message == ("evaluation of round 0's model recorded: Dice 0.500 "
                                                           "(lesion 0.900 · cyst 0.100) on 3 images"), recorded.message
    assert state.accept_evaluation("site-b", 0, report(1, 0.5, 0.5)).status == 200
    assert main(["status", "--state", str(tmp_path / "state")]) == 0
    out = capsys.readouterr().out
    # pooled over 4 images: lesion (3·0.9 + 0.5)/4 = 0.8, cyst (3·0.1 + 0.5)/4 = 0.2
    assert ("round 0 (initial model): held-out Dice 0.500 over 4 images (site-a 0.500, site-b 0.500; "
            "lesion 0.800 · cyst 0.200)") in out, out


def test_status_of_an_open_round_names_the_sites_that_uploaded_and_reads_a_stopped_server(tmp_path: Path,
                                                                                           capsys) -> None:
    from federation_helpers import fake_update
    from fedmix_engine.cli import main
    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState
    from fedmix_engine.federation.status import read_status
    from fedmix_engine.model import ModelConfig

    state = ServerState(tmp_path / "state", ServerConfig(sites=2, min_sites=2, model=ModelConfig(base_width=4)))
    body = tmp_path / "update.safetensors"
    body.write_bytes(fake_update(state.global_pair(0), seed=1))
    assert state.accept_upload("site-b", 1, body).status == 200
    status = read_status(tmp_path / "state")
    assert status["round"] == 1 and status["uploaded"] == ["site-b"] == state.status()["uploaded"]
    assert status["history"] == [] and status["evaluations"] == []
    assert main(["status", "--state", str(tmp_path / "state")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^rounds: 0 of 10 done; round 1 open for \d+ s, uploaded: site-b$", out, re.M), out


def test_status_of_an_open_round_says_which_sites_it_waits_for_and_when_its_deadline_falls(tmp_path: Path,
                                                                                           capsys) -> None:
    """An admin whose round does not close asks who is missing: the sites with a token that have not uploaded
    (each with the last round it took part in; a revoked one is not waited for), how long the round has been
    open and when its deadline falls; the same from /v1/status, `status` and the admin page."""
    import time

    from federation_helpers import fake_update
    from fedmix_engine.cli import main
    from fedmix_engine.cli_federation import _waiting
    from fedmix_engine.federation.admin import render_admin_page
    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState
    from fedmix_engine.federation.status import read_status
    from fedmix_engine.federation.tokens import TokenStore
    from fedmix_engine.model import ModelConfig

    root = tmp_path / "state"
    now = [time.time() - 1000.0]
    state = ServerState(root, ServerConfig(sites=2, min_sites=2, round_timeout=600.0,
                                           model=ModelConfig(base_width=4)), clock=lambda: now[0])
    tokens = TokenStore(root)
    for site in ("site-a", "site-b", "site-c", "site-d"):
        tokens.add(site)
    tokens.revoke("site-c")
    body = tmp_path / "update.safetensors"
    for site, seed in (("site-a", 1), ("site-b", 2)):  # round 1: both expected sites, the second 875 s later
        body.write_bytes(fake_update(state.global_pair(0), seed=seed))
        assert state.accept_upload(site, 1, body).status == 200
        now[0] += 875.0 if site == "site-a" else 0.0
    body.write_bytes(fake_update(state.global_pair(1), seed=3))
    assert state.accept_upload("site-b", 2, body).status == 200
    now[0] += 125.0
    served = state.status()
    assert (served["round"], served["uploaded"], served["open_for"], served["deadline_in"]) == (2, ["site-b"], 125.0,
                                                                                                475.0)
    assert served["not_uploaded"] == [{"site": "site-a", "last_round": 1}, {"site": "site-d", "last_round": None}]
    read = read_status(root, now=now[0])
    for key in ("open_for", "deadline_in", "not_uploaded", "uploaded"):
        assert read[key] == served[key], key
    assert main(["status", "--state", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "rounds: 1 of 10 done; round 2 open for 2 min, uploaded: site-b" in lines, lines
    assert ("no upload yet from: site-a (last in round 1), site-d (in no round yet); closes when 2 sites have "
            "uploaded, or at the deadline (in 8 min) with at least 2") in lines, lines
    assert _waiting(read_status(root, now=now[0] + 600.0)).endswith(
        "; the deadline passed 2 min ago: it closes as soon as 2 have uploaded")
    assert _waiting(read_status(root, now=now[0] + 600.0) | {"min_sites": 1}).endswith(
        "it closes as soon as 1 has uploaded")
    # --round-timeout inf (wait for every site) and very long ones read as such, not as "in inf h"
    assert _waiting(read | {"deadline_in": float("inf")}).endswith(
        "; closes when 2 sites have uploaded (no deadline: --round-timeout inf)")
    assert "at the deadline (in 11,574,074 days) with at least 2" in _waiting(read | {"deadline_in": 1e12})
    assert "at the deadline (in 50.0 h) with at least 2" in _waiting(read | {"deadline_in": 50 * 3600.0})
    assert "not yet: site-a (last in round 1), site-d (in no round yet)" in render_admin_page(served)
    finished = read_status(root, now=now[0]) | {"finished": True}
    assert "not yet" not in render_admin_page(finished)


def test_a_held_out_folder_that_disappears_mid_federation_is_reported_and_training_goes_on(
        sample: Path, tmp_path: Path) -> None:
    """A held-out folder on a share that goes away after round 0's model was scored: the client crashed in
    the middle of the federation; now each later model is reported as not scored and the site trains on."""
    site, held_out = tmp_path / "site-a", tmp_path / "held-out"
    shutil.copytree(sample / "site-a", site)
    shutil.copytree(sample / "eval" / "site-a" / "test", held_out)
    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    with running_server(state, ["--sites", "1", "--min-sites", "1", "--rounds", "2", *TINY_SETTINGS]) as server:
        client = FederationClient(server.url, token, site, device="cpu", poll_seconds=0.1, held_out=held_out)
        events = []
        for event in client.iter_join():
            events.append(event)
            if event.kind == "evaluated" and event.round == 0:
                shutil.rmtree(held_out)
        evaluations = server.status()["evaluations"]
    scored = [e for e in events if e.kind == "evaluated"]
    assert [e.round for e in scored] == [0, 1, 2]
    assert "(sent to the server)" in scored[0].message
    for event in scored[1:]:
        assert "not scored (" in event.message and str(held_out) in event.message, event.message
        assert event.message.endswith("; training goes on") and event.report is None
    assert [e.kind for e in events].count("uploaded") == 2 and events[-1].kind == "finished"
    assert [e["round"] for e in evaluations] == [0]


def test_status_of_a_one_site_federation_counts_one_site(tmp_path: Path, capsys) -> None:
    """A single hospital trying the server first: "1 site expected", not "1 sites"."""
    from fedmix_engine.cli import main
    from fedmix_engine.federation.admin import render_admin_page
    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState
    from fedmix_engine.model import ModelConfig

    state = ServerState(tmp_path / "state", ServerConfig(sites=1, min_sites=1, model=ModelConfig(base_width=4)))
    assert main(["status", "--state", str(tmp_path / "state")]) == 0
    out = capsys.readouterr().out
    assert "; 1 site expected, quorum 1" in out and "closes when 1 site has uploaded" in out, out
    assert "1 site expected, quorum 1." in render_admin_page(state.status())
