"""FedMix on Flower: the strategy on mock replies (as Flower tests its own strategies), the ClientApp
handler on a real SiteStore, and a real deployment on loopback (SuperLink + 3 SuperNodes + ``flwr run``).

Runs in the Flower environment (``make test`` creates ``.venv-flower``; flwr pins its own FastAPI and
uvicorn, so it is kept out of the napari environment). Marked ``flower``; the main run deselects it.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from federation_helpers import ENV, free_port, simulate_like_the_sites
from fedmix_engine.checkpoint import load_checkpoint, save_checkpoint
from fedmix_engine.data.synthetic import make_sample
from fedmix_engine.errors import InputError
from fedmix_engine.evaluation import mean_image_dice, score_site
from fedmix_engine.federation.flower.app import clientapp, deliver_final_model, site_train
from fedmix_engine.federation.flower.app_dir import write_flower_app
from fedmix_engine.federation.flower.records import pair_to_arrays, report_to_metrics
from fedmix_engine.federation.flower.settings import FlowerRunSettings
from fedmix_engine.federation.flower.strategy import FedMixStrategy
from fedmix_engine.federation.server_config import ServerConfig
from fedmix_engine.federation.wire import LazyUpdate, UpdateReport, validate_update_file
from fedmix_engine.fedmix.aggregation import aggregate
from fedmix_engine.fedmix.pair import init_pair
from fedmix_engine.fedmix.weights import AggregationRule
from fedmix_engine.model import ModelConfig
from fedmix_engine.predict import Predictor
from waiting import wait_until

pytestmark = pytest.mark.flower
TINY = ModelConfig(base_width=4)
SITES = ["site-a", "site-b", "site-c"]


def _metadata(node: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN)


def reply(node: int, pair: dict[str, torch.Tensor] | None = None, n: int = 10, loss: float = 0.5,
          site: str | None = None, arrays: ArrayRecord | None = None, metrics: MetricRecord | None = None) -> Message:
    """A site's training reply as the SuperLink hands it to the strategy."""
    content = RecordDict({"arrays": arrays if arrays is not None else pair_to_arrays(pair),
                          "metrics": metrics if metrics is not None else report_to_metrics(UpdateReport(n, loss))})
    if site:
        content["config"] = ConfigRecord({"site": site})
    return Message(content=content, metadata=_metadata(node))


def site_pairs(count: int = 3) -> list[dict[str, torch.Tensor]]:
    return [init_pair(TINY, seed) for seed in range(10, 10 + count)]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("method", ["fedmix", "fedmix-fixed", "fedavg"])
def test_strategy_aggregates_exactly_like_the_engine(method: str) -> None:
    rule = AggregationRule.for_method(method, 10.0, 1.5)
    pairs, reports = site_pairs(), [(12, 0.31), (5, 0.72), (30, 0.12)]
    strategy = FedMixStrategy(init_pair(TINY, 0), rule, min_available_nodes=3, min_train_nodes=3)
    sites = list(enumerate(zip(pairs, reports, strict=True)))
    replies = [reply(100 + k, p, n, loss, site=SITES[k]) for k, (p, (n, loss)) in sites]
    arrays, metrics = strategy.aggregate_train(1, replies)

    expected, weights = aggregate([(f"s{k}", p, n, loss) for k, (p, (n, loss)) in sites], rule)
    got = arrays.to_torch_state_dict()
    assert max_diff(got, expected) < 1e-6
    outcome = strategy.history[-1]
    assert outcome.pair is None and outcome.updates == {}  # the history keeps no model copies
    assert list(outcome.weights) == [f"{SITES[k]} (node {100 + k})" for k in range(3)]
    assert np.allclose(list(outcome.weights.values()), list(weights.values()), atol=1e-12)
    assert metrics["sites-aggregated"] == 3 and metrics["sites-refused"] == 0 and metrics["samples"] == 47
    if method == "fedmix":  # the adaptive rule gives the highest-loss site more than its data share
        assert outcome.weights["site-b (node 101)"] > 5 / 47


def _corrupt(pair: dict[str, torch.Tensor], key: str, value: np.ndarray) -> ArrayRecord:
    record = pair_to_arrays(pair)
    record[key] = Array(value)
    return record


def test_bad_replies_are_left_out_with_a_reason_and_the_round_still_aggregates() -> None:
    rule = AggregationRule.for_method("fedmix")
    good = site_pairs(2)
    template = init_pair(TINY, 0)
    key = next(iter(template))
    nan = template[key].numpy().copy()
    nan.flat[0] = np.nan
    missing = pair_to_arrays(good[0])
    del missing[key]
    bad = {
        "error": Message(error=Error(code=0, reason="ClientApp raised: disk full"), metadata=_metadata(1)),
        "nan": reply(2, arrays=_corrupt(good[0], key, nan)),
        "shape": reply(3, arrays=_corrupt(good[0], key, np.zeros((2, 2), np.float32))),
        "dtype": reply(4, arrays=_corrupt(good[0], key, template[key].numpy().astype(np.float64))),
        "missing": reply(5, arrays=missing),
        "negative-n": reply(6, good[0], metrics=MetricRecord({"num-examples": -3, "train-loss": 0.2})),
        "nan-loss": reply(7, good[0], metrics=MetricRecord({"num-examples": 3, "train-loss": math.nan})),
        "no-report": reply(8, good[0], metrics=MetricRecord({"accuracy": 0.9})),
        "huge": reply(9, {k: v.clamp(-1, 1) * 65504 for k, v in good[0].items()}),  # finite, fp16's largest
        "loss-above-dice": reply(10, good[0], 10, 3.0),  # the soft Dice is at most 1: it would buy the round
    }
    replies = [reply(100, good[0], 10, 0.4), *bad.values(), reply(101, good[1], 20, 0.6)]
    strategy = FedMixStrategy(template, rule, loss="dice")
    arrays, metrics = strategy.aggregate_train(3, replies)

    expected, _ = aggregate([("a", good[0], 10, 0.4), ("b", good[1], 20, 0.6)], rule)
    assert max_diff(arrays.to_torch_state_dict(), expected) < 1e-6
    refused = strategy.history[-1].refused
    assert metrics["sites-refused"] == len(bad) == len(refused)
    reasons = dict(zip(bad, (refused[f"node {node}"] for node in range(1, 11)), strict=True))
    assert "disk full" in reasons["error"]
    assert "NaN or infinite" in reasons["nan"] and key in reasons["nan"]
    assert "differs from the global model" in reasons["shape"] and key in reasons["shape"]
    assert "float64" in reasons["dtype"]
    assert "keys differ" in reasons["missing"]
    assert ".n" in reasons["negative-n"] and ".loss" in reasons["nan-loss"]
    assert "num-examples" in reasons["no-report"]
    assert "update: moves the model by " in reasons["huge"]
    assert "fedmix-report.loss: 3 is above 1, the most the federation's 'dice' training loss" in reasons[
        "loss-above-dice"]


