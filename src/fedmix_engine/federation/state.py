"""The aggregation server's durable state: rounds, acknowledged uploads, completed global models.

State directory::

    state/
      server.json                 federation settings (model, training, rounds, quorum, λ, β)
      settings-changes.json       settings changed on restarts (e.g. more rounds), from which round
      federation-id               random id of this federation (sites keep their optimiser state under it)
      tokens.json                 hashed per-site tokens
      server.lock                 (Windows) held by the running server; on POSIX it locks the directory
      rounds/000000/              initial global pair
      rounds/000007/global.safetensors, meta.json    each completed round, committed by a directory rename
                                  (with keep_models K, older rounds' models are removed; their meta.json stays)
      current/<site>.safetensors  acknowledged uploads of the open round (fsynced before the 200)
      current/<site>.json         their reports and SHA-256
      current/opened.json         when the open round started (its deadline survives restarts)
      evaluations/000007/<site>.json  a site's scores of round 7's global model on its held-out images

An upload is acknowledged only after its file and report are durable, so a server killed at any
moment restarts with every acknowledged upload. A round is committed by renaming a complete
directory into place, then the uploads are removed; a crash in between is detected on restart
(the round exists, the leftovers are discarded).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmix_engine.atomic import atomic_write_bytes, make_folder
from fedmix_engine.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from fedmix_engine.config_diff import changed_fields
from fedmix_engine.data.site_store import check_class_names
from fedmix_engine.dice_text import dice_text
from fedmix_engine.errors import InputError, SettingsDiffer, first_names
from fedmix_engine.federation.federated_evaluation import EvaluationReport, pooled
from fedmix_engine.federation.tokens import TOKENS_FILE, TOKENS_LOCK, TokenStore
from fedmix_engine.federation.wire import LazyUpdate, tensor_template, validate_update_file
from fedmix_engine.fedmix.aggregation import AggregationRule, StreamingAggregate
from fedmix_engine.fedmix.local_update import TrainConfig, shown_loss
from fedmix_engine.fedmix.pair import PairState, init_pair
from fedmix_engine.model import ModelConfig
from fedmix_engine.seeds import check_seed
from fedmix_engine.strict_json import strict_dumps

log = logging.getLogger(__name__)
# writes the machine refuses, with the HTTP status a site gets (it retries any 5xx) and what the admin must do;
# said in one line and on the admin page, not a traceback per retry: they are the storage's state, not a bug
FREE_SPACE = (507, "free space in the state directory")
STORAGE_FAULTS = {
    errno.ENOSPC: FREE_SPACE, errno.EDQUOT: FREE_SPACE, errno.EFBIG: FREE_SPACE,  # the disk, a quota, a size limit
    errno.EROFS: (503, "the file system is read-only (remounted so after disk errors?): check the disk, remount it"),
    errno.EIO: (503, "the disk reports I/O errors: check it"),
    errno.EACCES: (503, "the server's user may not write there: fix the owner or the permissions"),
    errno.EPERM: (503, "the server's user may not write there: fix the owner or the permissions"),
}
CONFIG_FILE = "server.json"
GLOBAL_FILE = "global.safetensors"  # in a round's folder: the global pair it produced
CHANGES_FILE = "settings-changes.json"  # what each restart changed, from which round: the run's provenance
ID_FILE = "federation-id"  # sites keep their Adam moments per federation under this id
SERVER_LOCK = "server.lock"  # Windows: the running server's lock file (on POSIX it flocks the directory)
EVALUATIONS = "evaluations"  # <round>/<site>.json: the sites' held-out scores of that round's global model

# What an admin may change when restarting a federation: how long it runs, with how many sites, how
# long a round waits and how large an update may be. What every site trains and how updates are
# weighed stay fixed: changing them mid-way would mix two experiments in one round history.
ADJUSTABLE = ("sites", "min_sites", "round_timeout", "rounds", "max_upload_mb", "keep_models")


def parse_class_names(text: str) -> tuple[str, ...]:
    """``"lesion, cyst"`` → ``("lesion", "cyst")``: how ``--class-names`` and Flower's ``class-names`` are written."""
    return tuple(name.strip() for name in text.split(","))


