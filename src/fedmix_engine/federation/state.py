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
(the round exists, the leftovers are discarded). The directory is read without the server by
``status`` (what ``fedmix-engine status`` and the admin page say); its settings are ``server_config``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmix_engine.atomic import atomic_write_bytes, make_folder
from fedmix_engine.checkpoint import load_checkpoint, save_checkpoint
from fedmix_engine.dice_text import dice_text, shown_loss
from fedmix_engine.errors import InputError, SettingsDiffer
from fedmix_engine.federation.federated_evaluation import EvaluationReport, pooled
from fedmix_engine.federation.server_config import (
    ADJUSTABLE,
    CONFIG_FILE,
    ServerConfig,
    load_server_config,
    setting_changes,
)
from fedmix_engine.federation.status import (
    CHANGES_FILE,
    EVALUATIONS,
    GLOBAL_FILE,
    ID_FILE,
    MODEL_DIGEST,
    MODEL_PROBLEMS,
    completed_rounds,
    evaluation_summaries,
    model_check,
    model_digest,
    newest_model_remedy,
    open_round,
    read_evaluations,
    read_federation_id,
    read_history,
    read_settings_changes,
    refuse_foreign_folder,
    round_dir,
    round_opened_at,
    token_sites,
    upload_intact,
    upload_reports,
)
from fedmix_engine.federation.tokens import TokenStore
from fedmix_engine.federation.wire import LazyUpdate, tensor_template, validate_update_file
from fedmix_engine.fedmix.aggregation import StreamingAggregate
from fedmix_engine.fedmix.pair import PairState, init_pair
from fedmix_engine.fedmix.weights import AggregationRule
from fedmix_engine.file_digest import file_sha256
from fedmix_engine.json_values import parse_json

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


# the longest wait between attempts to close a round whose close failed (a full disk): each attempt hashes and
# aggregates every update and writes the model up to the disk's last byte (0.8 s of CPU at the reference width),
# so retrying every 0.5 s kept half a core busy and rewrote the disk's last free bytes about once a second; the
# waits double from 1 s to this
CLOSE_RETRY_LONGEST = 10.0


@dataclass(frozen=True)
class Outcome:
    """Result of an upload: HTTP status and a sentence for the site's operator."""

    status: int
    message: str
    round_closed: bool = False