def test_the_loss_ceiling_is_the_runs_training_loss() -> None:
    """Dice + BCE has no ceiling, so the same reply that a soft-Dice run refuses counts in a Dice + BCE run;
    the ServerApp passes its run's loss (``loss=fed.train.loss``)."""
    template, pair = init_pair(TINY, 0), site_pairs(1)[0]
    for loss, refused in (("dice", 1), ("dice+bce", 0)):
        strategy = FedMixStrategy(template, AggregationRule.for_method("fedmix"), loss=loss)
        _, metrics = strategy.aggregate_train(1, [reply(100, pair, 10, 0.4), reply(101, pair, 10, 3.0)])
        assert metrics["sites-refused"] == refused, loss


def test_a_node_the_superlink_answers_for_is_named_as_that_node_not_as_the_superlink(serverapp_identity: None) -> None:
    """A SuperNode whose heartbeats stop is answered for by the SuperLink: a "Node Unavailable" error from
    node 1 (the SuperLink) that names only the instruction. It was logged and recorded as "node 1" (and the
    final delivery also listed the real node as "no reply"); it is now the node the instruction went to."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    from fedmix_engine.federation.flower.final_model import delivery_record
    from fedmix_engine.federation.flower.strategy import addressees

    rule = AggregationRule.for_method("fedmix")
    template, good = init_pair(TINY, 0), site_pairs(1)[0]
    strategy = FedMixStrategy(template, rule)
    sent = list(strategy.configure_train(1, pair_to_arrays(template), ConfigRecord(), LoopGrid({}, silent=(7, 8))))
    for message in sent:  # what the Grid does as it pushes an instruction
        message.metadata.__dict__["_message_id"] = message.object_id
    by_node = {message.metadata.dst_node_id: message for message in sent}
    silent = create_message_error_unavailable_res_message(by_node[8].metadata, "node_unavail")
    assert silent.metadata.src_node_id == 1, "Flower's own reply for a node it cannot reach comes from the SuperLink"
    arrays, _ = strategy.aggregate_train(1, [reply(7, good, site="site-a"), silent])
    assert max_diff(arrays.to_torch_state_dict(), good) < 1e-6
    (name, reason), = strategy.history[-1].refused.items()
    assert name == "node 8" and "Node Unavailable" in reason, (name, reason)
    record = delivery_record([silent], [8], "0" * 64, 1, addressees(message.metadata for message in sent))
    assert record["sites"] == {"node 8": f"not saved: {silent.error.reason}"}, record


def test_without_federated_evaluation_no_round_records_an_empty_evaluation(serverapp_identity: None) -> None:
    """Flower calls aggregate_evaluate every round even when fraction-evaluate is 0 and no site was asked;
    each round then wrote an empty line (0 images, Dice null) to evaluations.jsonl."""
    recorded: list = []
    template = init_pair(TINY, 0)
    strategy = FedMixStrategy(template, AggregationRule.for_method("fedmix"), on_evaluate=recorded.append)
    grid = LoopGrid({}, silent=(7,))
    assert list(strategy.configure_evaluate(1, pair_to_arrays(template), ConfigRecord(), grid)) == []
    assert strategy.aggregate_evaluate(1, []) is None and recorded == []


def test_the_serverapp_log_names_each_class_held_out_dice(tmp_path: Path, caplog) -> None:
    """Flower's log gave a lesion-and-cyst federation's pooled Dice only: a class the model misses was hidden
    in the mean, as in the built-in server's status before."""
    import logging

    from fedmix_engine.federation.federated_evaluation import EvaluationReport
    from fedmix_engine.federation.flower.app import RoundRecorder
    from fedmix_engine.federation.flower.strategy import EvaluationOutcome

    def report(images: int, lesion: float, cyst: float) -> EvaluationReport:
        return EvaluationReport.from_dict({"images": images, "dice": (lesion + cyst) / 2, "classes": {
            name: {"images": images, "lesion_images": 1, "dice": dice, "iou": dice}
            for name, dice in (("lesion", lesion), ("cyst", cyst))}})

    settings = FlowerRunSettings.from_run_config({"out-dir": str(tmp_path / "out"), "class-names": "lesion,cyst"})
    with caplog.at_level(logging.INFO, logger="fedmix_engine.federation.flower.app"):
        RoundRecorder(settings).evaluation(EvaluationOutcome(1, {"node 1": report(3, 0.9, 0.1),
                                                                 "node 2": report(1, 0.5, 0.5)}))
    assert "round 1: held-out Dice 0.500 (lesion 0.800 · cyst 0.200) over 4 images at 2 site(s)" in caplog.text, \
        caplog.text


def test_replies_are_measured_against_the_global_pair_of_their_round() -> None:
    """configure_train keeps the round's global pair: a reply is refused for moving far from the model it was
    sent, not from the first one (a later round's model may have moved far from the initial one)."""
    first = init_pair(TINY, 0)
    later = {k: v * 50 for k, v in first.items()}  # far from the first: 49× its size
    near_later = {k: v + 0.001 for k, v in later.items()}
    strategy = FedMixStrategy(first, AggregationRule.for_method("fedmix"), fraction_train=0.0)
    strategy.aggregate_train(1, [reply(1, near_later)])
    assert "moves the model by 49" in strategy.history[-1].refused["node 1"]
    assert list(strategy.configure_train(2, pair_to_arrays(later), ConfigRecord(), None)) == []  # samples none
    arrays, _ = strategy.aggregate_train(2, [reply(1, near_later)])
    assert strategy.history[-1].refused == {} and max_diff(arrays.to_torch_state_dict(), near_later) < 1e-5


