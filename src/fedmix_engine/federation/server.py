"""``fedmix-engine serve``: the aggregation server (FastAPI on uvicorn).

Routes are thin: authenticate (a dependency), validate, call one ``ServerState`` method, answer.
Uploads are streamed to disk with a size limit, never held in memory whole, so 50 concurrent
full-width uploads cost disk, not RAM.
"""

import asyncio
import contextlib
import ipaddress
import logging
import math
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.requests import ClientDisconnect

from fedmix_engine import __version__
from fedmix_engine.errors import InputError
from fedmix_engine.federation.admin import model_summary, render_admin_page
from fedmix_engine.federation.certificates import certificate_dates, certificate_names, expiry_warning
from fedmix_engine.federation.federated_evaluation import EVALUATION_BYTES
from fedmix_engine.federation.server_config import ServerConfig
from fedmix_engine.federation.state import CLOSE_RETRY_LONGEST, STORAGE_FAULTS, ServerState
from fedmix_engine.federation.status import SERVER_LOCK, site_count_mismatch, space_shortfall
from fedmix_engine.federation.tokens import TokenStore
from fedmix_engine.federation.wire import API_VERSION, MODEL_DIGEST_HEADER
from fedmix_engine.folder_lock import hold_folder
from fedmix_engine.json_values import parse_json

log = logging.getLogger(__name__)
STATUS_ACCESS = ("local", "sites", "public")  # who may read /v1/status and the admin page; see create_app
# A request body that sends nothing for this long is dropped (408) and its part file removed. A site whose link
# died without a FIN or RST (a VPN dropped, a laptop asleep) is never heard from again: without a limit its
# connection and its half-received upload stayed until the server stopped, one more at every retry. Longer than
# a site's own timeout (120 s), so a live site gives up and retries first; sites retry a 408 as nginx's too.
BODY_IDLE_SECONDS = 300.0