@dataclass(frozen=True)
class ServerConfig:
    """Everything every site must agree on, stored when the state directory is created (a restart may change
    only ``ADJUSTABLE``)."""

    sites: int = 3
    min_sites: int = 2
    round_timeout: float = 600.0
    rounds: int = 10
    method: str = "fedmix"
    lam: float = 10.0
    beta: float = 1.5
    seed: int = 0
    max_upload_mb: float = 512.0
    # rounds whose global model stays on disk: the last K (and the one the sites' held-out scores rate best so
    # far); 0: every round's. Each round's record stays. A pair at the reference width is 138 MB a round.
    keep_models: int = 0
    model: ModelConfig = field(default_factory=lambda: ModelConfig(base_width=16))
    train: TrainConfig = field(default_factory=TrainConfig)
    # the classes in label order: label k must mean the same class at every site, so a site whose names
    # or order differ is refused at joining (empty: only the count is checked, as before names were stored)
    class_names: tuple[str, ...] = ()

    def validate(self) -> None:
        """Refuse bad settings, each named by its field (``min_sites``); a front end names it as its user
        typed it (``--min-sites``, Flower's ``min-sites``)."""
        for name in ("sites", "rounds", "round_timeout", "max_upload_mb"):
            if not getattr(self, name) > 0:
                raise InputError(name, f"must be positive, not {getattr(self, name)}")
        if self.max_upload_mb == math.inf:  # a limit in bytes: int(inf) ended the server's start in a traceback
            raise InputError("max_upload_mb", "must be a finite number of MB, not inf")
        if not (isinstance(self.keep_models, int) and self.keep_models >= 0):
            raise InputError("keep_models", f"must be a whole number ≥ 0 (0: every round's model), not "
                                            f"{self.keep_models}")
        check_seed(self.seed)
        if not 1 <= self.min_sites <= self.sites:
            raise InputError("min_sites", f"need 1 ≤ min-sites ({self.min_sites}) ≤ sites ({self.sites})")
        AggregationRule.for_method(self.method, self.lam, self.beta)
        self.model.validate()
        self.train.validate()
        if self.class_names and (len(self.class_names) != self.model.num_classes
                                 or len(set(self.class_names)) != len(self.class_names) or not all(self.class_names)):
            raise InputError("class_names", f"{', '.join(self.class_names) or '(none)'}: give the model's "
                                            f"{self.model.num_classes} class(es), each once, in label order")
        if self.class_names:  # as a site names its classes: a name no site may have ('background') admits no site
            check_class_names(self.class_names, "class_names")

    def checkpoint_meta(self, round_index: int) -> dict[str, Any]:
        """What a global checkpoint of this federation carries besides its weights: the size its images were
        trained at (prediction resizes to it) and, when fixed, the label names (DICOM SEG segments)."""
        meta: dict[str, Any] = {"round": round_index, "image_size": self.train.image_size}
        if self.class_names:
            meta["classes"] = list(self.class_names)
        return meta

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        """server.json's text: strict JSON, which has no Infinity, so ``--round-timeout inf`` (no deadline)
        is written as null (jq, a browser, a monitoring script read it)."""
        return (strict_dumps(self.to_dict(), indent=2) + "\n").encode()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ServerConfig:
        raw = dict(raw)
        if "round_timeout" in raw and raw["round_timeout"] is None:  # null: no deadline (see to_json)
            raw["round_timeout"] = math.inf
        model = ModelConfig.from_dict(raw.pop("model"))
        train = TrainConfig(**raw.pop("train"))
        names = tuple(raw.pop("class_names", ()))  # JSON gives a list; a server.json from before names: none
        return cls(**raw, model=model, train=train, class_names=names)


@dataclass(frozen=True)
class Outcome:
    """Result of an upload: HTTP status and a sentence for the site's operator."""

    status: int
    message: str
    round_closed: bool = False


def setting_changes(stored: ServerConfig, new: ServerConfig) -> tuple[list[tuple[str, Any, Any]],
                                                                       list[tuple[str, Any, Any]]]:
    """The settings that differ, each as (name, stored, new), split into (adjustable, fixed)."""
    changes = changed_fields(stored.to_dict(), new.to_dict())
    return [c for c in changes if c[0] in ADJUSTABLE], [c for c in changes if c[0] not in ADJUSTABLE]


def load_server_config(path: Path) -> ServerConfig:
    """A state directory's server.json, or an error naming it."""
    try:
        return ServerConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InputError(path, f"unreadable federation settings ({type(exc).__name__}: {exc})") from None