def test_a_round_where_nobody_trained_keeps_the_global_pair() -> None:
    strategy = FedMixStrategy(init_pair(TINY, 0), AggregationRule.for_method("fedmix"))
    arrays, metrics = strategy.aggregate_train(1, [reply(1, site_pairs(1)[0], n=0, loss=0.0)])
    assert arrays is None and metrics["sites-aggregated"] == 0


def test_site_train_runs_the_engine_update_on_the_site_store(tmp_path: Path) -> None:
    make_sample(tmp_path / "s", sites=2, images=6, eval_images=1, seed=0, size=32)
    settings = FlowerRunSettings.from_run_config({"model-width": 4, "image-size": 32, "crop-size": 32,
                                                  "batch-size": 4})
    pair = init_pair(settings.federation.model, 0)
    config = ConfigRecord({**settings.site_config(), "server-round": 1})
    request = Message(content=RecordDict({"arrays": pair_to_arrays(pair), "config": config}),
                      metadata=_metadata(0))
    context = Context(run_id=42, node_id=7, node_config={"site-dir": str(tmp_path / "s" / "site-a")},
                      state=RecordDict(), run_config={})
    out = site_train(request, context)
    assert not out.has_error()
    assert out.content["config"]["site"] == "site-a"
    metrics = out.content["metrics"]
    assert metrics["num-examples"] == 6 and metrics["count-mask"] == 3 and 0 < metrics["train-loss"] < 2
    trained = out.content["arrays"].to_torch_state_dict()
    assert set(trained) == set(pair) and max_diff(trained, pair) > 0  # it trained
    models = tmp_path / "s" / "site-a" / "models"
    assert (models / "flower-run-42-state-pending-0001.pt").exists()  # Adam state kept, not yet counted
    assert not (models / "flower-run-42-state.pt").exists()

    no_site = Context(run_id=42, node_id=7, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(InputError, match="site-dir"):
        site_train(request, no_site)

    # a federation that fixed its class names refuses a site whose label 1 means another class
    for names, trains in (("lesion", True), ("tumour", False)):
        named = FlowerRunSettings.from_run_config({"model-width": 4, "image-size": 32, "crop-size": 32,
                                                   "batch-size": 4, "class-names": names})
        message = Message(content=RecordDict({"arrays": pair_to_arrays(pair), "config": ConfigRecord(
            {**named.site_config(), "server-round": 2})}), metadata=_metadata(0))
        if trains:
            assert not site_train(message, context).has_error()
        else:
            with pytest.raises(InputError, match="site's classes are lesion; the federation's are tumour"):
                site_train(message, context)


def test_a_site_trains_the_network_of_an_installed_package_that_the_run_config_names(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    """The run-config key ``model`` reaches a site's ClientApp: it builds and trains the package's network."""
    from model_package_helpers import install_network_package

    install_network_package(tmp_path, monkeypatch)
    make_sample(tmp_path / "s", sites=1, images=6, eval_images=1, seed=0, size=32)
    settings = FlowerRunSettings.from_run_config({"model": "tiny-conv", "image-size": 32, "crop-size": 32,
                                                  "batch-size": 4})
    pair = init_pair(settings.federation.model, 0)
    assert "net1.body.0.weight" in pair  # the package's network, not a U-Net
    request = Message(content=RecordDict({"arrays": pair_to_arrays(pair), "config": ConfigRecord(
        {**settings.site_config(), "server-round": 1})}), metadata=_metadata(0))
    context = Context(run_id=43, node_id=7, node_config={"site-dir": str(tmp_path / "s" / "site-a")},
                      state=RecordDict(), run_config={})
    out = site_train(request, context)
    assert not out.has_error()
    trained = out.content["arrays"].to_torch_state_dict()
    assert set(trained) == set(pair) and max_diff(trained, pair) > 0


@pytest.fixture
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower's ServerApp runtime sets before a strategy creates messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 42), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class LoopGrid(Grid):
    """A Grid that hands each message to the real ClientApp of its node, as a SuperNode would (an exception
    becomes the reply's error); nodes outside ``contexts`` never answer."""

    def __init__(self, contexts: dict[int, Context], silent: tuple[int, ...] = ()) -> None:
        self.contexts, self.silent = contexts, silent

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return [*self.contexts, *self.silent]

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.silent:
                continue
            try:
                replies.append(clientapp(message, self.contexts[node]))
            except Exception as exc:
                replies.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=message))
        return replies