def create_app(state: ServerState, tokens: TokenStore, deadline_poll: float = 0.5,
               status_access: str = "sites", tls_expires_at: float | None = None,
               body_idle_seconds: float = BODY_IDLE_SECONDS) -> FastAPI:
    """The ASGI app for one state directory.

    The round history (site names, their sample counts, losses and weights) is for the admin on the
    server's own machine (a loopback client: a browser there or through an SSH tunnel) and, with
    ``status_access="sites"``, for any site with a valid token; ``"public"`` shows it to anyone who
    can reach the port. Behind a reverse proxy on the same machine every request is a loopback one:
    restrict the page there. ``tls_expires_at``: when the server's certificate expires (epoch seconds),
    warned of on the admin page, in the status and once a day in the log as it nears.
    ``body_idle_seconds``: see ``BODY_IDLE_SECONDS``.

    Everything that touches the state (validation, aggregation, deadlines) runs on one dedicated
    thread: it is serialised by the state's lock anyway, and tensors allocated in one thread stay in
    one malloc arena. Spread over the 40-thread default pool, 50 concurrent uploads left freed
    tensor memory in dozens of arenas (measured: 9.5 × the model above idle).
    """
    if status_access not in STATUS_ACCESS:
        raise ValueError(f"status_access must be one of {STATUS_ACCESS}, not {status_access!r}")
    state_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmix-state")

    async def on_state_thread(func, *args):
        return await asyncio.get_running_loop().run_in_executor(state_thread, func, *args)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def watch_deadline() -> None:
            said = None  # the failure last logged: a close failing every poll is said once, not every poll
            expiry_said = -math.inf  # when the certificate's coming expiry was last logged: once a day
            space_said = time.time()  # serve's start said it; then once a day while it holds
            while True:
                await asyncio.sleep(deadline_poll)
                now = time.time()
                if tls_expires_at is not None and now - expiry_said >= 86400 and (
                        warning := expiry_warning(tls_expires_at, now)):
                    log.warning("%s", warning)
                    expiry_said = now
                if now - space_said >= 86400:
                    space_said = now
                    if (short := shortfall()) is not None:
                        log.warning("%s", short)
                try:
                    await on_state_thread(state.close_if_due)
                except Exception as exc:  # this loop is what retries the close: it must outlive the failure
                    if str(exc) != said:
                        log.error("round %d could not be closed: %s; retrying by itself (after 1 s, then less "
                                  "often, at least every %g s)", state.current_round, _failure(exc),
                                  CLOSE_RETRY_LONGEST)
                    said = str(exc)
                else:
                    said = None

        task = asyncio.create_task(watch_deadline())
        yield
        task.cancel()
        state_thread.shutdown(wait=False)

    app = FastAPI(title="FedMix aggregation server", version=__version__, lifespan=lifespan)
    max_bytes = int(state.config.max_upload_mb * 2**20)
    upload_dir = state.root / "incoming"
    upload_dir.mkdir(exist_ok=True)
    for leftover in upload_dir.iterdir():  # bodies of requests cut by a crash were never acknowledged
        leftover.unlink()

    @app.exception_handler(OSError)
    async def storage_failure(request: Request, exc: OSError) -> JSONResponse:
        """A write the machine refused (a full disk, a quota, a file system gone read-only) is said to the
        site as 507 or 503, without the server's paths, and to the admin in one line; the site retries it,
        and nothing it had sent before is lost."""
        if exc.errno in STORAGE_FAULTS:
            status, advice = STORAGE_FAULTS[exc.errno]
            log.error("%s %s: cannot write to %s: %s; %s (the sites retry)", request.method,
                      request.url.path, state.root, _failure(exc), advice)
            return JSONResponse({"detail": f"the server cannot store this now ({exc.strerror}); its admin must "
                                           f"{'free space' if status == 507 else 'fix its storage'}, and this "
                                           "request is retried"}, status_code=status)
        log.exception("%s %s: %s", request.method, request.url.path, _failure(exc))
        return JSONResponse({"detail": f"server error: {_failure(exc)}"}, status_code=500)

    def bearer_token(authorization: str | None) -> str | None:
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        return authorization.split(" ", 1)[1].strip()

    damaged_tokens_said = None  # the damaged token file's error, logged once, not once per request

    def site_for(token: str) -> str | None:
        """The token's site; a token file damaged while the server runs refuses everyone (fails closed: the
        edit may have been a revocation) with a 503 the sites retry, said once in the log."""
        nonlocal damaged_tokens_said
        try:
            site = tokens.site_for(token)
        except InputError as exc:
            if str(exc) != damaged_tokens_said:
                log.error("%s; every site is refused (503, retried) until it is fixed", exc)
                damaged_tokens_said = str(exc)
            raise HTTPException(503, "the server cannot check tokens now (its token file is damaged); its admin "
                                     "must fix it, and this request is retried") from None
        damaged_tokens_said = None
        return site

    def site_of(request: Request, authorization: str | None = Header(default=None)) -> str:
        token = bearer_token(authorization)
        site = site_for(token) if token else None
        if site is None:
            reason = ("unknown or revoked token: ask the federation's admin for a new one" if token else
                      "missing bearer token: pass the site token from 'fedmix-engine token add'")
            log.warning("refused %s %s from %s: %s", request.method, request.url.path,
                        request.client.host if request.client else "?", reason.split(":")[0])
            raise HTTPException(401, reason, headers={"WWW-Authenticate": "Bearer"})
        return site

    def status_reader(request: Request, authorization: str | None = Header(default=None)) -> None:
        if status_access == "public" or _is_loopback(request.client.host if request.client else None):
            return
        token = bearer_token(authorization)
        if status_access == "sites" and token and site_for(token) is not None:
            return
        readers = "the admin on this machine" + (" and the sites (with their tokens)" if status_access == "sites"
                                                  else "")
        raise HTTPException(403, f"the federation's status is for {readers}; the server's admin can open it to "
                                 "anyone with 'serve --status-access public'")

    @app.get(f"/{API_VERSION}/config")
    def federation_config(site: str = Depends(site_of)) -> dict:
        cfg = state.config
        return {"api": API_VERSION, "server_version": __version__, "site": site, "model": cfg.model.__dict__,
                "train": cfg.train.__dict__, "seed": cfg.seed, "rounds": cfg.rounds, "method": cfg.method,
                "class_names": list(cfg.class_names),
                "federation": state.federation_id}

    @app.get(f"/{API_VERSION}/round")
    def current_round(site: str = Depends(site_of)) -> dict:
        return state.round_info(site)

    @app.get(f"/{API_VERSION}/model")
    def global_model(site: str = Depends(site_of)) -> FileResponse:
        try:
            path, r, digest = state.served_model()  # digest as written: the site checks what it receives by it
        except InputError as exc:  # damaged on the server's disk: the site retries, the admin is told
            raise HTTPException(503, f"{exc.reason}: its admin must restore it; this request is retried") from None
        return FileResponse(path, media_type="application/octet-stream", filename=f"global-{r:06d}.safetensors",
                            headers={"X-FedMix-Round": str(r), **({MODEL_DIGEST_HEADER: digest} if digest else {})})

    @app.post(f"/{API_VERSION}/rounds/{{round_number}}/update")
    async def upload(round_number: int, request: Request, site: str = Depends(site_of)) -> JSONResponse:
        def refused(status: int, message: str) -> HTTPException:  # said to the site and in the admin's log
            log.warning("round %d, %s: refused (%d): %s", round_number, site, status, message)
            return HTTPException(status, message)

        declared = request.headers.get("content-length")
        if declared is not None and not declared.isdigit():
            raise refused(400, f"invalid Content-Length header {declared!r}")
        if declared is not None and int(declared) > max_bytes:
            raise refused(413, f"update of {int(declared) / 2**20:.1f} MB exceeds the server's limit of "
                               f"{state.config.max_upload_mb:g} MB")
        fd, name = tempfile.mkstemp(dir=upload_dir, suffix=".part")
        body = Path(name)
        received = 0
        try:
            with open(fd, "wb") as handle:
                async for chunk in _body_chunks(request, body_idle_seconds):
                    received += len(chunk)
                    if received > max_bytes:
                        raise refused(413, f"update exceeds the server's limit of {state.config.max_upload_mb:g} MB")
                    handle.write(chunk)
            if declared is not None and received != int(declared):
                raise refused(400, f"truncated body: {received} of {declared} bytes received")
        except ClientDisconnect:
            body.unlink(missing_ok=True)
            raise refused(400, "the connection closed before the body was complete") from None
        except _BodyStalled:
            body.unlink(missing_ok=True)
            raise refused(408, _idle(received, body_idle_seconds)) from None
        except BaseException:
            body.unlink(missing_ok=True)
            raise
        outcome = await on_state_thread(state.accept_upload, site, round_number, body)
        if outcome.status >= 400:
            raise refused(outcome.status, outcome.message)
        return JSONResponse({"accepted": True, "message": outcome.message, "round_closed": outcome.round_closed})

    @app.post(f"/{API_VERSION}/rounds/{{round_number}}/evaluation")
    async def evaluation(round_number: int, request: Request, site: str = Depends(site_of)) -> JSONResponse:
        body = bytearray()
        try:
            async for chunk in _body_chunks(request, body_idle_seconds):
                body += chunk
                if len(body) > EVALUATION_BYTES:  # a report is a few hundred bytes: read no more than this
                    raise HTTPException(413, f"an evaluation report is at most {EVALUATION_BYTES // 1024} KiB")
        except ClientDisconnect:
            raise HTTPException(400, "the connection closed before the report was complete") from None
        except _BodyStalled:
            message = _idle(len(body), body_idle_seconds)
            log.warning("round %d, %s: evaluation refused (408): %s", round_number, site, message)
            raise HTTPException(408, message) from None
        try:
            raw = parse_json(body)
        except ValueError:
            raise HTTPException(400, "the evaluation report is not JSON") from None
        outcome = await on_state_thread(state.accept_evaluation, site, round_number, raw)
        if outcome.status >= 400:
            log.warning("round %d, %s: evaluation refused (%d): %s", round_number, site, outcome.status,
                        outcome.message)
            raise HTTPException(outcome.status, outcome.message)
        log.info("round %d, %s: %s", round_number, site, outcome.message)
        return JSONResponse({"accepted": True, "message": outcome.message})

    @app.get(f"/{API_VERSION}/status", dependencies=[Depends(status_reader)])
    def status() -> dict:
        return {**state.status(), "tls_expires_at": tls_expires_at}

    def shortfall() -> str | None:
        """The disk warning, read only (the newest round's model is never removed); a failed look says nothing."""
        try:
            return space_shortfall(state.root, state.config, state.last_round)
        except OSError:
            return None

    def site_count() -> str | None:
        """More or fewer sites with tokens than a round waits for (tokens.json is re-read when it changes)."""
        if state.finished:
            return None
        try:
            return site_count_mismatch(tokens, state.config)
        except (OSError, InputError):  # an unreadable tokens.json: the status's list of sites says so
            return None

    @app.get("/healthz")
    def health() -> JSONResponse:
        """For a monitor (a load balancer, Nagios, Uptime Kuma, Kubernetes' probes): no token, and nothing of
        the sites. 503 while the server runs but cannot do its work until its admin acts: the open round is due
        and cannot be closed (a full disk), or the token file is damaged (every site is refused)."""
        failing = []
        if (failure := state.close_failure) is not None:
            failing.append(f"round {failure['round']} is due to close but cannot be ({failure['reason']})")
        if (damaged := state.model_failure) is not None:
            failing.append(f"round {damaged['round']}'s global model is damaged or missing: no site can download it")
        try:
            tokens.sites()
        except InputError:
            failing.append("the token file is damaged: every site is refused")
        warnings = ["the disk has too little free space for the rounds to come"] if shortfall() else []
        return JSONResponse({"status": "failing" if failing else "ok", "failing": failing, "warnings": warnings,
                             "round": None if state.finished else state.current_round, "finished": state.finished},
                            status_code=503 if failing else 200)

    @app.get("/", response_class=HTMLResponse, dependencies=[Depends(status_reader)])
    def admin_page() -> str:
        return render_admin_page({**status(), "space_shortfall": shortfall(), "site_count": site_count(),
                                  "model_summary": model_summary(state.config)})

    return app


