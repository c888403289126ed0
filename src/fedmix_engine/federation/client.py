"""``fedmix-engine join``: a site's side of the federation, and the Python API the napari widget uses.

Loop: ask the server which round is open → download the global pair → run the engine's
``local_update`` on the site's own data → upload weights + report → (with a held-out folder: score
the pair it trained from there, while the other sites finish, and send the scores) → repeat until
the server says the federation has finished. Network errors and server restarts are retried with
exponential backoff; uploads are idempotent, so a retry never counts twice. The site's Adam state
and the last global model are kept in ``SITE/models/`` so a restarted client resumes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmix_engine.atomic import atomic_write_bytes, make_folder
from fedmix_engine.checkpoint import pair_from_bytes
from fedmix_engine.data.site_store import SiteStore
from fedmix_engine.data.tensors import load_site_tensors
from fedmix_engine.device import plan_device
from fedmix_engine.dice_text import dice_text, shown_loss
from fedmix_engine.errors import FederationError, GaveUp, InputError
from fedmix_engine.federation import pending_state
from fedmix_engine.federation.federated_evaluation import EvaluationReport
from fedmix_engine.federation.tokens import token_problem
from fedmix_engine.federation.wire import API_VERSION, MODEL_DIGEST_HEADER, UpdateReport, encode_update
from fedmix_engine.fedmix.local_update import (
    LocalResult,
    SiteState,
    TrainProgress,
    iter_local_update,
    site_seed,
)
from fedmix_engine.fedmix.pair import PairState
from fedmix_engine.fedmix.pseudo_labels import kept_summary
from fedmix_engine.fedmix.train_config import TrainConfig
from fedmix_engine.model import ModelConfig
from fedmix_engine.site_models import GLOBAL_MODEL
from fedmix_engine.steps import mapped

log = logging.getLogger("fedmix_engine.client")


def wait_for_server(url: str, timeout: float = 60.0, verify: Any = True, trust_env: bool = True) -> bool:
    """Poll ``/v1/status`` until the server answers (True) or ``timeout`` seconds pass (False);
    ``trust_env=False``: directly, past a proxy set for the machine (a server on this machine)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url.rstrip('/')}/{API_VERSION}/status", timeout=2, verify=verify, trust_env=trust_env)
            return True
        except httpx.HTTPError:
            time.sleep(0.2)
    return False


def server_url(server: str) -> str:
    """The server's base URL, refused up front when it cannot work: without a scheme httpx raises
    UnsupportedProtocol on every request, which the retry loop would repeat for an hour."""
    import httpx

    try:
        url = httpx.URL(server.strip())
    except httpx.InvalidURL as exc:
        raise InputError("--server", f"'{server}' is not a URL ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise InputError("--server", f"'{server}' is not an http:// or https:// URL with a host "
                                     "(e.g. https://fedmix.example-hospital.org:8765)")
    if url.port is not None and not 1 <= url.port <= 65535:  # the socket layer wraps it: 99999 dials 34463
        raise InputError("--server", f"'{server}': a TCP port is a number from 1 to 65535, not {url.port}")
    return str(url).rstrip("/")


def trust_store(ca_cert: str | Path) -> ssl.SSLContext:
    """An SSL context trusting ``ca_cert``; a missing or non-PEM file is named, not a bare OSError.

    The checks are Python 3.13's defaults on every Python: strict X.509 (a CA certificate without keyUsage is
    refused) and partial chains (the server's own or an intermediate certificate may be the --ca-cert). Under
    3.11's defaults a site on 3.13 refused a server that the sites on 3.11 joined."""
    path = Path(ca_cert)
    if not path.is_file():
        raise InputError(path, "CA certificate not found" if not path.exists() else "is not a certificate file")
    try:
        context = ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise InputError(path, f"not a PEM certificate the TLS library can read ({exc.reason or exc})") from None
    context.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def system_trust() -> Any:
    """What a join trusts without --ca-cert: the machine's own trust store (truststore: Windows' and macOS'
    certificate stores, Linux's CA bundle), as browsers and curl do. httpx's default, certifi's bundle of
    public CAs, refused a server whose certificate the hospital's own CA signed, although its IT had
    installed that CA on every workstation. SSL_CERT_FILE / SSL_CERT_DIR, where set, are honoured as httpx
    honours them (True)."""
    import os

    if os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR"):
        return True
    import truststore

    return truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


@dataclass(frozen=True)
class JoinEvent:
    """One small typed update for a GUI or a log: what the client is doing now."""

    kind: str  # "connected", "evaluating", "evaluated", "waiting", "training", "uploaded", "round-closed",
    # "finished"; and to ``on_retry`` only: "retrying" (no answer, or a server error), "reconnected"
    message: str
    round: int | None = None
    progress: TrainProgress | None = None
    report: dict[str, Any] | None = None


