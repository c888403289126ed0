"""Real server processes on loopback for the federation tests (no mocks of HTTP)."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from fedmix_engine.checkpoint import pair_from_bytes
from fedmix_engine.federation.client import trust_store
from fedmix_engine.federation.tokens import TokenStore
from fedmix_engine.federation.wire import UpdateReport, encode_update
from waiting import wait_until

TINY_SETTINGS = ["--width", "4", "--image-size", "32", "--crop-size", "32", "--batch-size", "4", "--seed", "0"]
# one torch thread per process: several processes share 2 cores without oversubscription
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, state: Path, args: list[str], tls: tuple[Path, Path] | None = None, ca: Path | None = None):
        self.state, self.args, self.tls = state, args, tls
        self.ca = ca or (tls[0] if tls else None)  # what a client trusts: the CA, or the self-signed certificate
        self.proc: subprocess.Popen | None = None
        self._use_port(free_port())

    def _use_port(self, port: int) -> None:
        self.port = port
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        self.log = self.state.parent / f"server-{port}.log"

    def start(self, timeout: float = 60, tries: int = 3) -> Server:
        """Start the server, or start it again on its port, and wait until it answers. free_port()'s port is
        free when chosen, not when the server binds it a second later; if another process took it meanwhile,
        the server refuses it at once ("is in use"), and a first start moves to another port."""
        first = self.proc is None
        for _ in range(tries - 1):
            try:
                return self._start_once(timeout)
            except AssertionError:
                if not (first and self.proc.poll() is not None and "is in use" in self.log.read_text()):
                    raise
                self._use_port(free_port())
        return self._start_once(timeout)

    def _start_once(self, timeout: float) -> Server:
        cmd = [sys.executable, "-m", "fedmix_engine.cli", "serve", "--state", str(self.state), "--port",
               str(self.port), *self.args]
        if self.tls:
            cmd += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
        verify = trust_store(self.ca) if self.tls else True

        def answers() -> bool:
            try:
                return httpx.get(f"{self.url}/v1/status", verify=verify, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, "the server answering /v1/status", timeout, self.proc, every=0.2,
                   detail=self.log.read_text)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def status(self) -> dict:
        verify = trust_store(self.ca) if self.tls else True
        return httpx.get(f"{self.url}/v1/status", verify=verify, timeout=10).json()


@contextmanager
def serving_in_process(app) -> Iterator[str]:
    """An ASGI app (the real server's, perhaps changed to play an older or newer server) served by uvicorn on
    a loopback port in this process; yields its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, "uvicorn serving in this process", 30, every=0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def tiny_server_app(state_dir: Path, sites: int, rounds: int = 1, **app_options):
    """The real server's app for a federation of tiny models (width 4, 32 px), its state in ``state_dir``;
    ``app_options`` go to ``create_app``."""
    from fedmix_engine.federation.server import create_app
    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState
    from fedmix_engine.fedmix.train_config import TrainConfig
    from fedmix_engine.model import ModelConfig

    config = ServerConfig(sites=sites, min_sites=sites, rounds=rounds, model=ModelConfig(base_width=4),
                          train=TrainConfig(image_size=32, crop_size=32, batch_size=4))
    return create_app(ServerState(state_dir, config), TokenStore(state_dir), **app_options)


@contextmanager
def running_server(state: Path, args: list[str], tls: tuple[Path, Path] | None = None, ca: Path | None = None):
    server = Server(state, args, tls, ca)
    try:
        yield server.start()
    finally:
        server.kill()


def make_tokens(state: Path, sites: list[str]) -> dict[str, str]:
    store = TokenStore(state)
    return {site: store.add(site) for site in sites}


def global_pair(url: str, token: str, verify=True) -> tuple[dict[str, torch.Tensor], int]:
    r = httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {token}"}, verify=verify, timeout=30)
    r.raise_for_status()
    pair, _, _ = pair_from_bytes(r.content, "test")
    return pair, int(r.headers["X-FedMix-Round"])


def fake_update(pair: dict[str, torch.Tensor], seed: int, n: int = 10, loss: float = 0.5) -> bytes:
    g = torch.Generator().manual_seed(seed)
    moved = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pair.items()}
    return encode_update(moved, UpdateReport(n, loss))


