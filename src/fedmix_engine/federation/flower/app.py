"""The Flower App: ``serverapp`` (runs in the SuperLink's deployment) and ``clientapp`` (runs at each site).

Wired up by the app's ``pyproject.toml`` (``fedmix-engine flower-app DIR`` writes one)::

    [tool.flwr.app.components]
    serverapp = "fedmix_engine.federation.flower.app:serverapp"
    clientapp = "fedmix_engine.federation.flower.app:clientapp"

A site's SuperNode says where its SiteStore is: ``--node-config 'site-dir="/data/site-a"'``
(optionally ``device="cuda"``, and ``eval-dir="/data/site-a-holdout"``: a fully labelled folder it does
not train on, where it scores each round's global model when the run config's ``fraction-evaluate`` asks).
Images never leave the site; replies carry the pair and the report, or the held-out scores.
After the last round every site receives the final global model (``final_model``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fedmix_engine.atomic import append_line, atomic_write_bytes
from fedmix_engine.checkpoint import load_checkpoint, save_checkpoint
from fedmix_engine.data.site_store import SiteStore
from fedmix_engine.data.tensors import load_site_tensors
from fedmix_engine.device import plan_device
from fedmix_engine.dice_text import dice_text
from fedmix_engine.errors import InputError
from fedmix_engine.federation.client import check_held_out, check_site_fits_model
from fedmix_engine.federation.federated_evaluation import EvaluationReport
from fedmix_engine.federation.flower import FLWR_HINT, final_model, site_state
from fedmix_engine.federation.flower.records import (
    ARRAYS,
    CONFIG,
    METRICS,
    arrays_to_pair,
    evaluation_to_metrics,
    pair_to_arrays,
    report_to_metrics,
)
from fedmix_engine.federation.flower.settings import FlowerRunSettings, parse_site_config
from fedmix_engine.federation.flower.strategy import (
    SITE_KEY,
    EvaluationOutcome,
    FedMixStrategy,
    RoundOutcome,
    addressees,
)
from fedmix_engine.federation.wire import UpdateReport, encode_update
from fedmix_engine.fedmix.local_update import local_update, site_seed
from fedmix_engine.fedmix.pair import init_pair
from fedmix_engine.file_digest import file_sha256
from fedmix_engine.json_values import parse_json

try:
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError as exc:  # the [flower] extra is optional
    raise ImportError(FLWR_HINT) from exc

log = logging.getLogger(__name__)
serverapp = ServerApp()
clientapp = ClientApp()


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class RoundRecorder:
    """Writes each round durably: ``global.safetensors`` (newest pair), ``rounds.jsonl`` and, with
    ``keep-updates``, ``round-NNNN/`` holding that round's global pair and every accepted update."""

    def __init__(self, settings: FlowerRunSettings):
        self.settings = settings
        self.out = settings.out_path()
        self.out.mkdir(parents=True, exist_ok=True)

    def __call__(self, outcome: RoundOutcome) -> None:
        fed = self.settings.federation
        meta = {**fed.checkpoint_meta(outcome.round), "method": fed.method, "weights": outcome.weights}
        if outcome.pair is not None:
            save_checkpoint(self.out / "global.safetensors", outcome.pair, fed.model, meta)
        if self.settings.keep_updates:
            round_dir = self.out / f"round-{outcome.round:04d}"
            if outcome.pair is not None:
                save_checkpoint(round_dir / "global.safetensors", outcome.pair, fed.model, meta)
            for name, state in outcome.updates.items():
                atomic_write_bytes(round_dir / "updates" / f"{_safe_name(name)}.safetensors",
                                   encode_update(state, outcome.reports[name]))
        line = {"round": outcome.round, "weights": outcome.weights, "refused": outcome.refused,
                "reports": {k: parse_json(r.to_json()) for k, r in outcome.reports.items()}}
        append_line(self.out / "rounds.jsonl", json.dumps(line, sort_keys=True))
        log.info("round %d: weights %s; refused %s", outcome.round,
                 {k: round(w, 4) for k, w in outcome.weights.items()}, list(outcome.refused) or "none")

    def evaluation(self, outcome: EvaluationOutcome) -> None:
        """Append the round's held-out scores to ``evaluations.jsonl`` (the built-in server's ``evaluations``)."""
        line = outcome.to_dict()
        append_line(self.out / "evaluations.jsonl", json.dumps(line, sort_keys=True))
        if line["images"]:
            log.info("round %d: held-out Dice %s over %d images at %d site(s)", outcome.round,
                     dice_text(line["dice"], line["classes"]), line["images"], len(outcome.reports))


@serverapp.main()
def server_main(grid: Grid, context: Context) -> None:
    settings = FlowerRunSettings.from_run_config(dict(context.run_config))
    fed = settings.federation
    pair = init_pair(fed.model, fed.seed)
    recorder = RoundRecorder(settings)
    save_checkpoint(recorder.out / "global-initial.safetensors", pair, fed.model, fed.checkpoint_meta(0))
    strategy = FedMixStrategy(pair, settings.rule, on_round=recorder, keep_updates=settings.keep_updates,
                              on_evaluate=recorder.evaluation, class_names=fed.class_names,
                              num_classes=fed.model.num_classes, loss=fed.train.loss,
                              min_train_nodes=fed.min_sites, min_available_nodes=fed.min_sites,
                              fraction_evaluate=settings.fraction_evaluate)
    if settings.fraction_evaluate > 0:  # round 0's model too, as join --eval scores it: the baseline
        evaluate_config = ConfigRecord(settings.site_config())
        strategy.aggregate_evaluate(0, grid.send_and_receive(
            strategy.configure_evaluate(0, pair_to_arrays(pair), evaluate_config, grid), timeout=settings.timeout))
    strategy.start(grid=grid, initial_arrays=pair_to_arrays(pair), num_rounds=fed.rounds,
                   timeout=settings.timeout, train_config=ConfigRecord(settings.site_config()),
                   evaluate_config=ConfigRecord(settings.site_config()))
    log.info("FedMix on Flower finished %d round(s); global pair in %s", fed.rounds, recorder.out)
    deliver_final_model(grid, settings, strategy.accepted_config)