def test_every_site_receives_the_final_model_byte_for_byte_and_the_server_records_who_saved_it(
        tmp_path: Path, serverapp_identity: None) -> None:
    """Flower sends a site only the pair it trains on: without this step a Flower site ended the run with
    nothing to predict with. A site that fits saves the server's own file; one that does not, or holds a
    broken pair, keeps what it had; a silent node is named."""
    make_sample(tmp_path / "s", sites=2, images=4, eval_images=1, seed=0, size=32)
    site_a, site_b = tmp_path / "s" / "site-a", tmp_path / "s" / "site-b"
    settings = FlowerRunSettings.from_run_config({"model-width": 4, "image-size": 32, "crop-size": 32,
                                                  "class-names": "lesion", "out-dir": str(tmp_path / "out")})
    fed = settings.federation

    def context(site: Path, node: int) -> Context:
        return Context(run_id=42, node_id=node, node_config={"site-dir": str(site)}, state=RecordDict(), run_config={})

    assert deliver_final_model(LoopGrid({1: context(site_a, 1)}), settings) is None  # no round made a model
    assert not (site_a / "models" / "global.safetensors").exists()

    pair = init_pair(fed.model, 5)
    meta = {**fed.checkpoint_meta(3), "method": "fedmix", "weights": {"site-a (node 1)": 0.625, "node 2": 0.375}}
    server_file = save_checkpoint(tmp_path / "out" / "global.safetensors", pair, fed.model, meta)
    # site-b's label 1 is another class: it keeps the model it had
    b_store = site_b / "site.json"
    b_config = json.loads(b_store.read_text())
    b_config["classes"] = ["tumour"]
    b_store.write_text(json.dumps(b_config))
    before_b = save_checkpoint(site_b / "models" / "global.safetensors", init_pair(fed.model, 9), fed.model, {})
    before_b_bytes = before_b.read_bytes()

    record = deliver_final_model(LoopGrid({1: context(site_a, 1), 2: context(site_b, 2)}, silent=(3,)), settings)
    saved = site_a / "models" / "global.safetensors"
    assert saved.read_bytes() == server_file.read_bytes()  # byte for byte: weights, model config, metadata
    assert (site_a / "models" / "flower-run-42-round-0003.safetensors").read_bytes() == server_file.read_bytes()
    assert load_checkpoint(saved)[2]["classes"] == ["lesion"]
    assert before_b.read_bytes() == before_b_bytes
    written = json.loads((tmp_path / "out" / "final-delivery.json").read_text())
    assert written == record and written["round"] == 3
    assert written["sites"]["site-a (node 1)"] == "saved"
    assert "site's classes are tumour; the federation's are lesion" in written["sites"]["node 2"]
    assert written["sites"]["node 3"] == "no reply"
    assert set(written["sites"]) == {"site-a (node 1)", "node 2", "node 3"}

    # a pair with NaN, or of another model, is refused before anything is written
    from fedmix_engine.federation.flower import final_model
    saved_bytes = saved.read_bytes()
    broken = {k: v.clone() for k, v in pair.items()}
    first = next(k for k, v in broken.items() if v.is_floating_point())
    broken[first].view(-1)[0] = float("nan")
    wider = init_pair(ModelConfig(base_width=8), 0)
    for bad, reason in ((broken, "NaN"), (wider, "shape")):
        [message] = final_model.final_model_messages(bad, meta, settings, [1])
        reply = LoopGrid({1: context(site_a, 1)}).send_and_receive([message])[0]
        assert reply.has_error() and "final global model from the SuperLink" in reply.error.reason
        assert reason in reply.error.reason, reply.error.reason
        assert saved.read_bytes() == saved_bytes


def test_a_sites_adam_moments_advance_only_with_updates_the_server_aggregated(tmp_path: Path,
                                                                             serverapp_identity: None) -> None:
    """As a join site's: the ServerApp names the nodes it aggregated in the next message, and a site
    commits its pending moments only then; a refused or late update's optimiser step is dropped."""
    from fedmix_engine.checkpoint import load_site_state
    from fedmix_engine.federation.flower.site_state import ACCEPTED_KEY

    make_sample(tmp_path / "s", sites=1, images=4, eval_images=1, seed=0, size=32)
    settings = FlowerRunSettings.from_run_config({"model-width": 4, "image-size": 32, "crop-size": 32,
                                                  "batch-size": 4, "out-dir": str(tmp_path / "out")})
    pair = init_pair(settings.federation.model, 0)
    models = tmp_path / "s" / "site-a" / "models"
    context = Context(run_id=42, node_id=7, node_config={"site-dir": str(tmp_path / "s" / "site-a")},
                      state=RecordDict(), run_config={})
    strategy = FedMixStrategy(pair, AggregationRule.for_method("fedmix"))

    def train(round_index: int) -> None:
        config = ConfigRecord({**settings.site_config(), **strategy.accepted_config, "server-round": round_index})
        out = site_train(Message(RecordDict({"arrays": pair_to_arrays(pair), "config": config}),
                                 metadata=_metadata(0)), context)
        assert not out.has_error()

    def rounds_done(name: str) -> int:
        return load_site_state(models, name).rounds_done

    train(1)
    assert rounds_done("flower-run-42-state-pending-0001.pt") == 1
    strategy.aggregate_train(1, [reply(7, site_pairs(1)[0]), reply(8, site_pairs(2)[1])])  # node 7 counted
    assert json.loads(strategy.accepted_config[ACCEPTED_KEY]) == {"round": 1, "nodes": [7, 8]}
    train(2)
    assert rounds_done("flower-run-42-state.pt") == 1  # round 1's moments committed
    assert rounds_done("flower-run-42-state-pending-0002.pt") == 2
    broken = {k: v * float("nan") if v.is_floating_point() else v for k, v in site_pairs(1)[0].items()}
    strategy.aggregate_train(2, [reply(7, broken), reply(8, site_pairs(2)[1])])  # node 7 refused
    assert json.loads(strategy.accepted_config[ACCEPTED_KEY]) == {"round": 2, "nodes": [8]}
    train(3)
    assert not (models / "flower-run-42-state-pending-0002.pt").exists()  # round 2's step dropped
    assert rounds_done("flower-run-42-state.pt") == 1
    assert rounds_done("flower-run-42-state-pending-0003.pt") == 2  # round 3 trained from round 1's moments

    # the ServerApp's own messages carry it: FedAvg's configure_train with the strategy's addition
    class Nodes(LoopGrid):
        def __init__(self) -> None:
            super().__init__({7: context, 8: context})

    messages = list(strategy.configure_train(3, pair_to_arrays(pair), ConfigRecord(settings.site_config()),
                                             Nodes()))
    assert len(messages) == 2 and all(json.loads(str(m.content["config"][ACCEPTED_KEY]))["nodes"] == [8]
                                      for m in messages)

    # the last round's moments are settled by the final model's message
    strategy.aggregate_train(3, [reply(7, site_pairs(1)[0])])
    save_checkpoint(tmp_path / "out" / "global.safetensors", pair, settings.federation.model,
                    settings.federation.checkpoint_meta(3))
    assert deliver_final_model(LoopGrid({7: context}), settings, strategy.accepted_config)["sites"] == \
        {"site-a (node 7)": "saved"}
    assert rounds_done("flower-run-42-state.pt") == 2
    assert not list(models.glob("*pending*"))