class ServerState:
    """Single source of truth for rounds; every method is safe to call from several threads."""

    def __init__(self, root: str | Path, config: ServerConfig | None = None, clock=time.time):
        self.root = Path(root)
        self._clock = clock
        self._lock = threading.RLock()
        self.close_failure: dict[str, Any] | None = None  # why the open round, due to close, is not closed yet
        config_path = self.root / CONFIG_FILE
        self.adjusted: list[str] = []  # settings this start changed ('rounds: 10 → 20'), for the admin
        self.changes = read_settings_changes(self.root)
        if config_path.exists():
            stored = load_server_config(config_path)
            self.config = stored
            if config is not None and config != stored:
                self._adjust(stored, config, config_path)
        else:
            if config is None:
                raise InputError(self.root, "not a server state directory (no server.json); start 'serve' with "
                                 "the federation settings to create one")
            refuse_foreign_folder(self.root)
            config.validate()
            self.config = config
            initial = init_pair(config.model, config.seed)  # before anything is written: it probes another network
            make_folder(self.root / "rounds")
            self._commit_round(0, initial, {"round": 0, "reason": "initial"})
            atomic_write_bytes(config_path, config.to_json())
        self.rule = AggregationRule.for_method(self.config.method, self.config.lam, self.config.beta)
        self.federation_id = self._federation_id()
        self.current_dir = self.root / "current"
        self.current_dir.mkdir(exist_ok=True)
        self.evaluations_dir = self.root / EVALUATIONS
        self.tokens = TokenStore(self.root)  # read only: which sites the open round may still hear from
        self._recover()

    def _adjust(self, stored: ServerConfig, config: ServerConfig, config_path: Path) -> None:
        """Take changed adjustable settings (e.g. more rounds for a finished federation); refuse the rest,
        naming each, before anything is written."""
        adjustable, fixed = setting_changes(stored, config)
        if fixed:
            raise SettingsDiffer(config_path, lambda name: (
                "these settings are fixed for the life of a federation ("
                f"{'; '.join(f'{name(key)}: {was} → {now}' for key, was, now in fixed)}); leave them out to resume "
                f"it, or use a new --state directory for a new one (adjustable on a restart: "
                f"{', '.join(map(name, ADJUSTABLE))})"))
        config.validate()
        adjusted = [f"{key}: {was} → {now}" for key, was, now in adjustable]  # for the record and the admin
        done = self._completed_rounds()[-1]
        if config.rounds < done:
            raise InputError("--rounds", f"the federation has completed {done} rounds; give --rounds {done} or more")
        # the record first: a crash before server.json is replaced repeats a change, never hides one
        record = {"from_round": done + 1, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": adjusted}
        changes = [*self.changes, record]
        atomic_write_bytes(self.root / CHANGES_FILE, (json.dumps(changes, indent=2) + "\n").encode())
        atomic_write_bytes(config_path, config.to_json())
        self.config, self.adjusted, self.changes = config, adjusted, changes

    def _federation_id(self) -> str:
        """This federation's id, made on first start (also for a state directory from before ids)."""
        path = self.root / ID_FILE
        if not path.exists():
            atomic_write_bytes(path, uuid.uuid4().hex.encode())
        return read_federation_id(self.root)

    # ------------------------------------------------------------------ recovery
    def _completed_rounds(self) -> list[int]:
        for path in (self.root / "rounds").glob("*.tmp"):
            shutil.rmtree(path, ignore_errors=True)  # a commit interrupted before its rename
        return completed_rounds(self.root)

    def _recover(self) -> None:
        completed = self._completed_rounds()
        self.last_round = completed[-1]
        self._history = read_history(self.root, completed)
        if not self.global_path().exists():  # every other round's may be removed (keep_models), never this one
            newest = self.round_dir(self.last_round)
            raise InputError(self.global_path(), f"the newest round's global model is missing: restore it from a "
                                                 f"backup, or move {newest} (and evaluations/{newest.name}) out of the "
                                                 "state directory and the server runs that round again")
        self.template = tensor_template(self.global_pair(self.last_round))
        self.uploads: dict[str, dict] = {}
        opened_at = _opened_at(self.root, self.current_round)
        if opened_at is not None:
            self.opened_at = opened_at
        else:
            self._open_round()
        for report_file in sorted(self.current_dir.glob("*.json")):
            if report_file.name == "opened.json":
                continue
            info = _upload_report(report_file)
            weights = self.current_dir / f"{report_file.stem}.safetensors"
            this_round = info is not None and info["round"] == self.current_round
            if this_round and weights.exists() and file_sha256(weights) == info["sha256"]:
                self.uploads[report_file.stem] = info
                continue
            if info is None or this_round:  # acknowledged, then damaged on disk: said; the site sends it again
                log.warning("round %d: %s's acknowledged update is damaged on disk (%s or its .safetensors); it "
                            "does not count and is removed: the site trains the round again and sends a new one",
                            self.current_round, report_file.stem, report_file)
            # else left over from a committed round (a crash while its files were removed)
            report_file.unlink()
            weights.unlink(missing_ok=True)
        for stray in self.current_dir.glob("*.safetensors"):
            if stray.stem not in self.uploads:
                stray.unlink()
        self._evaluations = read_evaluations(self.root)
        self._remove_old_models()  # a restart with a smaller --keep-models frees the space now
        self._leave_out_revoked()
        if not self.finished and len(self.uploads) >= self.config.sites:
            self._close_round("all sites had reported before a restart")

    def _leave_out_revoked(self) -> None:
        """Drop the open round's updates of sites whose token has been revoked since they sent them: an admin
        revokes a site whose data or machine cannot be trusted, and its update still went into the round (and
        counted towards closing it). The record goes first: a crash in between leaves a stray model file,
        which recovery removes."""
        try:
            revoked = {site for site, entry in self.tokens.sites().items() if entry.get("revoked")}
        except (InputError, OSError):  # a damaged or unreadable token file: every request is refused until fixed
            return
        for site in sorted(revoked & set(self.uploads)):
            log.warning("round %d: %s's update is left out: its token was revoked", self.current_round, site)
            (self.current_dir / f"{site}.json").unlink(missing_ok=True)
            (self.current_dir / f"{site}.safetensors").unlink(missing_ok=True)
            del self.uploads[site]

    def _open_round(self) -> None:
        self.opened_at = self._clock()
        try:
            atomic_write_bytes(self.current_dir / "opened.json",
                               json.dumps({"round": self.current_round, "opened_at": self.opened_at}).encode())
        except OSError as exc:  # the round is open all the same; only a restart's deadline depends on the file
            log.warning("round %d is open, but when it opened could not be saved (%s): after a restart its "
                        "deadline would start again", self.current_round, exc)

    # ------------------------------------------------------------------ queries
    @property
    def current_round(self) -> int:
        return self.last_round + 1

    @property
    def finished(self) -> bool:
        return self.last_round >= self.config.rounds

    @property
    def deadline(self) -> float:
        return self.opened_at + self.config.round_timeout

    def round_dir(self, r: int) -> Path:
        return round_dir(self.root, r)

    def global_path(self, r: int | None = None) -> Path:
        return round_dir(self.root, self.last_round if r is None else r) / GLOBAL_FILE

    def global_pair(self, r: int) -> PairState:
        return load_checkpoint(self.global_path(r))[0]

    def history(self) -> list[dict]:
        with self._lock:
            return list(self._history)

    def latest_global(self) -> tuple[Path, int]:
        """The newest committed global model and its round (what sites train from)."""
        with self._lock:
            return self.global_path(), self.last_round

    def round_info(self, site: str) -> dict[str, Any]:
        """What a polling site needs; cheap (no history sent). ``last_accepted``: the newest round whose
        update from this site the server took (None: none), so a restarted site knows whether the update it
        sent before it died counted, and settles its optimiser's moments accordingly (``pending_state``).
        ``held_up``: why the round, due to close, cannot be (a full disk), so a waiting site says that rather
        than that it waits for the other sites."""
        with self._lock:
            taken = [meta["round"] for meta in self._history if site in meta["sites"]]
            last_accepted = self.current_round if site in self.uploads else (taken[-1] if taken else None)
            return {"round": None if self.finished else self.current_round, "last_round": self.last_round,
                    "finished": self.finished, "uploaded": site in self.uploads, "last_accepted": last_accepted,
                    "deadline_in": None if self.finished else round(self.deadline - self._clock(), 1),
                    "held_up": self.close_failure["reason"] if self.close_failure else None}

    def status(self) -> dict[str, Any]:
        with self._lock:
            history = self.history()
            return {
                "api": "v1", "round": None if self.finished else self.current_round, "last_round": self.last_round,
                "rounds": self.config.rounds, "finished": self.finished, "sites_expected": self.config.sites,
                "min_sites": self.config.min_sites, "uploaded": sorted(self.uploads),
                **open_round(None if self.finished else self.opened_at, self._clock(), self.config.round_timeout,
                             sorted(self.uploads), _token_sites(self.tokens), history),
                "method": self.config.method, "lam": self.config.lam, "beta": self.config.beta,
                "history": history, "settings_changes": self.changes, "evaluations": self.evaluations(),
                "close_failure": self.close_failure,
            }

    def evaluations(self) -> list[dict[str, Any]]:
        """Per global model the sites scored: its round, the pooled figures and each site's report."""
        with self._lock:
            return evaluation_summaries(self._evaluations)

    def accept_evaluation(self, site: str, round_number: int, raw: Any) -> Outcome:
        """Record a site's scores of round ``round_number``'s global model on its held-out images; a site
        that scores a model again (after a restart) replaces its earlier report."""
        try:
            report = EvaluationReport.from_dict(raw, self.config.class_names, self.config.model.num_classes)
        except InputError as exc:
            return Outcome(422, f"evaluation refused: {exc}")
        with self._lock:
            if not 0 <= round_number <= self.last_round:
                return Outcome(409, f"round {round_number} has no global model to evaluate (the newest is round "
                                    f"{self.last_round})")
            folder = self.evaluations_dir / f"{round_number:06d}"
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(folder / f"{site}.json", json.dumps(report.to_dict()).encode())
            self._evaluations.setdefault(round_number, {})[site] = report
            return Outcome(200, f"evaluation of round {round_number}'s model recorded: Dice "
                                f"{dice_text(report.dice, report.class_dice())} on {report.images} images")

    # ------------------------------------------------------------------ uploads
    def accept_upload(self, site: str, round_number: int, body: Path) -> Outcome:
        """Validate a received body and make it count; ``body`` is consumed (moved or deleted)."""
        try:
            with self._lock:
                if self.finished:
                    return Outcome(409, f"the federation has finished ({self.config.rounds} rounds); nothing to upload")
                if round_number < self.current_round:
                    return Outcome(409, f"round {round_number} is closed (the server is at round "
                                   f"{self.current_round}){self._closed_without(site, round_number)}; download the "
                                   "new global model and train again")
                if round_number > self.current_round:
                    return Outcome(409, f"round {round_number} is not open; the open round is {self.current_round}")
                sha = file_sha256(body)
                if site in self.uploads:
                    if self.uploads[site]["sha256"] == sha:
                        log.info("round %d, %s: a resend of its accepted update (harmless)", round_number, site)
                        return Outcome(200, f"already accepted for round {round_number} (retry is harmless)")
                    return Outcome(409, f"site '{site}' already uploaded a different update for round "
                                   f"{round_number}; one update per site per round: two joins are using this "
                                   "site's token")
                try:
                    report = validate_update_file(body, self.template, LazyUpdate(self.global_path()),
                                                  self.config.train.loss)
                except InputError as exc:
                    return Outcome(422, f"update refused: {exc}")
                target = self.current_dir / f"{site}.safetensors"
                os.replace(body, target)
                info = {"site": site, "round": round_number, "sha256": sha, "received_at": self._clock(),
                        **json.loads(report.to_json())}
                try:
                    atomic_write_bytes(self.current_dir / f"{site}.json", json.dumps(info).encode())
                except OSError:  # not acknowledged, so not kept: a full disk gets its space back
                    target.unlink(missing_ok=True)
                    raise
                self.uploads[site] = info
                # logged here, before a close it may trigger: the admin's journal read 'round 1 closed' first
                log.info("round %d, %s: accepted for round %d (n=%d, loss %s)", round_number, site, round_number,
                         report.n, shown_loss(report.n, report.loss))
                self._leave_out_revoked()  # revoked since the last poll: not counted towards closing the round
                if len(self.uploads) < self.config.sites:
                    return Outcome(200, f"accepted for round {round_number}")
                try:
                    self._close("every expected site reported")
                except OSError as exc:  # the update is kept and counts; close_if_due retries the close
                    log.error("round %d: every expected site reported, but the round could not be closed (%s); "
                              "retrying until it can", round_number, exc)
                    return Outcome(200, f"accepted for round {round_number}")
                return Outcome(200, f"accepted for round {round_number}", True)
        finally:
            body.unlink(missing_ok=True)

    def _closed_without(self, site: str, round_number: int) -> str:
        """Why a round closed before a site's update came: the expected number of sites had uploaded (a site
        that is always last is left out of every round while --sites is below the number of sites)."""
        meta = next((m for m in self._history if m["round"] == round_number), None)
        if meta is None or not meta["reason"].startswith("every expected site"):
            return ""
        counted = ", ".join(sorted(meta["sites"]))
        return (f": it closed when the {len(meta['sites'])} expected sites had uploaded ({counted}), before {site}; "
                "if every site should count, the server's admin raises --sites")

    def close_if_due(self) -> bool:
        """Close the open round at its deadline if at least ``min_sites`` have reported, and at once if every
        expected site has: a close that failed when the last site uploaded (a full disk) is retried here,
        since no further upload will come to trigger it."""
        with self._lock:
            if self.finished:
                return False
            self._leave_out_revoked()
            if len(self.uploads) >= self.config.sites:
                self._close("every expected site reported")
                return True
            if self._clock() < self.deadline or len(self.uploads) < self.config.min_sites:
                return False
            self._close(f"deadline passed with {len(self.uploads)} of {self.config.sites} sites")
            return True

    def _close(self, reason: str) -> None:
        """Close the open round; a failure (a full disk) is kept for the admin page and ``/v1/status`` until
        a later attempt succeeds."""
        try:
            self._close_round(reason)
        except OSError as exc:
            since = self.close_failure["since"] if self.close_failure else self._clock()
            self.close_failure = {"round": self.current_round, "error": str(exc), "since": since,
                                  "reason": exc.strerror or type(exc).__name__,  # for the sites: no path
                                  "advice": STORAGE_FAULTS.get(exc.errno, (500, "see the server's log"))[1]}
            raise
        self.close_failure = None

    # ------------------------------------------------------------------ aggregation
    def _close_round(self, reason: str) -> None:
        acc = StreamingAggregate(self.rule)
        for site in sorted(self.uploads):  # fixed order: results do not depend on arrival order
            info = self.uploads[site]
            acc.add(site, LazyUpdate(self.current_dir / f"{site}.safetensors"), info["n"], info["loss"])
        new = acc.result() or self.global_pair(self.last_round)
        weights = acc.weights()
        meta = {"round": self.current_round, "reason": reason, "closed_at": self._clock(),
                "sites": {s: {"n": i["n"], "loss": i["loss"], "weight": weights[s], "counts": i.get("counts", {}),
                              "metrics": i.get("metrics", {})} for s, i in self.uploads.items()}}
        self._commit_round(self.current_round, new, meta)
        log.info("round %d closed (%s): weights %s", self.current_round, reason,
                 ", ".join(f"{s} {w:.2f}" for s, w in sorted(weights.items())) or "none (no site trained)")
        self._history.append(meta)
        self.last_round += 1
        self.uploads = {}  # before the files go: a failed delete must not leave them to count in the next round
        for path in self.current_dir.iterdir():
            path.unlink()
        self._remove_old_models()
        if not self.finished:
            self._open_round()
        else:
            log.info("federation finished after %d rounds; final model: %s", self.last_round, self.global_path())

    def _remove_old_models(self) -> None:
        """With ``keep_models`` K: delete the global models of rounds before the last K, except the one the
        sites' held-out scores rate best so far. Their records (meta.json) stay, so the history is whole."""
        keep = self.config.keep_models
        if not keep:
            return
        scored = {r: pooled(by_site)["dice"] for r, by_site in self._evaluations.items() if r <= self.last_round}
        scored = {r: dice for r, dice in scored.items() if dice is not None}
        best = max(scored, key=lambda r: (scored[r], r)) if scored else None
        for r in range(0, self.last_round - keep + 1):
            model = self.global_path(r)
            if r != best and model.exists():
                try:
                    model.unlink()
                except OSError as exc:  # space is not freed, nothing else: said, tried again next round
                    log.warning("round %d's model could not be removed (--keep-models %d): %s", r, keep, exc)
                else:
                    log.info("round %d's model removed (--keep-models %d keeps the last %d)", r, keep, keep)

    def _commit_round(self, r: int, pair: PairState, meta: dict) -> None:
        final = self.round_dir(r)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            save_checkpoint(tmp / GLOBAL_FILE, pair, self.config.model, self.config.checkpoint_meta(r))
            atomic_write_bytes(tmp / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
            os.replace(tmp, final)
        except BaseException:  # nothing committed; a half-written model would hold a full disk's last space
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with contextlib.suppress(OSError):
            fd = os.open(final.parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


# ---------------------------------------------------------------------- reading a state directory
# what a folder may hold before a federation starts in it: the tokens made for it ('token add' comes first)
_BEFORE_A_FEDERATION = {TOKENS_FILE, TOKENS_LOCK, SERVER_LOCK}


def refuse_foreign_folder(root: Path) -> None:
    """A new federation starts in a new or empty folder: 'serve --state' given a site folder, a simulate
    run or a --state one level too high (/srv/fedmix for /srv/fedmix/state) started one there, beside the
    patient images or beside the real federation, whose sites then met a new federation and model. The
    first 'token add' (before any serve) is held to the same rule: it wrote tokens.json there."""
    if (root / CONFIG_FILE).exists():
        return
    held = sorted(p.name for p in root.iterdir() if p.name not in _BEFORE_A_FEDERATION
                  and not p.name.startswith(".")) if root.is_dir() else []
    if held:
        raise InputError(root, f"is not a server state directory (no server.json) and not empty "
                               f"({first_names(held, 4)}): to "
                               "resume a federation, give the folder that holds its server.json; to start one, "
                               "give a new or empty folder (it may hold the sites' tokens)")


def round_dir(root: Path, r: int) -> Path:
    """Round ``r``'s folder in a state directory (0: the initial model)."""
    return root / "rounds" / f"{r:06d}"


def _active_sites(tokens: TokenStore) -> list[str]:
    return sorted(site for site, entry in tokens.sites().items() if not entry.get("revoked"))


def fewer_sites_than_expected(tokens: TokenStore, config: ServerConfig) -> str | None:
    """What to tell the admin when fewer sites hold tokens than a round waits for (None: enough, or none at
    all, which serve says otherwise): every round waits for its deadline, or, below the quorum, never closes.
    Not said at ``token add``, where it holds until the last site's token is made."""
    active = _active_sites(tokens)
    if not active or len(active) >= config.sites:
        return None
    if len(active) < config.min_sites:
        return (f"only {len(active)} site(s) hold tokens ({', '.join(active)}) and a round needs at least "
                f"{config.min_sites} (--min-sites {config.min_sites}): no round can close until more sites have "
                "tokens ('token add'), or serve is restarted with a lower --min-sites")
    return (f"{len(active)} sites hold tokens ({', '.join(active)}) and a round waits for {config.sites} (--sites "
            f"{config.sites}): every round waits for its deadline ({config.round_timeout:g} s) before it closes "
            f"with {len(active)}; restart serve with --sites {len(active)}, or add the other sites' tokens")


def more_sites_than_expected(tokens: TokenStore, config: ServerConfig) -> str | None:
    """What to tell the admin when more sites hold tokens than a round expects: a round closes as soon as
    ``--sites`` have uploaded, so the slowest site (often the one with the most images, or with masks) is
    left out of every round, and only its 409s said so; None when the numbers agree."""
    active = _active_sites(tokens)
    if len(active) <= config.sites:
        return None
    return (f"{len(active)} sites hold tokens ({', '.join(active)}), but a round closes as soon as {config.sites} "
            f"{'has' if config.sites == 1 else 'have'} uploaded (--sites {config.sites}): the slowest is left out "
            "of every round; restart serve with "
            f"--sites {len(active)} (it may change on a restart), or revoke the token of a site that no longer "
            "takes part")


def site_count_mismatch(tokens: TokenStore, config: ServerConfig, fewer: bool = True) -> str | None:
    """More sites with tokens than a round waits for, or (``fewer``) fewer: what to tell the admin, or None."""
    return more_sites_than_expected(tokens, config) or (fewer_sites_than_expected(tokens, config) if fewer else None)


def space_shortfall(root: Path, config: ServerConfig, last_round: int) -> str | None:
    """Why the rounds to come will not fit on the state directory's disk, or None: every round keeps its
    global model (a pair at the reference width is 138 MB: 100 rounds, 14 GB) and the open round holds an
    upload per site. ``serve`` says it at the start and ``status`` every time, rather than the disk filling
    mid-federation, when the server must refuse uploads until space is freed."""
    model = (round_dir(root, last_round) / GLOBAL_FILE).stat().st_size
    rounds_left = max(0, config.rounds - last_round)
    kept = min(rounds_left, config.keep_models + 1) if config.keep_models else rounds_left  # + the best-scored
    need = model * (kept + config.sites)
    free = shutil.disk_usage(root).free
    if rounds_left == 0 or need <= free:
        return None
    fewer = "" if config.keep_models else ", or keep fewer rounds' models (--keep-models K)"
    return (f"the {rounds_left} round(s) to come keep a global model of {_size(model)} each"
            f"{f' (the last {config.keep_models} of them)' if config.keep_models else ''} and, with the sites' "
            f"uploads, need up to {_size(need)}; the disk of {root} has {_size(free)} free: free space or move the "
            f"state directory to a larger disk now{fewer} (when the disk is full, the server refuses uploads until "
            "space is freed)")


def _size(n: float) -> str:
    unit, scale = next(((u, f) for u, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if n >= f), ("bytes", 1))
    return f"{n / scale:.1f} {unit}" if scale > 1 else f"{n:.0f} {unit}"


def completed_rounds(root: Path) -> list[int]:
    """The committed rounds (0: the initial model), read only. A round is committed by renaming its complete
    directory into place, so its record says so; its model may have been removed since (``keep_models``)."""
    return sorted(int(p.name) for p in (root / "rounds").iterdir() if p.name.isdigit()
                  and (p / "meta.json").exists())


def read_history(root: Path, completed: list[int]) -> list[dict[str, Any]]:
    """Each completed round's record (``meta.json``: reason, weights, n, ℓ per site); a damaged one is named
    with what to do, not read as a history the sites' clients and the admin page would trip over."""
    return [_round_record(round_dir(root, r) / "meta.json", r, newest=r == completed[-1])
            for r in completed if r > 0]


def _round_record(path: Path, round_number: int, newest: bool) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
        sites = meta.get("sites") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or meta.get("round") != round_number or not isinstance(meta.get("reason"), str):
            raise ValueError(f"not the record of round {round_number}")
        if not isinstance(sites, dict) or not all(
                isinstance(i, dict) and all(isinstance(i.get(k), int | float) for k in ("n", "loss", "weight"))
                for i in sites.values()):
            raise ValueError("its sites lack n, loss or weight")
    except ValueError as exc:  # JSON and UTF-8 decoding errors are ValueErrors too
        again = (f"; or move rounds/{path.parent.name} and evaluations/{path.parent.name} (if there) out of the state "
                 f"directory, and the server runs round {round_number} again from round {round_number - 1}'s model"
                 if newest else "")
        raise InputError(path, f"damaged round record ({exc}): restore it from a backup of the state "
                               f"directory{again}") from None
    return meta


def read_settings_changes(root: Path) -> list[dict[str, Any]]:
    """``settings-changes.json`` (``[]`` before any change), or an error naming it. It is only the run's
    provenance, so moving it away loses no training."""
    path = root / CHANGES_FILE
    if not path.exists():
        return []
    try:
        changes = json.loads(path.read_text())
        if not isinstance(changes, list) or not all(
                isinstance(c, dict) and isinstance(c.get("from_round"), int) and isinstance(c.get("at"), str)
                and isinstance(c.get("changes"), list) for c in changes):
            raise ValueError("not a list of records with from_round, at and changes")
    except ValueError as exc:
        raise InputError(path, f"damaged record of changed settings ({exc}): restore it from a backup, or move it "
                               "out of the state directory (it only records what earlier restarts changed)") from None
    return changes


def read_federation_id(root: Path) -> str | None:
    """The federation's id (None: a state directory from before ids). The server only ever writes a
    uuid4's 32 hex digits, and the sites name their optimiser state by it, so anything else is damage: a
    shortened id would silently start every site's optimiser afresh; a garbled one would stop every site."""
    path = root / ID_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text().strip()
    except ValueError:
        text = None
    if text is None or not re.fullmatch(r"[0-9a-f]{32}", text):
        raise InputError(path, "damaged federation id (not 32 hex digits): restore it from a backup; or delete it, "
                               "and the federation gets a new id: every site's optimiser then starts afresh at its "
                               "next round (only Adam's moments are lost)")
    return text


def _upload_report(path: Path) -> dict[str, Any] | None:
    """An acknowledged upload's report (``current/<site>.json``); None when it is not one."""
    try:
        info = json.loads(path.read_text())
    except ValueError:
        return None
    fields = {"round": int, "sha256": str, "n": int, "loss": int | float}
    ok = isinstance(info, dict) and all(isinstance(info.get(k), t) for k, t in fields.items())
    return info if ok else None


def read_evaluations(root: Path) -> dict[int, dict[str, EvaluationReport]]:
    """The sites' held-out scores per round; a file that is not a report (a hand edit) is named."""
    found: dict[int, dict[str, EvaluationReport]] = {}
    for path in sorted((root / EVALUATIONS).glob("[0-9]*/*.json")):  # each written atomically
        try:
            report = EvaluationReport.from_dict(json.loads(path.read_text()))
        except (ValueError, InputError) as exc:
            raise InputError(path, f"not an evaluation report ({exc}); move it out of the state directory "
                                   "to start") from None
        found.setdefault(int(path.parent.name), {})[path.stem] = report
    return found


def evaluation_summaries(evaluations: dict[int, dict[str, EvaluationReport]]) -> list[dict[str, Any]]:
    """Per round: the pooled figures (classes named as the first site in name order names them) and each
    site's report."""
    out = []
    for r, by_site in sorted(evaluations.items()):
        ordered = dict(sorted(by_site.items()))
        out.append({"round": r, **pooled(ordered), "sites": {s: e.to_dict() for s, e in ordered.items()}})
    return out


def open_round(opened_at: float | None, now: float, round_timeout: float, uploaded: list[str],
               sites: dict[str, dict] | None, history: list[dict]) -> dict[str, Any]:
    """Why a round is still open, for its admin: for how long (``open_for``, s), when its deadline falls
    (``deadline_in``, s; negative once passed), and which sites with a token (not revoked) have not uploaded
    to it (``not_uploaded``), each with the last round it took part in (None: none yet). All None for a
    finished federation (``opened_at`` None); ``not_uploaded`` None when the tokens could not be read."""
    if opened_at is None:
        return {"open_for": None, "deadline_in": None, "not_uploaded": None}
    last_round = {site: meta["round"] for meta in history for site in meta["sites"]}
    missing = None if sites is None else [{"site": site, "last_round": last_round.get(site)}
                                          for site, entry in sorted(sites.items())
                                          if not entry.get("revoked") and site not in uploaded]
    return {"open_for": round(now - opened_at, 1), "deadline_in": round(opened_at + round_timeout - now, 1),
            "not_uploaded": missing}


def _token_sites(tokens: TokenStore) -> dict[str, dict] | None:
    """The sites with a token; None when the token file cannot be read (``status`` run by another user, or
    the file damaged: ``token list`` names the fault)."""
    try:
        return tokens.sites()
    except (OSError, ValueError):
        return None


def read_status(root: str | Path, now: float | None = None) -> dict[str, Any]:
    """What ``/v1/status`` says, read from the state directory without writing to it: for an admin on the
    server's machine, whether the server runs or not (``fedmix-engine status``)."""
    root = Path(root)
    config = load_server_config(root / CONFIG_FILE) if (root / CONFIG_FILE).is_file() else None
    if config is None or not (root / "rounds").is_dir():
        if config is None and (root / TOKENS_FILE).is_file():  # 'token add' made the folder; serve has not run
            sites = sorted(site for site, entry in (_token_sites(TokenStore(root)) or {}).items()
                           if not entry.get("revoked"))
            held = f" (tokens of {len(sites)} site(s): {first_names(sites, 4)})" if sites else ""
            raise InputError(root, f"no federation here yet{held}: 'fedmix-engine serve --state {root}' starts it")
        if not root.exists():  # a typing error, most often: said as such, not as a folder of the wrong kind
            raise InputError(root, "no such folder: give the folder 'serve --state' was started with")
        raise InputError(root, "not a server state directory (no server.json or rounds/)")
    completed = completed_rounds(root)
    last = completed[-1]
    uploaded = sorted(p.stem for p in (root / "current").glob("*.json") if p.name != "opened.json"
                      and _upload_round(p) == last + 1)
    history = read_history(root, completed)
    return {"federation": read_federation_id(root),
            "round": None if last >= config.rounds else last + 1, "last_round": last, "rounds": config.rounds,
            "finished": last >= config.rounds, "sites_expected": config.sites, "min_sites": config.min_sites,
            "uploaded": uploaded, **open_round(None if last >= config.rounds else _opened_at(root, last + 1),
                                               time.time() if now is None else now, config.round_timeout, uploaded,
                                               _token_sites(TokenStore(root)), history),
            "method": config.method, "lam": config.lam, "beta": config.beta,
            "class_names": list(config.class_names), "history": history,
            "settings_changes": read_settings_changes(root),
            "evaluations": evaluation_summaries(read_evaluations(root))}


def _opened_at(root: Path, round_number: int) -> float | None:
    """When round ``round_number`` opened (``current/opened.json``); None when the file is for another round,
    or damaged (the round's deadline then starts again, as when the file could not be written)."""
    try:
        opened = json.loads((root / "current" / "opened.json").read_text())
        at = float(opened["opened_at"]) if opened.get("round") == round_number else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return at if at is not None and math.isfinite(at) else None


def _upload_round(report: Path) -> int | None:
    """The round of an acknowledged upload's report; None once a running server has closed the round and
    removed it (between listing and reading), or when it is damaged (the server discards it on start)."""
    try:
        info = _upload_report(report)
    except FileNotFoundError:
        return None
    return None if info is None else info.get("round")