def with_header(update: bytes, change) -> bytes:
    """``update`` with its safetensors header decoded, changed by ``change`` and encoded again."""
    length = int.from_bytes(update[:8], "little")
    header = json.loads(update[8:8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + update[8 + length:]


def upload(url: str, token: str, round_number: int, body: bytes, verify=True) -> httpx.Response:
    return httpx.post(f"{url}/v1/rounds/{round_number}/update", content=body,
                      headers={"Authorization": f"Bearer {token}"}, verify=verify, timeout=60)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread, as in the site processes (ENV), so in-process training matches theirs bit for bit;
    the count before is restored (one under ``pytest -n``, the machine's otherwise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def simulate_like_the_sites(sample: Path, sites: list[str], rounds: int, out: Path) -> dict[str, torch.Tensor]:
    """The simulator's final pair for the TINY_SETTINGS federation, one torch thread as in the site processes."""
    from fedmix_engine.checkpoint import load_checkpoint
    from fedmix_engine.fedmix.train_config import TrainConfig
    from fedmix_engine.model import ModelConfig
    from fedmix_engine.simulate import SimulationConfig, run_simulation

    config = SimulationConfig(method="fedmix", rounds=rounds, seed=0, device="cpu", model=ModelConfig(base_width=4),
                              train=TrainConfig(image_size=32, crop_size=32, batch_size=4))
    with one_torch_thread():
        run_simulation([sample / n for n in sites], None, config, out)
    return load_checkpoint(out / "final.safetensors")[0]


def drift_from_the_simulator(state: Path, sample: Path, sites: list[str], rounds: int, out: Path) -> float:
    """The largest |Δθ| between the server's global pair after ``rounds`` and the simulator's for the same
    sites: 0 up to float noise when the federation trained what the algorithm says, whatever happened to it."""
    from fedmix_engine.checkpoint import load_checkpoint

    served, _, _ = load_checkpoint(state / "rounds" / f"{rounds:06d}" / "global.safetensors")
    simulated = simulate_like_the_sites(sample, sites, rounds, out)
    return max(float((served[k] - simulated[k]).abs().max()) for k in served)


def copied_sites(sample: Path, sites: list[str], into: Path) -> dict[str, Path]:
    """Copies of the sample's sites (a client writes models/ into its site), by name."""
    import shutil

    copies = {name: into / name for name in sites}
    for name in sites:
        shutil.copytree(sample / name, copies[name])
    return copies


def make_certificates(folder: Path, dates: dict[str, tuple[str, str]],
                      ca_key_usage: bool = True) -> tuple[Path, Path, dict[str, Path]]:
    """A test CA (``ca.pem``), one key, and a certificate for 127.0.0.1 signed by the CA for each name in
    ``dates`` (start, end as OpenSSL's YYYYMMDDHHMMSSZ): expired or not-yet-valid ones included, which
    ``openssl req -days`` cannot make. Made as strict X.509 checking (Python 3.13's default) requires; with
    ``ca_key_usage=False`` the CA lacks keyUsage, as ``openssl req -x509`` makes it by default. Returns the
    CA, the key and the certificates."""
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "ca-db"
    db.mkdir(exist_ok=True)
    (db / "index.txt").write_text("")
    (db / "serial").write_text("01\n")
    (folder / "ca.cnf").write_text(f"""[ ca ]\ndefault_ca = test_ca\n[ test_ca ]\ndatabase = {db}/index.txt
new_certs_dir = {db}\nserial = {db}/serial\ndefault_md = sha256\npolicy = any\ncopy_extensions = copy
unique_subject = no\n[ any ]\ncommonName = supplied\n""")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\nauthorityKeyIdentifier=keyid\n"
                                    "subjectKeyIdentifier=hash\nextendedKeyUsage=serverAuth\n")
    ca, ca_key, key, csr = (folder / n for n in ("ca.pem", "ca.key", "server.key", "server.csr"))
    usage = ["-addext", "keyUsage=critical,keyCertSign,cRLSign"] if ca_key_usage else []
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
                    str(ca), "-days", "30", "-subj", "/CN=fedmix-test-ca", "-addext",
                    "basicConstraints=critical,CA:TRUE", *usage], check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                    "-subj", "/CN=fedmix-test"], check=True, capture_output=True)
    certs = {}
    for name, (start, end) in dates.items():
        certs[name] = folder / f"{name}.pem"
        subprocess.run(["openssl", "ca", "-batch", "-config", str(folder / "ca.cnf"), "-cert", str(ca), "-keyfile",
                        str(ca_key), "-in", str(csr), "-out", str(certs[name]), "-startdate", start, "-enddate", end,
                        "-extfile", str(folder / "san.cnf")], check=True, capture_output=True)
    key.chmod(0o600)
    return ca, key, certs


def openssl_date(seconds_from_now: float) -> str:
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(time.time() + seconds_from_now))


class JoinThread:
    """A site's join run in this process on a daemon thread, as napari's Train runs it: its events, the
    retry events it reports through ``on_retry``, and a stop."""

    def __init__(self, client) -> None:
        self.events, self.told, self.stop = [], [], threading.Event()
        self.thread = threading.Thread(
            target=lambda: self.events.extend(client.iter_join(self.stop.is_set, self.told.append)), daemon=True)
        self.thread.start()

    def wait_for(self, condition, what: str, timeout: float = 60) -> None:
        wait_until(condition, what, timeout, self.thread, every=0.05, detail=lambda: f"{self.events}, {self.told}")

    def waiting(self) -> list[str]:
        return [e.message for e in self.events if e.kind == "waiting"]

    def end(self, timeout: float = 30) -> float:
        """Stop the join; how long it took to end."""
        asked = time.monotonic()
        self.stop.set()
        self.thread.join(timeout)
        return time.monotonic() - asked


@contextmanager
def tls_listener(port: int, cert: Path, key: Path):
    """A bare TLS endpoint on 127.0.0.1:``port`` that presents ``cert`` and answers nothing: for a
    certificate ``serve`` would refuse to start with (one that expired while the server ran)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    listener.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                conn.settimeout(5)
                context.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()  # the client refused the certificate: what the test wants

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)
        listener.close()