class ServerState:
    """Single source of truth for rounds; every method is safe to call from several threads."""

    def __init__(self, root: str | Path, config: ServerConfig | None = None, clock=time.time):
        self.root = Path(root)
        self._clock = clock
        self._lock = threading.RLock()
        self.close_failure: dict[str, Any] | None = None  # why the open round, due to close, is not closed yet
        self._close_attempts_failed = 0  # since the last close: the wait before the next attempt doubles with them
        self._close_retry_at = -math.inf
        self.model_failure: dict[str, Any] | None = None  # why the newest model cannot be sent (damaged on disk)
        self._served: tuple | None = None  # the newest model's file as last found intact (round, stat), its digest
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
        problem = self._newest_model_problem()
        if problem and self.last_round == 0:  # only the initial model, made from the seed: made again
            log.warning("round 0's initial model %s; it is made again from the seed", problem)
            self._write_global(0, init_pair(self.config.model, self.config.seed), {"round": 0, "reason": "initial"},
                               self.round_dir(0))
        elif problem:
            raise InputError(self.global_path(), f"the newest round's global model {problem}: "
                                                 f"{newest_model_remedy(self.root, self.last_round)}")
        self.template = tensor_template(self.global_pair(self.last_round))
        self.uploads: dict[str, dict] = {}
        opened_at = round_opened_at(self.root, self.current_round)
        if opened_at is not None:
            self.opened_at = opened_at
        else:
            self._open_round()
        for site, info in upload_reports(self.root):
            this_round = info is not None and info["round"] == self.current_round
            if this_round and upload_intact(self.root, site, info["sha256"]):
                self.uploads[site] = info
            elif info is None or this_round:  # acknowledged, then damaged on disk: said; the site sends it again
                self._drop_upload(site)
            else:  # left over from a committed round (a crash while its files were removed)
                self._remove_upload_files(site)
        for stray in self.current_dir.glob("*.safetensors"):
            if stray.stem not in self.uploads:
                stray.unlink()
        self._evaluations = read_evaluations(self.root)
        self._remove_old_models()  # a restart with a smaller --keep-models frees the space now
        self._leave_out_revoked()
        if not self.finished and len(self.uploads) >= self.config.sites:
            self._close_round("all sites had reported before a restart")

    def _drop_upload(self, site: str) -> None:
        """Forget an acknowledged update that is damaged on disk, saying so: the site is told it has not
        uploaded, trains the round again and sends a new update."""
        log.warning("round %d: %s's acknowledged update is damaged on disk (%s or its .safetensors); it does not "
                    "count and is removed: the site trains the round again and sends a new one",
                    self.current_round, site, self.current_dir / f"{site}.json")
        self.uploads.pop(site, None)
        self._remove_upload_files(site)

    def _remove_upload_files(self, site: str) -> None:
        """The record first: a crash in between leaves a stray model file, which a restart removes."""
        for suffix in (".json", ".safetensors"):
            (self.current_dir / f"{site}{suffix}").unlink(missing_ok=True)

    def _drop_damaged_uploads(self) -> bool:
        """Before a close aggregates them, drop the acknowledged updates whose files are no longer those
        acknowledged (a failing disk, a hand edit, a file removed), as a restart drops them; True if none was.
        Aggregated, a damaged update had put NaN into the committed global model, a removed one had failed
        every close until a restart, and a cut one had failed the close naming the upload that triggered it."""
        damaged = [site for site, info in sorted(self.uploads.items())
                   if not upload_intact(self.root, site, info["sha256"])]
        for site in damaged:
            self._drop_upload(site)
        return not damaged

    def _newest_model_problem(self) -> str | None:
        """What is wrong with the newest round's model file, if anything: every other round's may be removed
        (keep_models), never this one; its bytes must be those written (a round from before digests: unknown)."""
        return MODEL_PROBLEMS.get(model_check(self.root, self.last_round, newest=True))

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
            self._remove_upload_files(site)
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

    def served_model(self) -> tuple[Path, int, str | None]:
        """The newest global model for a site to download: its file, round and the SHA-256 recorded as it
        was written. InputError if the file is no longer those bytes or is gone (a failing disk, a restore
        gone wrong): the site is answered 503 and retries, and the admin is told (log, page, /healthz),
        where the site was sent bytes it refuses and the server said nothing. Hashed once per round: again
        only when the file's inode, size or times change (a restore from a backup is served at once)."""
        path, r = self.latest_global()
        try:
            found = path.stat()
        except FileNotFoundError:
            problem = "missing"
        else:
            seen = (r, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns)
            if self._served is not None and self._served[0] == seen:
                return path, r, self._served[1]  # no file read, not even meta.json: a download per site and round
            problem = model_check(self.root, r, newest=True)
        with self._lock:
            if problem in ("intact", "unchecked"):
                self._served, self.model_failure = (seen, model_digest(self.root, r)), None
                return path, r, self._served[1]
            remedy = ("restart the server: it makes the initial model again from the seed" if r == 0 else
                      f"{newest_model_remedy(self.root, r)} (at the server's restart; a restored file is served "
                      "at once)")
            failure = {"round": r, "error": f"round {r}'s global model {MODEL_PROBLEMS[problem]}: {remedy}"}
            if failure != self.model_failure:
                log.error("%s: %s; the sites cannot download it and retry", path, failure["error"])
            self.model_failure = failure
        raise InputError(path, f"the server's global model of round {r} {MODEL_PROBLEMS[problem]}")

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
                             sorted(self.uploads), token_sites(self.tokens), history),
                "method": self.config.method, "lam": self.config.lam, "beta": self.config.beta,
                "history": history, "settings_changes": self.changes, "evaluations": self.evaluations(),
                "close_failure": self.close_failure, "model_failure": self.model_failure,
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
                        **parse_json(report.to_json())}
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
                    closed = self._close("every expected site reported")
                except OSError as exc:  # the update is kept and counts; close_if_due retries the close
                    log.error("round %d: every expected site reported, but the round could not be closed (%s); "
                              "retrying until it can", round_number, exc)
                    return Outcome(200, f"accepted for round {round_number}")
                return Outcome(200, f"accepted for round {round_number}", closed)
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
            if self.finished or self._clock() < self._close_retry_at:
                return False
            self._leave_out_revoked()
            reason = self._close_reason()
            return reason is not None and self._close(reason)

    def _close_reason(self) -> str | None:
        """Why the open round is due to close now (every expected site has reported, or the deadline has
        passed with a quorum), or None."""
        if len(self.uploads) >= self.config.sites:
            return "every expected site reported"
        if self._clock() < self.deadline or len(self.uploads) < self.config.min_sites:
            return None
        return f"deadline passed with {len(self.uploads)} of {self.config.sites} sites"

    def _close(self, reason: str) -> bool:
        """Close the open round, due for ``reason``, unless it is no longer due once the damaged updates are
        dropped; whether it closed. A failure (a full disk) is kept for the admin page and ``/v1/status``
        until a later attempt succeeds."""
        try:
            if not self._drop_damaged_uploads() and (reason := self._close_reason()) is None:
                return False
            self._close_round(reason)
        except OSError as exc:
            self._close_attempts_failed += 1
            self._close_retry_at = self._clock() + min(CLOSE_RETRY_LONGEST, 2.0 ** (self._close_attempts_failed - 1))
            since = self.close_failure["since"] if self.close_failure else self._clock()
            self.close_failure = {"round": self.current_round, "error": str(exc), "since": since,
                                  "reason": exc.strerror or type(exc).__name__,  # for the sites: no path
                                  "advice": STORAGE_FAULTS.get(exc.errno, (500, "see the server's log"))[1]}
            raise
        self.close_failure, self._close_attempts_failed, self._close_retry_at = None, 0, -math.inf
        return True

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
        meta = self._commit_round(self.current_round, new, meta)  # with its model's digest, as a restart reads it
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

    def _write_global(self, r: int, pair: PairState, meta: dict, folder: Path) -> dict:
        """Round ``r``'s model and its record into ``folder``, each file atomically; returns the record, which
        holds the model's SHA-256 as written: a site checks what it downloads by it, a restart what it starts
        from."""
        save_checkpoint(folder / GLOBAL_FILE, pair, self.config.model, self.config.checkpoint_meta(r))
        meta = {**meta, MODEL_DIGEST: file_sha256(folder / GLOBAL_FILE)}
        atomic_write_bytes(folder / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
        return meta

    def _commit_round(self, r: int, pair: PairState, meta: dict) -> dict:
        """Round ``r`` committed by a directory rename; returns its record as written."""
        final = self.round_dir(r)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            written = self._write_global(r, pair, meta, tmp)
            os.replace(tmp, final)
        except BaseException:  # nothing committed; a half-written model would hold a full disk's last space
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with contextlib.suppress(OSError):
            fd = os.open(final.parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        return written