def deliver_final_model(grid: Grid, settings: FlowerRunSettings, accepted: dict[str, str] | None = None
                        ) -> dict | None:
    """Send every connected site the run's ``global.safetensors`` and record in ``final-delivery.json``
    which sites saved it byte for byte; None (nothing sent) when no round produced a model."""
    out = settings.out_path()
    checkpoint = out / "global.safetensors"
    if not checkpoint.is_file():
        log.warning("no round produced a global model: the sites keep the model they had")
        return None
    pair, _, meta = load_checkpoint(checkpoint)
    round_index = int(meta.get("round", 0))
    nodes = sorted(grid.get_node_ids())
    messages = final_model.final_model_messages(pair, meta, settings, nodes, accepted or {})
    sent = [message.metadata for message in messages]  # the Grid gives them their ids as it sends them
    del pair  # the messages hold it
    replies = grid.send_and_receive(messages, timeout=settings.timeout)
    del messages
    record = final_model.delivery_record(replies, nodes, file_sha256(checkpoint), round_index, addressees(sent))
    atomic_write_bytes(out / final_model.DELIVERY_FILE, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    missing = {name: state for name, state in record["sites"].items() if state != final_model.SAVED}
    if missing:
        log.warning("final model (round %d) not saved by %s", round_index,
                    "; ".join(f"{name}: {state}" for name, state in missing.items()))
    log.info("final model (round %d) saved by %d of %d site(s)", round_index,
             len(record["sites"]) - len(missing), len(nodes))
    return record


def _site_dir(context: Context) -> Path:
    site_dir = context.node_config.get("site-dir")
    if not site_dir:
        raise InputError("--node-config", "this SuperNode has no site-dir: start it with "
                         "--node-config 'site-dir=\"/path/to/site\"'")
    return Path(str(site_dir))


@clientapp.evaluate(final_model.ACTION)
def site_save_final_model(msg: Message, context: Context) -> Message:
    """The run's final global model, saved where ``join`` saves its own (``SITE/models/global.safetensors``)."""
    return final_model.save_final_model(msg, _site_dir(context), context.run_id, context.node_id)


@clientapp.evaluate()
def site_evaluate(msg: Message, context: Context) -> Message:
    """Score the round's global pair on this site's held-out folder (node config ``eval-dir``), as ``join
    --eval`` does; a site without one answers that it scored nothing."""
    from fedmix_engine.evaluation import score_site
    from fedmix_engine.predict import Predictor

    site_dir = _site_dir(context)
    with SiteStore.open(site_dir, readonly=True) as store:
        site = store.config.name
    report = None
    held_out = context.node_config.get("eval-dir")
    if held_out:
        held_out = Path(str(held_out))
        config = parse_site_config(dict(msg.content.config_records[CONFIG]))
        pair = arrays_to_pair(msg.content.array_records[ARRAYS], None, "global pair from the SuperLink")
        with SiteStore.open(held_out, readonly=True) as store:
            check_site_fits_model(store, config.model, config.class_names)
            check_held_out(store, site_dir)
        predictor = Predictor(pair, config.model, config.train.image_size,
                              plan_device(str(context.node_config.get("device", "auto"))),
                              classes=config.class_names or None)
        report = EvaluationReport.from_scores(score_site(predictor, held_out))
    return Message(RecordDict({METRICS: evaluation_to_metrics(report), CONFIG: ConfigRecord({SITE_KEY: site})}),
                   reply_to=msg)


@clientapp.train()
def site_train(msg: Message, context: Context) -> Message:
    """One local round on this site's SiteStore with the engine's ``local_update``."""
    site_dir = _site_dir(context)
    raw = dict(msg.content.config_records[CONFIG])
    config = parse_site_config(raw)
    pair = arrays_to_pair(msg.content.array_records[ARRAYS], None, "global pair from the SuperLink")
    plan = plan_device(str(context.node_config.get("device", "auto")))
    with SiteStore.open(site_dir, readonly=True) as store, store.training_view() as view:
        site = store.config.name
        check_site_fits_model(store, config.model, config.class_names)
        data = load_site_tensors(view, config.train.image_size)
    models_dir = site_dir / "models"  # Adam moments, kept per run, never sent; advanced only by counted updates
    site_state.settle(models_dir, context.run_id, context.node_id, raw)
    result = local_update(pair, data, config.model, config.train, plan, site_state.load(models_dir, context.run_id),
                          seed=site_seed(config.seed, site), round_index=config.round)
    site_state.save_pending(models_dir, context.run_id, config.round, result.state)
    content = RecordDict({ARRAYS: pair_to_arrays(result.pair),
                          METRICS: report_to_metrics(UpdateReport.from_local(result.report)),
                          CONFIG: ConfigRecord({SITE_KEY: site})})
    return Message(content, reply_to=msg)
