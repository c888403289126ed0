"""``FedMixStrategy``: Flower's FedAvg driver loop with the engine's FedMix aggregation.

Flower's ``FedAvg`` samples nodes, sends the global pair and collects replies; only
``aggregate_train`` is replaced. It folds replies one at a time into the engine's
``StreamingAggregate`` (adaptive weights from each site's n_k and ℓ_k, or FedAvg), so the
arithmetic is exactly that of ``fedmix-engine serve`` and the simulator. Replies that failed
(``has_error``) or do not pass the built-in server's checks are left out of the round and
recorded with the reason; they never abort the run (the stock consistency check would).
``aggregate_evaluate`` pools the sites' held-out scores as the built-in server does (``pooled``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch

from fedmix_engine.errors import InputError
from fedmix_engine.federation.federated_evaluation import EvaluationReport, pooled
from fedmix_engine.federation.flower import FLWR_HINT
from fedmix_engine.federation.flower.records import (
    CONFIG,
    HELD_OUT_DICE,
    METRICS,
    NUM_EXAMPLES,
    arrays_to_pair,
    decode_reply,
    metrics_to_evaluation,
    pair_to_arrays,
)
from fedmix_engine.federation.flower.site_state import accepted_config
from fedmix_engine.federation.wire import UpdateReport, tensor_template
from fedmix_engine.fedmix.aggregation import StreamingAggregate
from fedmix_engine.fedmix.weights import AggregationRule

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg
except ImportError as exc:  # the [flower] extra is optional
    raise ImportError(FLWR_HINT) from exc

log = logging.getLogger(__name__)
SITE_KEY = "site"  # reply ConfigRecord field naming the site (for logs and weights; the node id is authoritative)


@dataclass
class RoundOutcome:
    """What one round did: the new pair, each contribution's weight and report, and what was refused."""

    round: int
    pair: dict[str, torch.Tensor] | None
    weights: dict[str, float]
    reports: dict[str, UpdateReport]
    refused: dict[str, str] = field(default_factory=dict)
    updates: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # only with keep_updates


@dataclass
class EvaluationOutcome:
    """What one round's federated evaluation gave: each site's held-out scores of the new global model."""

    round: int
    reports: dict[str, EvaluationReport]
    refused: dict[str, str] = field(default_factory=dict)
    without_held_out: list[str] = field(default_factory=list)  # sites that answered with nothing to score

    def to_dict(self) -> dict:
        return {"round": self.round, **pooled(self.reports),
                "sites": {name: report.to_dict() for name, report in sorted(self.reports.items())},
                "refused": self.refused, "without_held_out": sorted(self.without_held_out)}


def addressees(sent: Iterable[Metadata]) -> dict[str, int]:
    """Each instruction's message id → the node it was sent to, from the instructions' metadata (the Grid
    sets the id as it pushes them): for a reply that the SuperLink wrote in a node's place."""
    return {metadata.message_id: metadata.dst_node_id for metadata in sent if metadata.message_id}


def reply_node(message: Message, addressed: Mapping[str, int] | None = None) -> int:
    """The node a reply is about. A node that stops sending heartbeats is answered for by the SuperLink
    (a "Node Unavailable" error from node 1, the SuperLink itself, naming only the instruction): that
    reply is about the node the instruction went to, found in ``addressed`` (``addressees``)."""
    node = message.metadata.src_node_id
    if node == SUPERLINK_NODE_ID and addressed:
        return addressed.get(message.metadata.reply_to_message_id, node)
    return node


def contributor_name(message: Message, addressed: Mapping[str, int] | None = None) -> str:
    """``<site> (node <id>)`` when the reply names its site, else ``node <id>`` (``reply_node``)."""
    node = f"node {reply_node(message, addressed)}"
    if not message.has_error() and SITE_KEY in message.content.config_records.get(CONFIG, {}):
        return f"{message.content.config_records[CONFIG][SITE_KEY]} ({node})"
    return node