def test_sites_score_the_round_model_on_their_held_out_folder_and_the_strategy_pools_it(
        tmp_path: Path, serverapp_identity: None) -> None:
    """Flower's federated evaluation, as ``join --eval``: a site with ``eval-dir`` scores the global pair
    there (the figures ``evaluate`` gives), one without answers that it scored nothing, and a held-out
    folder that is the training site, or a reply with a Dice above 1, is left out with its reason."""
    from fedmix_engine.evaluation import summarise
    from fedmix_engine.federation.flower.app import site_evaluate
    from fedmix_engine.federation.flower.strategy import EvaluationOutcome

    make_sample(tmp_path / "s", sites=3, images=4, eval_images=3, seed=0, size=32)
    settings = FlowerRunSettings.from_run_config({"model-width": 4, "image-size": 32, "crop-size": 32,
                                                  "class-names": "lesion", "fraction-evaluate": 1.0})
    site = {name: tmp_path / "s" / name for name in SITES}
    held_out = tmp_path / "s" / "eval" / "site-a" / "test"
    node_configs = {1: {"site-dir": str(site["site-a"]), "eval-dir": str(held_out), "device": "cpu"},
                    2: {"site-dir": str(site["site-b"])},
                    3: {"site-dir": str(site["site-c"]), "eval-dir": str(site["site-c"])}}
    grid = LoopGrid({node: Context(run_id=42, node_id=node, node_config=config, state=RecordDict(), run_config={})
                     for node, config in node_configs.items()})
    pair = init_pair(settings.federation.model, 3)
    outcomes: list[EvaluationOutcome] = []
    strategy = FedMixStrategy(pair, settings.rule, on_evaluate=outcomes.append, class_names=("lesion",),
                              num_classes=1, fraction_evaluate=settings.fraction_evaluate)
    messages = list(strategy.configure_evaluate(2, pair_to_arrays(pair), ConfigRecord(settings.site_config()), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]
    replies = grid.send_and_receive(messages)
    forged = Message(RecordDict({"metrics": MetricRecord({"num-examples": 3, "dice": 1.5, "dice-lesion": 0.5,
                                                          "iou-lesion": 0.5, "lesion-images-lesion": 1})}),
                     reply_to=next(m for m in messages if m.metadata.dst_node_id == 1))
    two_classes = Message(RecordDict({"metrics": MetricRecord({
        "num-examples": 3, "dice": 0.5, **{f"{figure}-{label}": value for label in ("lesion", "cyst")
                                          for figure, value in (("dice", 0.5), ("iou", 0.5), ("lesion-images", 1))}})}),
        reply_to=next(m for m in messages if m.metadata.dst_node_id == 2))
    pooled_metrics = strategy.aggregate_evaluate(2, [*replies, forged, two_classes])

    outcome, = outcomes
    rows = score_site(Predictor(pair, settings.federation.model, 32, classes=("lesion",)), held_out)
    report = outcome.reports["site-a (node 1)"]
    assert report.images == 3 and report.dice == pytest.approx(mean_image_dice(rows), abs=1e-9)
    assert report.classes["lesion"].iou == pytest.approx(summarise(rows)[0].iou_mean, abs=1e-9)
    assert list(outcome.reports) == ["site-a (node 1)"] and outcome.without_held_out == ["site-b (node 2)"]
    assert "is the site this client trains on" in outcome.refused["node 3"]
    assert "evaluation.dice: must be a number from 0 to 1, not 1.5" in outcome.refused["node 1"]
    assert "evaluation.classes: scores 2 class(es); the federation's model has 1" in outcome.refused["node 2"]
    assert pooled_metrics["num-examples"] == 3 and pooled_metrics["dice"] == pytest.approx(report.dice)
    assert pooled_metrics["dice-lesion"] == pytest.approx(report.classes["lesion"].dice)
    assert outcome.to_dict()["sites"]["site-a (node 1)"]["images"] == 3

    bare = Context(run_id=42, node_id=2, node_config=node_configs[2], state=RecordDict(), run_config={})
    assert site_evaluate(messages[0], bare).content["metrics"]["num-examples"] == 0  # no eval-dir
    assert FedMixStrategy(pair, settings.rule).configure_evaluate(1, pair_to_arrays(pair), ConfigRecord(),
                                                                  grid) == [], "off unless the run asks"


@pytest.mark.parametrize("change, said", [
    ({"fedmix-train": "[" * 50_000}, r"^fedmix-train: not JSON \(nested too deep"),  # was a RecursionError
    ({"fedmix-train": "5"}, r"^fedmix-train: must be an object of training settings, not int$"),  # a TypeError
    ({"fedmix-train": '{"schedule": 1}'}, r"^fedmix-train: unknown setting\(s\) \['schedule'\]"),
    ({"fedmix-train": '{"lr": "fast"}'}, r"^fedmix-train\.lr: must be a finite number, not 'fast'$"),
    ({"fedmix-classes": "lesion"}, r"^fedmix-classes: not JSON \(Expecting value"),  # a JSONDecodeError
    ({"fedmix-classes": '[1, 2]'}, r"^fedmix-classes: must be a list of class names, not \[1, 2\]$"),
    ({"fedmix-seed": "0"}, r"^fedmix-seed: must be an integer, not '0'"),
    ({"server-round": 1.5}, r"^server-round: must be an integer, not 1\.5"),  # int() took it as round 1
])
def test_a_round_config_a_site_cannot_read_is_refused_by_key(change: dict, said: str) -> None:
    """What a site receives each round is checked by key: a config from another version of the app (or
    damaged) was a TypeError, a JSONDecodeError or a RecursionError in the ClientApp, naming nothing."""
    from fedmix_engine.federation.flower.settings import parse_site_config
    from fedmix_engine.federation.flower.site_state import ACCEPTED_KEY, settle

    good = {**FlowerRunSettings().site_config(), "server-round": 3}
    assert parse_site_config(good).round == 3
    with pytest.raises(InputError, match=said):
        parse_site_config({**good, **change})
    with pytest.raises(InputError, match=rf"^config '{ACCEPTED_KEY}': unreadable \(nested too deep"):
        settle(Path("unused"), 1, 1, {ACCEPTED_KEY: "[" * 50_000})


def test_run_config_is_checked_and_the_app_folder_passes_flowers_own_validation(tmp_path: Path) -> None:
    import tomllib

    from flwr.common.config import validate_config

    for bad, field in (({"method": "krum"}, "method"), ({"lam": "ten"}, "lam"), ({"unknown-key": 1}, "unknown"),
                       # a setting's check names the key written, not the ServerConfig field it sets
                       ({"crop-size": 30}, "run config 'crop-size': must be a multiple of 16"),
                       ({"model-width": 3}, "run config 'model-width': must be an even number"),
                       # a network no installed package offers
                       ({"model": "nope"}, "run config 'model': unknown model 'nope'; known: unet"),
                       ({"num-server-rounds": 0}, "run config 'num-server-rounds': must be positive"),
                       ({"min-sites": 0}, "run config 'min-sites': need 1 ≤ min-sites"),
                       ({"class-names": "lesion,lesion"}, "run config 'class-names': lesion, lesion: give"),
                       ({"fraction-evaluate": 1.5}, "run config 'fraction-evaluate': must be from 0 to 1")):
        with pytest.raises(InputError, match=re.escape(field)):
            FlowerRunSettings.from_run_config(bad)
    path = write_flower_app(tmp_path / "app", {"num-server-rounds": 2, "model-width": 4})
    config = tomllib.loads(path.read_text())
    ok, errors, _ = validate_config(config, check_module=True, project_dir=tmp_path / "app")
    assert ok, errors
    settings = FlowerRunSettings.from_run_config(config["tool"]["flwr"]["app"]["config"])
    assert settings.federation.rounds == 2 and settings.federation.model.base_width == 4
    assert config["tool"]["flwr"]["app"]["config"]["model"] == "unet"  # the network, as `serve --model` sets it
    # the defaults are the built-in server's
    assert FlowerRunSettings().federation == ServerConfig()
    # an image size given alone: the crop follows it, as `serve --image-size` does; a given crop is kept
    assert FlowerRunSettings.from_run_config({"image-size": 64}).federation.train.crop_size == 48
    assert FlowerRunSettings.from_run_config({"image-size": 64, "crop-size": 32}).federation.train.crop_size == 32

    # class names fix the label order and, unless given, the class count (as `serve --class-names` does)
    named = write_flower_app(tmp_path / "named", {"class-names": "lesion, cyst"})
    written = tomllib.loads(named.read_text())["tool"]["flwr"]["app"]["config"]
    assert written["class-names"] == "lesion,cyst" and written["num-classes"] == 2
    settings = FlowerRunSettings.from_run_config(written)
    assert settings.federation.class_names == ("lesion", "cyst") and settings.federation.model.num_classes == 2
    for bad in ({"class-names": "lesion,lesion"}, {"class-names": "lesion,cyst", "num-classes": 3},
                {"class-names": "lesion,"}):
        with pytest.raises(InputError, match="class-names"):
            FlowerRunSettings.from_run_config(bad)

    # no deadline, as `serve --round-timeout inf`: TOML's inf, written back as inf, and Flower's None (no limit)
    endless = write_flower_app(tmp_path / "endless", {"round-timeout": math.inf})
    assert "\nround-timeout = inf\n" in endless.read_text()
    config = tomllib.loads(endless.read_text())
    assert validate_config(config, check_module=True, project_dir=tmp_path / "endless")[0]
    settings = FlowerRunSettings.from_run_config(config["tool"]["flwr"]["app"]["config"])
    assert settings.federation.round_timeout == math.inf and settings.timeout is None
    assert FlowerRunSettings.from_run_config({"round-timeout": 240}).timeout == 240.0
    for bad in (-math.inf, math.nan):
        with pytest.raises(InputError, match=re.escape("'round-timeout': must be a number of seconds, or inf for no "
                                                       f"deadline, not {bad!r}")):
            FlowerRunSettings.from_run_config({"round-timeout": bad})
    with pytest.raises(InputError, match=re.escape("run config 'lam': must be a finite number, not inf")):
        FlowerRunSettings.from_run_config({"lam": math.inf})  # only the deadline may be endless
    # said as the server's and the join's settings say it ("a finite int" and "a finite str" before)
    for key, value, wanted in (("num-server-rounds", 2.5, "an integer"), ("class-names", 3, "a text"),
                               ("keep-updates", "yes", "true or false")):
        with pytest.raises(InputError, match=re.escape(f"run config '{key}': must be {wanted}, not {value!r}")):
            FlowerRunSettings.from_run_config({key: value})


# ---------------------------------------------------------------------------------------------- deployment


class _PortTaken(AssertionError):
    """The port free_port() chose was taken before the process bound it."""


class Loopback:
    """A Flower deployment of real processes on 127.0.0.1, as a site's IT would run it: a SuperLink with TLS
    (a self-signed certificate) and SuperNode authentication, SuperNodes with registered keys, ``flwr``."""

    def __init__(self, tmp_path: Path, env: dict[str, str] = ENV) -> None:
        self.tmp_path, self.keys, home = tmp_path, tmp_path / "keys", tmp_path / "flwr-home"
        self.cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"  # self-signed: its own CA
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(self.cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                        "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        self.keys.mkdir()
        home.mkdir()
        self.bin_dir = Path(sys.executable).parent  # the SuperLink starts flower-superexec from PATH
        self.env = {**env, "FLWR_HOME": str(home), "PATH": f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"}
        self.procs: list[subprocess.Popen] = []
        _, self.port = self.start_on_a_free_port("superlink", lambda port: [
            "flower-superlink", "--port", str(port), "--ssl-ca-certfile", str(self.cert), "--ssl-certfile",
            str(self.cert), "--ssl-keyfile", str(key), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--database", str(tmp_path / "superlink.db")])
        (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                          f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.cert}"\n')

    def log(self, name: str) -> Path:
        """Where the process started as ``name`` writes (every start of it appends)."""
        return self.tmp_path / f"{name}.log"

    def start(self, args: list[str], name: str) -> tuple[subprocess.Popen, Path]:
        """A process in a session of its own (so it is killed with its children), its output in ``name``.log."""
        log = self.log(name)
        with open(log, "ab") as handle:  # the child keeps its own descriptor; a restart appends
            proc = subprocess.Popen([str(self.bin_dir / args[0]), *args[1:]], stdout=handle,
                                    stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp_path, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def start_on_a_free_port(self, name: str, args: Callable[[int], list[str]]) -> tuple[subprocess.Popen, int]:
        """``start(args(port), name)`` on a free port, once the process holds it. free_port()'s port is free when
        chosen, not when the process binds it seconds later: taken meanwhile, the process exits, and this
        starts it again on another port (as the engine's test server does)."""
        for _ in range(2):
            try:
                return self._holding_its_port(name, args)
            except _PortTaken:
                pass
        return self._holding_its_port(name, args)

    def _holding_its_port(self, name: str, args: Callable[[int], list[str]]) -> tuple[subprocess.Popen, int]:
        log, port = self.log(name), free_port()
        started = log.stat().st_size if log.exists() else 0  # a process started again appends to its log

        def said() -> bytes:
            return log.read_bytes()[started:]

        proc, _ = self.start(args(port), name)
        try:  # uvicorn says so once it has bound the port (a port that merely answers may be another program's)
            wait_until(lambda: b"Uvicorn running on" in said(), f"{name} holding port {port}", 60, proc,
                       every=0.2, detail=lambda: said()[-3000:].decode(errors="replace"))
        except AssertionError:
            if b"address already in use" in said():
                raise _PortTaken(port) from None
            raise
        return proc, port

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin_dir / "flwr"), *args], env=self.env, cwd=self.tmp_path,
                              capture_output=True, text=True, timeout=timeout)

    def key(self, name: str, register: bool = True) -> Path:
        """A SuperNode key pair (EC P-384 in OpenSSH format, as Flower's guide makes them), registered."""
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(self.keys / name)],
                       check=True)
        if register:
            registered = self.flwr("supernode", "register", str(self.keys / f"{name}.pub"), "loopback")
            assert registered.returncode == 0, registered.stdout + registered.stderr
        return self.keys / name

    def supernode(self, name: str, node_config: str, *extra: str) -> tuple[subprocess.Popen, Path]:
        node, _ = self.start_on_a_free_port(name, lambda port: [
            "flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--root-certificates", str(self.cert),
            "--auth-supernode-private-key", str(self.keys / name), "--port", str(port), *extra,
            "--node-config", node_config])
        return node, self.log(name)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_flower_deployment_on_loopback_aggregates_like_the_engine_and_the_simulator(tmp_path: Path) -> None:
    """SuperLink with TLS and SuperNode authentication + 3 registered SuperNodes (real processes, one per
    site) + ``flwr run``, 2 rounds, tiny model; an unregistered SuperNode is turned away."""
    sample = tmp_path / "sample"
    make_sample(sample, sites=3, images=8, eval_images=3, seed=0, size=32)
    out, app = tmp_path / "out", tmp_path / "app"
    write_flower_app(app, {"num-server-rounds": 2, "model-width": 4, "image-size": 32, "crop-size": 32,
                           "batch-size": 4, "min-sites": 3, "round-timeout": 240.0, "out-dir": str(out),
                           "keep-updates": True, "class-names": "lesion", "fraction-evaluate": 1.0})
    deployment = Loopback(tmp_path)
    try:
        for name in SITES:  # site-c has no held-out folder
            deployment.key(name)
            held_out = f' eval-dir="{sample / "eval" / name / "test"}"' if name != "site-c" else ""
            deployment.supernode(name, f'site-dir="{sample / name}" device="cpu"{held_out}')
        deployment.key("intruder", register=False)
        intruder, intruder_log = deployment.supernode("intruder", f'site-dir="{sample / "site-a"}"',
                                                      "--max-retries", "3")
        run = deployment.flwr("run", str(app), "loopback", "--stream", timeout=420)
        logs = run.stdout[-4000:] + run.stderr[-2000:]
        assert run.returncode == 0, logs
        assert intruder.wait(timeout=60) != 0, intruder_log.read_text()[-2000:]
        assert "Failed to activate SuperNode" in intruder_log.read_text()
    finally:
        deployment.close()

    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2], logs
    rule = AggregationRule.for_method("fedmix", 10.0, 1.5)
    for r in rounds:
        assert r["refused"] == {} and len(r["reports"]) == 3
        assert sorted(name.split(" ")[0] for name in r["reports"]) == SITES
        assert abs(sum(r["weights"].values()) - 1) < 1e-9
        # the engine's own aggregation of exactly the updates the sites sent
        updates = sorted((out / f"round-{r['round']:04d}" / "updates").glob("*.safetensors"))
        assert len(updates) == 3
        template = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
                    for k, v in LazyUpdate(updates[0]).items()}
        reports = [validate_update_file(p, template) for p in updates]
        sent = [(p.stem, LazyUpdate(p), rep.n, rep.loss) for p, rep in zip(updates, reports, strict=True)]
        expected, weights = aggregate(sent, rule)
        flower_global, model, meta = load_checkpoint(out / f"round-{r['round']:04d}" / "global.safetensors")
        assert model.base_width == 4 and meta["round"] == r["round"]
        assert meta["image_size"] == 32 and meta["classes"] == ["lesion"]  # predict resizes to it; SEG names
        assert max_diff(flower_global, expected) < 1e-6
        assert np.allclose(sorted(weights.values()), sorted(r["weights"].values()), atol=1e-9)
    final, _, _ = load_checkpoint(out / "global.safetensors")
    assert max_diff(final, flower_global) == 0
    predictor = Predictor.from_checkpoint(out / "global.safetensors", device="cpu")
    assert predictor.image_size == 32 and predictor.classes == ("lesion",)

    # and Flower changed nothing about the algorithm: the simulator gives the same pair
    simulated = simulate_like_the_sites(sample, SITES, 2, tmp_path / "sim")
    assert max_diff(final, simulated) < 1e-5
    for name in SITES:  # each site kept its optimiser state locally, the last round's counted and settled
        assert list((sample / name / "models").glob("flower-run-*-state.pt"))
        assert not list((sample / name / "models").glob("flower-run-*-state-pending-*.pt"))
        # and holds the final model, the server's own file, where join would have put it
        final_at_site = sample / name / "models" / "global.safetensors"
        assert final_at_site.read_bytes() == (out / "global.safetensors").read_bytes()
    evaluations = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    assert [e["round"] for e in evaluations] == [0, 1, 2] and evaluations[-1]["images"] == 6, evaluations
    for e in evaluations:
        assert sorted(name.split(" ")[0] for name in e["sites"]) == ["site-a", "site-b"] and e["refused"] == {}
        assert [name.split(" ")[0] for name in e["without_held_out"]] == ["site-c"]
    final_scores = score_site(predictor, sample / "eval" / "site-a" / "test")
    sent = next(r for name, r in evaluations[-1]["sites"].items() if name.startswith("site-a"))
    assert sent["dice"] == pytest.approx(mean_image_dice(final_scores), abs=1e-6), "scored the final model"
    delivery = json.loads((out / "final-delivery.json").read_text())
    assert delivery["round"] == 2 and sorted(delivery["sites"].values()) == ["saved"] * 3, delivery


