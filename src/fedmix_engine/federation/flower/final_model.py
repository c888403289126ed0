"""The final global model, handed to every site at the end of a Flower run.

Flower sends a site only the pair it trains on, so without this step a Flower site would end the run
holding nothing to predict with, where a ``join`` site holds ``SITE/models/global.safetensors``. After
the last round the ServerApp sends the pair it saved as ``global.safetensors`` (with that checkpoint's
model config and metadata) to every connected SuperNode as an ``evaluate.final_model`` message. The
site checks it like a training reply (layout of the federation's model, finite values), writes it
where ``join`` writes its own (and a per-run copy), and answers with the SHA-256 of what it wrote.
The ServerApp records, per site, whether that file is byte for byte its own: ``final-delivery.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from fedmix_engine.atomic import atomic_write_bytes
from fedmix_engine.checkpoint import save_checkpoint
from fedmix_engine.data.site_store import SiteStore
from fedmix_engine.errors import InputError
from fedmix_engine.federation.client import check_site_fits_model
from fedmix_engine.federation.flower import FLWR_HINT, site_state
from fedmix_engine.federation.flower.records import ARRAYS, CONFIG, METRICS, arrays_to_pair, pair_to_arrays
from fedmix_engine.federation.flower.settings import FlowerRunSettings, parse_site_config
from fedmix_engine.federation.flower.strategy import SITE_KEY, contributor_name, reply_node
from fedmix_engine.federation.wire import tensor_template
from fedmix_engine.fedmix.pair import init_pair
from fedmix_engine.json_values import parse_json
from fedmix_engine.site_models import GLOBAL_MODEL

try:
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
except ImportError as exc:  # the [flower] extra is optional
    raise ImportError(FLWR_HINT) from exc

ACTION = "final_model"  # the ClientApp's route: @clientapp.evaluate(ACTION)
MESSAGE_TYPE = f"{MessageType.EVALUATE}.{ACTION}"
META_KEY = "fedmix-final-meta"  # the checkpoint's metadata (round, image size, classes, weights) as JSON
SHA256_KEY = "sha256"  # the site's reply: the digest of the file it wrote
DELIVERY_FILE = "final-delivery.json"
SAVED = "saved"


def final_model_messages(pair: Mapping[str, torch.Tensor], meta: dict[str, Any], settings: FlowerRunSettings,
                         nodes: Iterable[int], accepted: Mapping[str, str] | None = None) -> list[Message]:
    """One message per node carrying the final pair and what a site needs to save it as the server did
    (the checkpoint's metadata, the federation's model and classes), and ``accepted``: whose last
    updates counted (``site_state``)."""
    config = ConfigRecord({**settings.site_config(), "server-round": int(meta.get("round", 0)),
                           META_KEY: json.dumps(meta, sort_keys=True), **(accepted or {})})
    content = RecordDict({ARRAYS: pair_to_arrays(pair), CONFIG: config})
    return [Message(content=content, dst_node_id=node, message_type=MESSAGE_TYPE) for node in nodes]


def save_final_model(msg: Message, site_dir: Path, run_id: int, node_id: int) -> Message:
    """At a site: check the final pair, write ``SITE/models/global.safetensors`` and
    ``models/flower-run-<id>-round-NNNN.safetensors``, and answer with the digest written. A pair that is
    not the federation's model, or a site that does not fit it, is refused before anything is written."""
    raw = dict(msg.content.config_records[CONFIG])
    config = parse_site_config(raw)
    try:
        meta: dict[str, Any] = parse_json(str(raw[META_KEY]))
    except (KeyError, ValueError) as exc:
        raise InputError("final model from the SuperLink", f"no readable '{META_KEY}' ({exc})") from None
    with SiteStore.open(site_dir, readonly=True) as store:
        site = store.config.name
        check_site_fits_model(store, config.model, config.class_names)
    pair = arrays_to_pair(msg.content.array_records[ARRAYS], tensor_template(init_pair(config.model, 0)),
                          "final global model from the SuperLink")
    kept = save_checkpoint(site_dir / "models" / f"flower-run-{run_id}-round-{config.round:04d}.safetensors",
                           pair, config.model, meta)
    data = kept.read_bytes()
    atomic_write_bytes(site_dir / GLOBAL_MODEL, data)
    site_state.settle(site_dir / "models", run_id, node_id, raw)  # the last round's moments: counted or not
    content = RecordDict({METRICS: MetricRecord({"round": config.round}),
                          CONFIG: ConfigRecord({SITE_KEY: site, SHA256_KEY: hashlib.sha256(data).hexdigest()})})
    return Message(content, reply_to=msg)


def delivery_record(replies: Iterable[Message], nodes: Iterable[int], sha256: str, round_index: int,
                    addressed: Mapping[str, int] | None = None) -> dict:
    """What each site did with the final model: ``saved`` (the file it wrote is the server's, byte for
    byte), the error it reported (or the SuperLink reported for it: ``addressed``, see ``reply_node``),
    another digest, or ``no reply``."""
    sites: dict[str, str] = {}
    answered: set[int] = set()
    for reply in replies:
        answered.add(reply_node(reply, addressed))
        name = contributor_name(reply, addressed)
        if reply.has_error():
            sites[name] = f"not saved: {reply.error.reason}"
            continue
        written = reply.content.config_records.get(CONFIG, {}).get(SHA256_KEY)
        sites[name] = SAVED if written == sha256 else f"wrote a different file (sha256 {str(written)[:16]}…)"
    for node in sorted(set(nodes) - answered):
        sites[f"node {node}"] = "no reply"
    return {"round": round_index, "model_sha256": sha256, "sites": sites}