class _BodyStalled(Exception):
    """No byte of a request's body for the idle limit (not a TimeoutError: a file system's ETIMEDOUT on the
    part file is one, and is the storage's fault, said as such)."""


async def _body_chunks(request: Request, idle_seconds: float) -> AsyncIterator[bytes]:
    """The request's body as it arrives; _BodyStalled when nothing arrives for ``idle_seconds`` (the one
    timeout uvicorn does not keep: it waits for a body's bytes as long as the connection lasts)."""
    chunks = aiter(request.stream())
    while True:
        try:
            async with asyncio.timeout(idle_seconds):  # a timer per chunk, not wait_for's task (4-7 % of the rate)
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise _BodyStalled from None
        yield chunk


def _idle(received: int, idle_seconds: float) -> str:
    return (f"nothing arrived for {idle_seconds:g} s after {received} bytes of the body: the request was dropped "
            "(a connection that died on the way, most likely); send it again")


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def server_address(scheme: str, host: str, port: int) -> str:
    """The URL the sites are given: an IPv6 address in brackets (``http://::1:8765/`` is no URL)."""
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}/"


EVERY_INTERFACE = ("0.0.0.0", "::", "")


def address_for_sites(scheme: str, host: str, port: int, tls_cert: str | Path | None = None) -> str:
    """The URL ``serve`` prints for the sites. Listening on every interface, ``http://0.0.0.0:8765/`` reaches
    no server from another machine: the machine's name is printed instead, or with TLS the certificate's
    first name (the one the sites must use for the certificate to be verified)."""
    if host not in EVERY_INTERFACE:
        return server_address(scheme, host, port)
    names = certificate_names(tls_cert) if tls_cert else []
    return server_address(scheme, names[0] if names else machine_name(), port)