@pytest.mark.slow
def test_a_site_killed_while_it_trains_is_left_out_of_that_round_and_rejoins_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's own fault test, with FedMix: site-c's SuperNode and its ClientApp are SIGKILLed as round 1's
    training message reaches it. The SuperLink answers for the silent node once its heartbeats stop; the
    round aggregates the other two (exactly as the engine does) and names site-c's node; the SuperNode
    restarted with the same key trains round 2 (min-sites 3 makes the round wait for it) and gets the final
    model; its optimiser never takes the step of the update that never arrived. The run config names the
    network of a package installed at the server and the sites (``model``), which every process builds. The run
    has no deadline (``round-timeout = inf``), as ``serve --round-timeout inf`` may have."""
    from model_package_helpers import install_network_package

    env = install_network_package(tmp_path, monkeypatch)
    sample = tmp_path / "sample"
    make_sample(sample, sites=3, images=8, eval_images=3, seed=0, size=32)
    out, app = tmp_path / "out", tmp_path / "app"
    write_flower_app(app, {"num-server-rounds": 2, "model": "tiny-conv", "image-size": 32, "crop-size": 32,
                           "batch-size": 4, "min-sites": 3, "round-timeout": math.inf, "out-dir": str(out),
                           "keep-updates": True, "class-names": "lesion"})  # no deadline: the SuperLink's answer
    # for the silent node, not a timeout, closes round 1 (the waits below bound the test)
    deployment = Loopback(tmp_path, env)
    config = {name: f'site-dir="{sample / name}" device="cpu"' for name in SITES}
    rounds_file = out / "rounds.jsonl"
    try:
        nodes = {}
        for name in SITES:
            deployment.key(name)
            nodes[name] = deployment.supernode(name, config[name])
        run, run_log = deployment.start(["flwr", "run", str(app), "loopback", "--stream"], "run")
        victim, victim_log = nodes["site-c"]
        wait_until(lambda: "Receiving: train message" in victim_log.read_text(), "site-c receives round 1",
                   180, victim, run, detail=lambda: run_log.read_text()[-3000:])
        os.killpg(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=20) == -signal.SIGKILL
        wait_until(lambda: rounds_file.is_file() and rounds_file.read_text().strip(), "round 1 closes without site-c",
                   200, run, detail=lambda: run_log.read_text()[-3000:])
        deployment.supernode("site-c", config["site-c"])
        assert run.wait(timeout=300) == 0, run_log.read_text()[-4000:]
    finally:
        deployment.close()
    logs = run_log.read_text()[-4000:]
    first, second = [json.loads(line) for line in rounds_file.read_text().splitlines()]
    assert sorted(name.split(" ")[0] for name in first["reports"]) == ["site-a", "site-b"], logs
    (silent, reason), = first["refused"].items()
    assert "Node Unavailable" in reason, first["refused"]
    assert sorted(name.split(" ")[0] for name in second["reports"]) == SITES, logs
    site_c = next(name for name in second["reports"] if name.startswith("site-c"))
    assert site_c == f"site-c ({silent})", "the node left out of round 1 is site-c's, named as itself, back"
    delivery = json.loads((out / "final-delivery.json").read_text())
    assert sorted(delivery["sites"].values()) == ["saved"] * 3, delivery
    assert not (out / "evaluations.jsonl").exists(), "fraction-evaluate 0: no evaluation to record"
    rule = AggregationRule.for_method("fedmix", 10.0, 1.5)
    updates = sorted((out / "round-0001" / "updates").glob("*.safetensors"))
    assert len(updates) == 2
    template = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in LazyUpdate(updates[0]).items()}
    reports = [validate_update_file(p, template) for p in updates]
    expected, _ = aggregate([(p.stem, LazyUpdate(p), rep.n, rep.loss) for p, rep in zip(updates, reports, strict=True)],
                            rule)
    round_one, model, _ = load_checkpoint(out / "round-0001" / "global.safetensors")
    assert max_diff(round_one, expected) < 1e-6, "round 1 is the two live sites' FedMix aggregate"
    assert model.name == "tiny-conv" and "net1.body.0.weight" in round_one, "the package's network, not a U-Net"
    final = (out / "global.safetensors").read_bytes()
    for name in SITES:
        assert (sample / name / "models" / "global.safetensors").read_bytes() == final, name
        assert not list((sample / name / "models").glob("flower-run-*-state-pending-*.pt")), name


def test_a_pair_with_0_dim_buffers_crosses_flower_records_unchanged() -> None:
    """BatchNorm's num_batches_tracked is a 0-dim tensor (in a network registered with register_model):
    np.ascontiguousarray made it shape (1,), and the receiver refused its own global model's layout."""
    from fedmix_engine.federation.flower.records import arrays_to_pair, pair_to_arrays
    from fedmix_engine.federation.wire import tensor_template

    pair = {**init_pair(TINY, 0), "net1.bn.num_batches_tracked": torch.tensor(7),
            "net2.bn.num_batches_tracked": torch.tensor(3), "net1.scale": torch.tensor(0.5)}
    back = arrays_to_pair(pair_to_arrays(pair), tensor_template(pair), "round trip")
    assert back.keys() == pair.keys()
    assert all(back[k].shape == pair[k].shape and torch.equal(back[k], pair[k]) for k in pair)