JOIN_LOCK = "join.lock"  # in SITE/models: held while a join of the site runs


CHECK_PATIENCE = 20.0  # seconds a check (join --check) retries a server that does not answer; a join: an hour


class _Stopped(Exception):
    """A stop asked for while the client waited: the join ends as if the generator had been closed."""


MIN_POLL = 0.1  # s between a waiting site's status checks: shorter floods the server with requests


class FederationClient:
    def __init__(self, server: str, token: str, site_dir: str | Path, device: str = "auto",
                 ca_cert: str | Path | None = None, poll_seconds: float = 1.0, max_backoff: float = 30.0,
                 give_up_after: float = 3600.0, timeout: float = 120.0, held_out: str | Path | None = None,
                 token_source: str = "token"):
        """``held_out``: a fully labelled site folder this site does not train on; every global model received
        is scored there and the scores (image count, mean Dice and IoU per class) are sent to the server.
        ``token_source``: where the token came from (a file, an option), named when it is malformed."""
        import httpx

        if not MIN_POLL <= poll_seconds < math.inf:  # less (or NaN, which no comparison holds) polled without a pause
            raise InputError("--poll", f"seconds between status checks must be a number ≥ {MIN_POLL}, not "
                                       f"{poll_seconds}")
        if not token:
            raise InputError("--token", "no token given: ask the federation's admin for this site's token")
        if problem := token_problem(token):
            raise InputError(token_source, problem)
        token = token.strip()
        self.site_dir = Path(site_dir)
        with SiteStore.open(self.site_dir, readonly=True):
            pass  # fail early, with the site's own error, if the folder is not a site
        self.held_out = Path(held_out) if held_out else None
        if self.held_out is not None:
            with SiteStore.open(self.held_out, readonly=True) as store:
                check_held_out(store, self.site_dir)
        self.device, self.plan = device, plan_device(device)
        self._scored: set[int] = set()  # rounds whose global model this process scored and sent
        self.poll_seconds, self.max_backoff, self.give_up_after = poll_seconds, max_backoff, give_up_after
        verify: Any = trust_store(ca_cert) if ca_cert else system_trust()
        self.http = httpx.Client(base_url=server_url(server), headers={"Authorization": f"Bearer {token}"},
                                 verify=verify, timeout=timeout)
        # a hospital's HTTP(S)_PROXY also carries the requests to an intranet server unless NO_PROXY names it:
        # a proxy that cannot reach it looked like a server that is down ('Connection refused', for an hour)
        self.proxy = environment_proxy(self.http.base_url)
        self.models_dir = self.site_dir / "models"
        self.state = SiteState()
        self.prefix = federation_prefix(None)  # this federation's files in models/, once the server says which
        self._history_refused = False  # the server's round history is for its admin only (said once)
        self._should_stop: Callable[[], bool] = lambda: False  # set by iter_join
        self._on_retry: Callable[[JoinEvent], None] = lambda event: None  # set by iter_join
        self._reconnects = 0  # times the server answered again after failing: a wait is said anew after one
        self._sent: set[int] = set()  # rounds whose update this join delivered (others: an earlier join's)
        self._reached = False  # whether the server ever answered this client (then a name failure is transient)
        self.train_config: TrainConfig | None = None  # set from the server on connecting

    def close(self) -> None:
        """Close the connections kept alive between requests: napari makes a client per Start and Check, and
        one left to garbage collection kept its sockets open (a request a Stop abandoned fails, unread)."""
        self.http.close()

    def __enter__(self) -> FederationClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ HTTP with retries
    def _request(self, method: str, path: str, **kwargs):
        import httpx

        delay, started, failed = 0.5, time.monotonic(), False
        while True:
            try:
                response = self._send(method, path, **kwargs)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                tls_fault = _tls_fault(exc)
                if tls_fault and not (self._reached and _certificate_out_of_date(exc)):  # no retry mends it
                    raise FederationError(tls_fault) from None
                if self.http.base_url.scheme == "http" and _disconnected(exc) and self._speaks_tls():
                    url = self.http.base_url
                    where = f"[{url.host}]:{url.port}" if ":" in url.host else f"{url.host}:{url.port}"  # IPv6
                    raise FederationError(f"the server at {where} speaks TLS: use https://{where} (with --ca-cert "
                                          "for a certificate the server's admin made; napari: 'TLS certificate')") \
                        from None
                if not self._reached and _unknown_name(exc):  # a mistyped address, most likely: said at once
                    raise FederationError(f"the server's name '{self.http.base_url.host}' is not known to this "
                                          "machine's name service: check the server address (or this machine's "
                                          "network settings)") from None
                # a certificate that expired during the federation: retried while its admin renews it
                reason = tls_fault or f"the server does not answer ({type(exc).__name__}: {exc}){self._via_proxy()}"
            else:
                self._reached = True
                if response.status_code < 500 and response.status_code != 408:
                    if failed:
                        self._reconnects += 1
                        self._on_retry(JoinEvent("reconnected", f"the server answers again (after "
                                                 f"{time.monotonic() - started:.0f} s)"))
                    return response
                # 408: the server (or a proxy: nginx's client_body_timeout) heard nothing for a while and
                # dropped the request, which may be sent again (RFC 9110)
                reason = (f"the server dropped the request (408: {_detail(response)})" if response.status_code == 408
                          else f"server error {response.status_code} ({_detail(response)})")
            failing_for = time.monotonic() - started
            if failing_for > self.give_up_after:
                raise GaveUp(f"gave up after {self.give_up_after:.0f} s: {reason}")
            log.warning("%s %s: %s; retrying in %.1f s", method, path, reason, delay)
            so_far = f" (for {failing_for:.0f} s; gives up after {self.give_up_after / 60:g} min)" if failed else ""
            self._on_retry(JoinEvent("retrying", f"{reason}; trying again in {delay:g} s{so_far}"))
            failed = True
            self._pause(delay)
            delay = min(delay * 2, self.max_backoff)

    def _via_proxy(self) -> str:
        """The proxy the requests go through, for a failure's message ('' for a direct connection)."""
        if self.proxy is None:
            return ""
        host = self.http.base_url.host
        return (f"; the requests go through the proxy {self.proxy} (this machine's HTTP_PROXY/HTTPS_PROXY "
                f"settings): if the server is reached directly, add {host} to NO_PROXY")

    def _speaks_tls(self) -> bool:
        """Whether the server's port completes a TLS handshake: a TLS server hangs up on a plain request
        without a word ('Server disconnected without sending a response'), which looked like an outage.
        Only a ClientHello is sent, and the certificate is not checked: this only tells the protocol."""
        url = self.http.base_url
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        try:
            with socket.create_connection((url.host, url.port or 80), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname=url.host):
                return True
        except (OSError, ValueError):  # ssl.SSLError is an OSError: a plain server, or none
            return False

    def _send(self, method: str, path: str, **kwargs):
        """One request, which a stop abandons: a server that takes the connection and never answers (hung, or
        a network dropping its packets) held napari's Stop, and napari closing, for httpx's whole timeout.
        It runs on a daemon thread that ends with that timeout; an exiting process does not wait for it. An
        upload abandoned so may still count: the next join settles its moments by the server's word, as after
        a kill (``pending_state``)."""
        done, outcome = threading.Event(), {}

        def send() -> None:
            try:
                outcome["response"] = self.http.request(method, path, **kwargs)
            except Exception as exc:  # raised again on the join's thread
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=send, name=f"fedmix-http {method} {path}", daemon=True).start()
        while not done.wait(0.2):
            if self._should_stop():
                raise _Stopped
        if "error" in outcome:
            raise outcome["error"]
        return outcome["response"]

    def _pause(self, seconds: float) -> None:
        """Sleep, but end the join within a fifth of a second of a stop (napari's Stop, napari closing):
        a wait for other sites or for a server back up can last hours, and yields nothing meanwhile."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            if self._should_stop():
                raise _Stopped
            time.sleep(min(left, 0.2))

    def _json(self, path: str) -> dict:
        response = self._request("GET", path)
        self._raise_for_refusal(response, path)
        return response.json()

    @staticmethod
    def _raise_for_refusal(response, path: str) -> None:
        if response.status_code == 401:
            raise FederationError(f"the server refused this site's token ({_detail(response)})")
        if response.status_code == 404 and path.startswith(f"/{API_VERSION}/"):
            raise FederationError(f"the server does not speak API {API_VERSION} (404 on {path}); update "
                                  "napari-fedmix on this site or ask the admin which version the server runs")
        if response.status_code == 413 and "json" not in response.headers.get("content-type", ""):
            raise FederationError(f"{path}: {_detail(response)}: a reverse proxy in front of the server limits "
                                  "the size of uploads; its admin must allow the model's size (nginx: "
                                  "client_max_body_size, see docs/federation.md)")
        if response.status_code >= 400:
            raise FederationError(f"{path}: {response.status_code} {_detail(response)}")

    # ------------------------------------------------------------------ the loop
    def iter_join(self, should_stop: Callable[[], bool] | None = None,
                  on_retry: Callable[[JoinEvent], None] | None = None) -> Iterator[JoinEvent]:
        """Take part in the federation until it finishes, yielding events. Closing the generator stops
        after the current training batch; nothing half-done is uploaded. ``should_stop`` is asked between
        events and every 0.2 s of a wait, so a stop also ends a wait that yields nothing for hours.
        ``on_retry`` is called (on this generator's thread) with a "retrying" event before each retry of a
        server that does not answer or fails, and a "reconnected" one when it answers again: retries go on
        for up to ``give_up_after`` inside one step, where nothing is yielded, and a GUI must say why.

        One process per site: a second ``join`` of the same site (a terminal and napari) trained every
        round twice, lost one of the two uploads with a 409, and could keep the loser's optimiser moments
        on disk. The site's ``models/join.lock`` (an OS lock, released when the process ends, however it
        ends) refuses the second before it asks the server anything."""
        from filelock import FileLock, Timeout

        make_folder(self.models_dir)
        lock = FileLock(self.models_dir / JOIN_LOCK, thread_local=False)  # napari may close it from its thread
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise FederationError(f"{self.site_dir}: another join of this site is running (in a terminal or "
                                  "in napari, on this machine or one sharing the folder); one process per "
                                  "site: stop the other first") from None
        except OSError as exc:  # after Timeout, an OSError too: the folder refuses (read-only, another user's)
            raise InputError(self.models_dir, f"cannot be written ({exc.strerror}); a join keeps its lock, this "
                             "site's optimiser state and the final model here: make the site folder writable for "
                             "this user") from None
        self._should_stop = should_stop or (lambda: False)
        self._on_retry = on_retry or (lambda event: None)
        try:
            yield from self._take_part()
        except _Stopped:
            return
        finally:
            lock.release()

    def _fitting(self, cfg: dict, model_config: ModelConfig, train: TrainConfig) -> str:
        """The site, and its held-out folder, checked against the federation's model (FederationError naming
        the folder); a note when the site has nothing to train on yet ('' otherwise)."""
        for folder in filter(None, (self.site_dir, self.held_out)):  # the held-out images must fit the model too
            with SiteStore.open(folder, readonly=True) as store:
                try:
                    check_site_fits_model(store, model_config, cfg.get("class_names", ()))
                except InputError as exc:
                    raise FederationError(str(exc)) from None
                if folder == self.site_dir:
                    idle = _nothing_to_train(store, train)
        return idle

    def iter_check(self) -> Iterator[str]:
        """What a join would meet, found without taking part (as NVFlare's preflight check): the server reached
        and its certificate trusted, the token taken, the site (and held-out folder) fitting the federation's
        model, ``models/`` writable, the device. A site's IT runs it before the federation starts, when a
        failed join would only show on the day. A line per item as it passes, so a failure comes after what
        did pass (the server reached, the token taken) rather than alone; raises what the join would raise."""
        cfg = self._json(f"/{API_VERSION}/config")
        url = self.http.base_url
        yield (f"server: {url} answers ({'TLS certificate trusted' if url.scheme == 'https' else 'plain HTTP'}"
               f"{f'; through the proxy {self.proxy}' if self.proxy else ''}), API {cfg['api']}, version "
               f"{cfg.get('server_version', '?')}")
        yield f"token: accepted, as site '{cfg['site']}'"
        info = self._json(f"/{API_VERSION}/round")
        where = ("finished: joining now only fetches its final model" if info["finished"] else
                 f"round {info['round']} open" + (", this site's update delivered" if info["uploaded"] else ""))
        yield f"federation: {cfg['method']}, {cfg['rounds']} round{'s' if cfg['rounds'] != 1 else ''}; {where}"
        idle = self._fitting(cfg, *_settings(cfg))
        with SiteStore.open(self.site_dir, readonly=True) as store:
            counts = store.summary()
        yield (f"site: {self.site_dir} fits the model ({counts['images']} images: {counts['mask']} with a mask, "
               f"{counts['box']} with boxes, {counts['tag']} with tags){idle}")
        if self.held_out:
            yield self._held_out_line()
        make_folder(self.models_dir)
        if not os.access(self.models_dir, os.W_OK):
            raise InputError(self.models_dir, "cannot be written; a join keeps its lock, this site's optimiser "
                             "state and the final model here: make the site folder writable for this user")
        yield f"writable: {self.models_dir}"
        yield f"device: {self.plan.device} ({self.plan.note})"

    def _held_out_line(self) -> str:
        """What ``--eval`` scores: the held-out folder's fully labelled images, and how many it leaves out."""
        from fedmix_engine.evaluation import full_truth_records, left_out_note

        with SiteStore.open(self.held_out, readonly=True) as store:
            scored = len(full_truth_records(store))
        left = left_out_note(self.held_out, scored)
        return (f"held-out: {self.held_out} fits the model; each global model is scored there on its {scored} fully "
                "labelled image(s)" + (f" ({left})" if left else ""))

    def _take_part(self) -> Iterator[JoinEvent]:
        cfg = self._json(f"/{API_VERSION}/config")
        site, (model_config, train) = cfg["site"], _settings(cfg)
        self.train_config = train
        self.prefix = federation_prefix(cfg.get("federation"))
        # moments saved before an upload this site may have died around: kept if the server took that update
        pending_state.settle(self.models_dir, self.prefix, self._json(f"/{API_VERSION}/round").get("last_accepted"))
        self.state = pending_state.load(self.models_dir, self.prefix)
        idle = self._fitting(cfg, model_config, train)
        through = f"; through the proxy {self.proxy}" if self.proxy else ""
        yield JoinEvent("connected", f"joined as '{site}' ({cfg['method']}, {cfg['rounds']} rounds) on "
                        f"{self.plan.device} ({self.plan.note}){through}{idle}")
        last_wait, seen_round = None, None
        while True:
            if self._should_stop():
                return
            info, asked = self._json(f"/{API_VERSION}/round"), time.monotonic()
            if seen_round is not None and info["last_round"] > seen_round:
                yield from self._closed_rounds(site, seen_round, info["last_round"])
            seen_round = info["last_round"]
            if info["finished"]:
                final, final_round = self.download_global()
                decoded = pair_from_bytes(final, "final global model")  # validated before it is saved
                path = self._save_final_model(final, final_round)
                yield from self._score(decoded, final_round)
                yield JoinEvent("finished", f"federation finished after {info['last_round']} rounds; model: {path}",
                                info["last_round"])
                return
            r = info["round"]
            if info["uploaded"]:
                delivered = "update delivered" if r in self._sent else \
                    "this site's update was delivered by an earlier join"  # a join restarted after its upload
                held_up = info.get("held_up")  # the round is due but the server cannot close it (a full disk)
                if last_wait != (r, held_up, self._reconnects):  # said again when that changes, or the server
                    # answers again after failing (a GUI showed the retries meanwhile)
                    if held_up:
                        yield JoinEvent("waiting", f"round {r}: {delivered}; the server cannot close the "
                                        f"round ({held_up}): its admin must fix that, and it closes by itself then", r)
                    else:
                        yield JoinEvent("waiting", f"round {r}: {delivered}, waiting for the other sites"
                                        f"{self._not_yet(site, r)}", r)
                    last_wait = (r, held_up, self._reconnects)
                self._pause(self.poll_seconds)
                continue
            if r in self._sent:  # acknowledged, then dropped: the server found it damaged on its disk
                self._sent.discard(r)
                yield JoinEvent("waiting", f"round {r}: the server no longer holds this site's update (damaged on "
                                "its disk, its log says); this site trains the round again", r)
            pair_bytes, model_round = self.download_global()
            if model_round != r - 1:
                self._pause(self.poll_seconds)
                continue  # the round moved on while we asked; start again
            decoded = pair_from_bytes(pair_bytes, "global model from the server")
            pair = decoded[0]
            with SiteStore.open(self.site_dir, readonly=True) as store, store.training_view() as view:
                data = load_site_tensors(view, train.image_size)
            result: LocalResult | None = None
            for event in iter_local_update(pair, data, model_config, train, self.plan, self.state,
                                           seed=site_seed(cfg["seed"], site), round_index=r):
                if isinstance(event, LocalResult):
                    result = event
                elif isinstance(event, TrainProgress):
                    yield JoinEvent("training", f"round {r}: {event.stage} {event.step}/{event.total}", r, event)
                    if self._should_stop():
                        return
            assert result is not None
            rep = result.report
            body = encode_update(result.pair, UpdateReport.from_local(rep))
            # Adam's moments advance only with an accepted update: kept as pending until the server says so,
            # so a client stopped or killed before that trains this round again from the same moments
            pending_state.save_pending(self.models_dir, self.prefix, r, result.state)
            response = self._request("POST", f"/{API_VERSION}/rounds/{r}/update", content=body,
                                     headers={"Content-Type": "application/octet-stream"})
            if response.status_code == 409:  # too late, or taken already: a retry after an answer that was lost
                now = self._json(f"/{API_VERSION}/round")
                if now["round"] == r and now["uploaded"]:  # not ours: a resend of ours would be a 200
                    pending_state.settle(self.models_dir, self.prefix, None)
                    raise FederationError(
                        f"round {r}: the server already holds another update of site '{site}' for this round, "
                        "sent by another join with this site's token (on another machine, or with a copy of this "
                        "site's folder): this join stops; its update did not count. One join per site: stop the "
                        "other, or ask the server's admin for a token of this site's own (fedmix-engine token add)")
                accepted = now.get("last_accepted")
                if accepted == r:
                    self._sent.add(r)
                if pending_state.settle(self.models_dir, self.prefix, accepted if accepted == r else None):
                    self.state = result.state  # its first send counted (it closed the round); the answer was lost
                late = _too_late(info.get("deadline_in"), time.monotonic() - asked) if accepted != r else ""
                yield JoinEvent("waiting", f"round {r}: {_detail(response)}{late}", r)
            else:
                self._raise_for_refusal(response, f"/{API_VERSION}/rounds/{r}/update")
                pending_state.settle(self.models_dir, self.prefix, r)
                self.state = result.state
                self._sent.add(r)
                yield JoinEvent("uploaded", f"round {r}: sent n={rep.n}, loss={shown_loss(rep.n, rep.loss)}"
                                f"{kept_summary(rep.counts)} ({_detail(response)})", r, report=rep.to_dict())
            # scored while the other sites finish the round: off the round's critical path
            yield from self._score(decoded, model_round)

    def _score(self, model: tuple[PairState, ModelConfig, dict[str, Any]], model_round: int) -> Iterator[JoinEvent]:
        """Score round ``model_round``'s global model on the held-out folder (once per process) and send
        the scores; a refusal, or a held-out folder that cannot be read any more, is shown and training goes
        on: evaluation never stops the site's part in the federation."""
        from fedmix_engine.evaluation import iter_score_site
        from fedmix_engine.predict import Predictor

        if self.held_out is None or model_round in self._scored:
            return
        name = f"round {model_round}'s global model"
        self._scored.add(model_round)
        try:
            steps = iter_score_site(Predictor.from_pair(*model, self.plan), self.held_out)
            progress = mapped(steps, lambda step: JoinEvent("evaluating", f"{name}: scoring held-out image "
                                                            f"{step[0]}/{step[1]}", model_round))
            while True:
                try:
                    event = next(progress)
                except StopIteration as done:
                    report = EvaluationReport.from_scores(done.value)
                    break
                yield event
                if self._should_stop():
                    progress.close()
                    self._scored.discard(model_round)
                    return
        except (InputError, OSError, sqlite3.Error) as exc:  # the held-out folder gone (a share unmounted)...
            reason = str(exc) if isinstance(exc, InputError) else f"{self.held_out}: {exc}"
            log.warning("%s not scored: %s", name, reason)
            yield JoinEvent("evaluated", f"{name}: not scored ({reason}); training goes on", model_round)
            return
        path = f"/{API_VERSION}/rounds/{model_round}/evaluation"
        response = self._request("POST", path, json=report.to_dict())
        if response.status_code in (404, 405):
            sent = "not sent: the server predates federated evaluation"
        elif response.status_code >= 400:
            sent = f"refused by the server: {_detail(response)}"
            log.warning("%s: %s", path, sent)
        else:
            sent = "sent to the server"
        yield JoinEvent("evaluated", f"{name}: Dice {dice_text(report.dice, report.class_dice())} on "
                        f"{report.images} held-out images ({sent})", model_round, report=report.to_dict())

    def _not_yet(self, site: str, round_number: int) -> str:
        """`` (not yet: site-c (last in round 3))``: the other sites round ``round_number`` waits for, from
        /v1/status; nothing when the server keeps its status to its admin, predates the list, or has closed
        the round meanwhile."""
        from fedmix_engine.federation.admin import not_uploaded_list

        response = self._request("GET", f"/{API_VERSION}/status")
        status = response.json() if response.status_code == 200 else {}
        if status.get("round") != round_number:
            return ""
        missing = [m for m in status.get("not_uploaded") or [] if m["site"] != site]
        return f" (not yet: {not_uploaded_list(missing)})" if missing else ""

    def _closed_rounds(self, site: str, after: int, upto: int) -> Iterator[JoinEvent]:
        """This site's weight, n and loss in each round that closed since ``after`` (from /v1/status);
        nothing when the server keeps its history to its admin (``serve --status-access local``)."""
        path = f"/{API_VERSION}/status"
        response = self._request("GET", path)
        if response.status_code == 403:
            if not self._history_refused:
                log.info("the server shows its round history to its admin only: this site's weights are not shown")
            self._history_refused = True
            return
        self._raise_for_refusal(response, path)
        for meta in response.json()["history"]:
            mine = meta["sites"].get(site)
            if after < meta["round"] <= upto and mine is not None:
                yield JoinEvent("round-closed", f"round {meta['round']} closed: this site's weight "
                                f"{mine['weight']:.2f} of {len(meta['sites'])} sites", meta["round"], report=mine)

    def join(self, on_event: Callable[[JoinEvent], None] | None = None) -> Path:
        """Run ``iter_join`` to the end; returns the final global model's path."""
        for event in self.iter_join():
            if on_event:
                on_event(event)
        return self.site_dir / GLOBAL_MODEL

    # ------------------------------------------------------------------ models and state on disk
    def download_global(self) -> tuple[bytes, int]:
        """The newest global model (safetensors bytes) and the round it completed."""
        response = self._request("GET", f"/{API_VERSION}/model")
        self._raise_for_refusal(response, f"/{API_VERSION}/model")
        r, written = int(response.headers["X-FedMix-Round"]), response.headers.get(MODEL_DIGEST_HEADER)
        if written is not None and hashlib.sha256(response.content).hexdigest() != written:
            # safetensors checks a header, not the numbers: a changed weight was trained on at every site
            raise FederationError(f"the global model of round {r} that the server sent is not the one it wrote "
                                  "(its SHA-256 differs): the server's copy is damaged on its disk; its admin "
                                  "restarting the server is told how to mend it")
        return response.content, r

    def _save_final_model(self, data: bytes, r: int) -> Path:
        """Save the final global model (``data``, already checked with ``pair_from_bytes``)."""
        path = self.site_dir / GLOBAL_MODEL
        atomic_write_bytes(path, data)
        atomic_write_bytes(self.models_dir / f"{self.prefix}-round-{r:04d}.safetensors", data)
        return path


def _settings(cfg: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """The network and training settings in the server's config, checked: a server of another version may
    send a setting this site does not know, which was a TypeError traceback at the join. Bad input (exit 2),
    as a network this site has no package for is."""
    return ModelConfig.from_dict(cfg["model"]), TrainConfig.from_dict(cfg["train"], "train settings from the server")


def _nothing_to_train(store: SiteStore, train: TrainConfig) -> str:
    """A note for a site none of whose images it could train on: it may take part (it receives every global
    model, to predict with), but a clinician should know it adds nothing until images are annotated."""
    summary = store.summary()
    usable = summary["mask"] if not train.pseudo_labels else summary["images"] - summary["none"]
    if usable:
        return ""
    needed = "a pixel mask" if not train.pseudo_labels else "a mask, a box or a tag"
    what = (f"none of this site's {summary['images']} image(s) has {needed} yet" if summary["images"]
            else "this site has no images yet")
    return (f"; note: {what}, so it receives each global model but adds nothing to it (weight 0); images "
            "annotated meanwhile count from the next round")


def federation_prefix(federation: str | None) -> str:
    """How a site's files for one federation begin (``<prefix>-state.pt``: Adam's moments;
    ``<prefix>-round-NNNN.safetensors``: its final model): another federation's moments (other model,
    other run) must never be loaded into this one's optimiser. The id comes from the server and names
    files, so only a plain hex id is accepted."""
    if federation is None:  # a server from before federation ids
        return "client"
    if not re.fullmatch(r"[0-9a-f]{8,64}", str(federation)):
        raise FederationError(f"the server sent a malformed federation id {str(federation)[:80]!r}")
    return f"federation-{federation}"


def check_site_fits_model(store: SiteStore, model_config: ModelConfig, class_names: Sequence[str] = ()) -> None:
    """Refuse to train a federation's model on a site with other classes or channels, naming the site; with
    the federation's ``class_names``, also a site whose classes are named or ordered otherwise: its label
    k would train the model's class k on another class, and nothing else would notice."""
    classes, channels = len(store.config.classes), store.config.channels
    if (channels, classes) != (model_config.in_channels, model_config.num_classes):
        named = f" ({', '.join(class_names)})" if class_names else ""
        raise InputError(store.root, f"site has {classes} class(es) ({', '.join(store.config.classes)}) and "
                         f"{channels} channel(s); the federation's model expects {model_config.num_classes}{named} "
                         f"and {model_config.in_channels}")
    if class_names and tuple(store.config.classes) != tuple(class_names):
        raise InputError(store.root, f"site's classes are {', '.join(store.config.classes)}; the federation's are "
                                     f"{', '.join(class_names)}, in this label order (label k must mean the same "
                                     "class at every site)")


def check_held_out(store: SiteStore, site_dir: Path) -> None:
    """A held-out folder must hold images with full truth and must not be the site trained on: the model's
    scores on its own training images would flatter it."""
    from fedmix_engine.evaluation import NO_FULL_TRUTH, full_truth_records, shared_images

    if store.root.resolve() == site_dir.resolve():
        raise InputError(store.root, "is the site this client trains on; give a fully labelled folder it does "
                                     "not train on, or its scores would flatter the model")
    if not full_truth_records(store):
        raise InputError(store.root, NO_FULL_TRUTH)
    with SiteStore.open(site_dir, readonly=True) as site:
        if shared := shared_images(store, site):
            pairs = ", ".join(f"{held} = {trained}" for held, trained in shared[:3])
            raise InputError(store.root, f"{len(shared)} of its images {'is' if len(shared) == 1 else 'are'} also "
                             f"in the training site ({pairs}{', …' if len(shared) > 3 else ''}): the "
                             "model would be scored on images it trained on; remove them from one of the two")


# OpenSSL's X509_V_ERR_CERT_HAS_EXPIRED and X509_V_ERR_CERT_NOT_YET_VALID: the certificate's dates, which its admin
# (or a clock) mends in place, unlike a certificate the site does not trust
OUT_OF_DATE = {
    10: ("the server's TLS certificate (or the CA certificate that signed it) has expired: the server's admin must "
         "renew it and restart the server; this site needs a new --ca-cert only if the admin sends one"),
    9: ("the server's TLS certificate is not valid yet: this machine's clock is wrong (or the server's admin made "
        "the certificate with a start date to come)"),
}
# OpenSSL 3's X509_V_ERR_PATHLEN_INVALID_FOR_NON_CA (80) to X509_V_ERR_EC_KEY_EXPLICIT_PARAMS (94): a certificate
# not made as X.509 requires (strict checking), e.g. 92, a CA certificate without keyUsage
MALFORMED = range(80, 95)


def environment_proxy(url: Any) -> str | None:
    """The proxy httpx sends requests for ``url`` through (None: a direct connection), found by httpx's own
    rules (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and NO_PROXY, read by urllib's ``getproxies`` as httpx reads
    them: an exact address or ``localhost``, a name as a suffix, ``*`` for every host), without its password."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies

    found = getproxies()
    host = url.host.lower()
    for entry in (name.strip().lower() for name in found.get("no", "").split(",")):
        if entry == "*":
            return None
        if "://" in entry:
            entry = urlsplit(entry).hostname or ""
        entry = entry.strip("[]")
        exact = entry == "localhost" or _is_address(entry)  # a name is a suffix: example.org, www.example.org
        if entry and (host == entry if exact else host.endswith(entry)):
            return None
    proxy = found.get(url.scheme) or found.get("all")
    if not proxy:
        return None
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _is_address(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _tls_fault(exc: BaseException | None) -> str | None:
    """What is wrong with the TLS set-up, when that is what failed: a server certificate not trusted
    (self-signed, another CA, another hostname) or out of date (expired; not valid yet: a wrong clock), or
    an https:// address of a plain-HTTP server. Each was retried for an hour like a server that is down,
    and each was called untrusted, asking the site for a --ca-cert that would not help with the dates."""
    if (failed := _verification_failure(exc)) is not None:
        if failed.verify_code in MALFORMED:
            return (f"the server's TLS certificate (or the CA certificate that signed it) is not made as X.509 "
                    f"requires ({failed.verify_message}): the server's admin must issue it again (see "
                    "docs/federation.md, 'Certificates a site accepts'); another --ca-cert will not help")
        return OUT_OF_DATE.get(failed.verify_code) or (
            f"the server's TLS certificate is not trusted ({failed.verify_message or failed}): give the certificate "
            "the server's admin sends with --ca-cert (napari: 'TLS certificate'), and use a server address the "
            "certificate names")
    if any(isinstance(cause, ssl.SSLError) and cause.reason == "WRONG_VERSION_NUMBER" for cause in _causes(exc)):
        return ("the server does not speak TLS at this address (it answers in plain HTTP): use http:// for it, "
                "or the port its admin gives for https://")
    return None


def _certificate_out_of_date(exc: BaseException | None) -> bool:
    failed = _verification_failure(exc)
    return failed is not None and failed.verify_code in OUT_OF_DATE


def _verification_failure(exc: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The TLS library's refusal of the server's certificate, where that is what failed."""
    return next((cause for cause in _causes(exc) if isinstance(cause, ssl.SSLCertVerificationError)), None)


def _disconnected(exc: BaseException | None) -> bool:
    """Whether the server hung up without answering (what a TLS server does with a plain HTTP request)."""
    import httpx

    return isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError)


def _unknown_name(exc: BaseException | None) -> bool:
    """Whether the server's host name does not resolve (not a temporary failure of the name service)."""
    unknown = (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))
    return any(isinstance(cause, socket.gaierror) and cause.errno in unknown for cause in _causes(exc))


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    """An error and those it came from (httpx wraps httpcore's, which wraps the socket's or the TLS library's)."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _too_late(deadline_in: float | None, took: float) -> str:
    """Why an update missed its round, for a site too slow for the round timeout: it trains every round and
    misses every one, and without this it is told only to train again."""
    if deadline_in is None or took < deadline_in:
        return ""
    remedy = ("if this repeats, ask the server's admin for a longer --round-timeout, or train this site on a GPU "
              "(--device cuda; napari: device)")
    if deadline_in <= 0:
        return (f" (the round was past its deadline when this site began, open only until enough sites reported; "
                f"this site took {took:.0f} s: {remedy})")
    return f" (this site took {took:.0f} s; the round had {deadline_in:.0f} s left when it began: {remedy})"


def _detail(response) -> str:
    """What the server said: its JSON ``detail``; from something else on the way (a reverse proxy's HTML
    error page), the page's title and who answered, rather than 200 characters of markup."""
    try:
        return str(response.json().get("detail") or response.json().get("message"))
    except Exception:
        title = re.search(r"<title>(.*?)</title>", response.text, re.IGNORECASE | re.DOTALL)
        if title is None:
            return response.text[:200]
        server = response.headers.get("server")
        return f"{' '.join(title.group(1).split())}, answered by {server or 'something in front of the server'}"