def machine_name() -> str:
    """This machine's name for the sites: its fully qualified name, or its host name where the resolver
    calls it ``localhost`` (a host name listed on 127.0.0.1 in /etc/hosts, as many installs do)."""
    full = socket.getfqdn()
    return full if "." in full and not full.startswith("localhost") else socket.gethostname()


def outward_address() -> str | None:
    """The address this machine's default route leaves from (nothing is sent: a UDP socket is only
    connected), for sites that reach the server by address; None without a route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere, only looked up
            return probe.getsockname()[0]
    except OSError:
        return None


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:  # not an address (a test client's name)
        return False


def serve(state_dir: str | Path, host: str = "127.0.0.1", port: int = 8765, tls_cert: str | None = None,
          tls_key: str | None = None, config: ServerConfig | None = None, log_level: str = "info",
          status_access: str = "sites") -> None:
    """Run the server until interrupted (state is durable: restarting resumes where it was)."""
    import uvicorn

    handler = logging.StreamHandler(sys.stdout)  # one line per upload, refusal and round: the admin's journal
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    federation_log = logging.getLogger("fedmix_engine.federation")  # this module's and the state's
    federation_log.addHandler(handler)
    federation_log.setLevel(logging.INFO)
    release = None
    try:
        if Path(state_dir).is_dir():
            release = _hold_state_lock(Path(state_dir))
        state = ServerState(state_dir, config)
        release = release or _hold_state_lock(Path(state_dir))  # a new state directory: made just now
        tokens = TokenStore(state_dir)
        if state.adjusted:
            print(f"settings changed on this start: {'; '.join(state.adjusted)}")
        if not tokens.sites():
            print(f"warning: no site tokens yet; create them with 'fedmix-engine token add SITE --state {state_dir}'")
        elif mismatch := site_count_mismatch(tokens, state.config):
            print(f"warning: {mismatch}")
        if not tls_cert and not (host == "localhost" or _is_loopback(host)):
            print(f"warning: plain HTTP on {host}: site tokens and model weights cross the network in clear text; "
                  "give --tls-cert and --tls-key, or serve on 127.0.0.1 behind a TLS proxy")
        if not state.config.class_names:
            print("warning: no --class-names: a joining site is checked for its number of classes only, so a site "
                  "whose label 1 means another class would train the model wrong; a new federation can fix them "
                  "with --class-names NAME[,NAME…]")
        if (short := space_shortfall(state.root, state.config, state.last_round)) is not None:
            print(f"warning: {short}")
        dates = certificate_dates(tls_cert) if tls_cert else None
        app = create_app(state, tokens, status_access=status_access, tls_expires_at=dates[1] if dates else None)
        scheme = "https" if tls_cert else "http"
        every = ""
        if host in EVERY_INTERFACE:
            address = outward_address()
            every = f" (listening on every interface{f'; this machine is also {address}' if address else ''})"
        print(f"FedMix server: {address_for_sites(scheme, host, port, tls_cert)}{every}  round "
              f"{state.current_round} of {state.config.rounds}{' (finished)' if state.finished else ''}; "
              f"state in {state_dir}", flush=True)
        print(f"model: {model_summary(state.config)}", flush=True)
        uvicorn.run(app, host=host, port=port, ssl_certfile=tls_cert, ssl_keyfile=tls_key, log_level=log_level)
    finally:  # a library call: the next serve in this process (a test, an embedding app) logs once, not twice
        federation_log.removeHandler(handler)
        if release is not None:
            release()


def _hold_state_lock(state_dir: Path):
    """One server per state directory. A second one (a forgotten terminal, beside a service) recovers the
    state as its own before it even binds its port, removing what the first is writing as leftovers of a
    crash (a round being committed, an upload not yet acknowledged); then both take uploads and close the
    same rounds."""
    return hold_folder(state_dir, _ANOTHER_SERVER, SERVER_LOCK)


_ANOTHER_SERVER = ("another server is running on this state directory (it holds the directory's lock); stop it "
                   "first, or give this one a --state of its own")