class FedMixStrategy(FedAvg):
    """FedAvg's sampling and messaging; FedMix's aggregation (``method``: fedmix, fedmix-fixed or fedavg)."""

    def __init__(self, global_pair: Mapping[str, torch.Tensor], rule: AggregationRule,
                 on_round: Callable[[RoundOutcome], None] | None = None, keep_updates: bool = False,
                 on_evaluate: Callable[[EvaluationOutcome], None] | None = None, class_names: tuple[str, ...] = (),
                 num_classes: int | None = None, loss: str | None = None, **fedavg_options) -> None:
        fedavg_options.setdefault("fraction_evaluate", 0.0)  # federated evaluation only when asked for
        fedavg_options.setdefault("min_evaluate_nodes", 1)  # FedAvg's 2 would wait for ever in a 1-site run
        super().__init__(**fedavg_options)
        self.on_evaluate = on_evaluate
        self.class_names, self.num_classes = class_names, num_classes  # what an evaluation must score
        self.rule = rule
        self.loss = loss  # the run's training loss: a reply reporting more than it can be is refused
        self.template = tensor_template(global_pair)
        self.reference: dict[str, torch.Tensor] = dict(global_pair)  # the pair this round's sites train from
        self.on_round = on_round
        self.keep_updates = keep_updates
        self.history: list[RoundOutcome] = []  # per round: weights, reports, refusals (no tensors)
        self.accepted: tuple[int, list[int]] = (0, [])  # the last round, and the nodes whose updates it aggregated
        self.sent: dict[str, list[Metadata]] = {"train": [], "evaluate": []}  # the last instructions (no records)

    @property
    def accepted_config(self) -> dict[str, str]:
        """What tells each site whether its last update counted, so its Adam moments advance only then
        (``site_state``); sent with every training round and with the final model."""
        return accepted_config(*self.accepted)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's, with the previous round's aggregated nodes named; and this round's global pair kept,
        so that a reply too far from it is refused."""
        self.reference = arrays_to_pair(arrays, self.template, "global model")
        messages = list(super().configure_train(server_round, arrays,
                                                ConfigRecord({**config, **self.accepted_config}), grid))
        self.sent["train"] = [message.metadata for message in messages]
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """FedAvg's, with the instructions' metadata kept to name the nodes the SuperLink answers for."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.sent["evaluate"] = [message.metadata for message in messages]
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        acc = StreamingAggregate(self.rule)
        reports: dict[str, UpdateReport] = {}
        refused: dict[str, str] = {}
        kept: dict[str, dict[str, torch.Tensor]] = {}
        nodes: list[int] = []
        addressed = addressees(self.sent["train"])
        for message in replies:
            name = contributor_name(message, addressed)
            if message.has_error():
                refused[name] = f"the site reported an error: {message.error.reason}"
                continue
            try:
                state, report = decode_reply(message.content, self.template, name, self.reference, self.loss)
                acc.add(name, state, report.n, report.loss)
            except InputError as exc:
                refused[name] = str(exc)
                continue
            reports[name] = report
            nodes.append(int(message.metadata.src_node_id))
            if self.keep_updates:
                kept[name] = state
            del state  # the accumulators hold what is needed; one decoded reply at a time
        for name, reason in refused.items():
            log.warning("round %d: left out %s", server_round, reason if reason.startswith(name) else
                        f"{name}: {reason}")
        pair = acc.result()
        self.accepted = (server_round, nodes)
        weights = acc.weights() if acc.sites else {}
        outcome = RoundOutcome(server_round, pair, weights, reports, refused, kept)
        if self.on_round is not None:
            self.on_round(outcome)
        self.history.append(replace(outcome, pair=None, updates={}))  # weights and reasons only: O(1) per round
        metrics = MetricRecord({"sites-aggregated": sum(1 for w in weights.values() if w > 0),
                                "sites-refused": len(refused),
                                "samples": int(sum(r.n for r in reports.values()))})
        if pair is None:  # nobody trained on anything: keep the previous global pair
            log.warning("round %d: no site trained on any sample; the global model is unchanged", server_round)
            return None, metrics
        return pair_to_arrays(pair), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The sites' held-out scores of this round's model, pooled by images (``pooled``); a malformed or
        failed reply is left out with its reason, a site without a held-out folder is listed."""
        if not self.sent["evaluate"]:  # fraction-evaluate 0: no site was asked, so there is nothing to record
            return None
        outcome = EvaluationOutcome(server_round, {})
        addressed = addressees(self.sent["evaluate"])
        for message in replies:
            name = contributor_name(message, addressed)
            if message.has_error():
                outcome.refused[name] = f"the site reported an error: {message.error.reason}"
                continue
            try:
                report = metrics_to_evaluation(message.content.metric_records.get(METRICS), name, self.class_names,
                                               self.num_classes)
            except InputError as exc:
                outcome.refused[name] = str(exc)
                continue
            if report is None:
                outcome.without_held_out.append(name)
            else:
                outcome.reports[name] = report
        for name, reason in outcome.refused.items():
            log.warning("round %d: evaluation of %s left out: %s", server_round, name, reason)
        if self.on_evaluate is not None:
            self.on_evaluate(outcome)
        if not outcome.reports:
            return None
        figures = pooled(outcome.reports)
        return MetricRecord({NUM_EXAMPLES: figures["images"], HELD_OUT_DICE: figures["dice"],
                             **{f"{HELD_OUT_DICE}-{label}": dice for label, dice in figures["classes"].items()}})
