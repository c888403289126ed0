"""``fedmix-engine demo``: a real federation on this machine, end to end, in a few minutes.

Writes a synthetic 3-site federation (A masks, B boxes, C tags), starts the aggregation server and
three site clients as separate processes on 127.0.0.1, prints one line per round (site weights and
the held-out Dice of the new global model, which each site scores on its own test images and sends
to the server: federated evaluation), and writes a PNG of test images with the final model's
predictions (red) over the ground truth (green).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fedmix_engine.atomic import make_folder
from fedmix_engine.data.synthetic import CLASS_SETS, make_sample
from fedmix_engine.errors import InputError
from fedmix_engine.federation.client import wait_for_server
from fedmix_engine.federation.server_config import ServerConfig
from fedmix_engine.federation.status import GLOBAL_FILE, round_dir
from fedmix_engine.federation.tokens import TokenStore
from fedmix_engine.fedmix.train_config import TrainConfig
from fedmix_engine.folder_lock import HeldFolder, hold_folder
from fedmix_engine.model import ModelConfig

SITES = ("site-a", "site-b", "site-c")


MARKER = ".fedmix-demo"


DEMO_LOCK = "demo.lock"  # Windows only: the lock's file (POSIX locks the folder itself)

_DEMO_RUNNING = ("is in use by a running demo, or its server or sites may still run (a demo killed with kill -9 "
                 "cannot stop them; their command lines name this folder); stop them, or choose another folder")


def fresh_demo_folder(out: Path) -> HeldFolder:
    """Lock ``out`` and empty it for the demo; returns the hold. Only a folder an earlier demo wrote (it
    holds ``MARKER``) is emptied: ``demo ~/scans`` used to delete whatever was there. A running demo's
    folder is refused: a second demo emptied it under the first one's server and sites."""
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise InputError(out, "is not empty and was not written by the demo; choose a new or empty folder "
                              "(the demo replaces its folder on every run)")
    make_folder(out)
    held = hold_folder(out, _DEMO_RUNNING, DEMO_LOCK)
    try:
        for entry in out.iterdir():  # emptied, not replaced: the lock is on this folder
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.name != DEMO_LOCK:
                entry.unlink()
        (out / MARKER).write_text("written by 'fedmix-engine demo'; the next demo into this folder replaces it\n")
    except BaseException:
        held()
        raise
    return held


class DemoStopped(Exception):
    """The demo was asked to stop by a signal (SIGTERM from ``kill`` or a service manager, SIGHUP from a
    closed terminal); its server and sites have been stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into ``DemoStopped`` while the demo runs, so that it stops the processes
    it started: by default they end the demo alone, and its server and sites ran on for all their rounds."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise DemoStopped(signum)

    wanted = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    before = {signum: signal.signal(signum, stop) for signum in wanted}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop the demo's processes: asked first (the server shuts down cleanly), killed if they hang."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overlay_png(checkpoint: Path, data: Path, out: Path, per_site: int = 4) -> None:
    import imageio.v3 as iio
    from skimage.segmentation import find_boundaries

    from fedmix_engine.data.site_store import SiteStore
    from fedmix_engine.predict import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    rows = []
    for site in SITES:
        with SiteStore.open(data / "eval" / site / "test", readonly=True) as store:
            tiles = []
            for image_id in [r.id for r in store.records() if r.has_mask][:per_site]:
                image = store.read_image(image_id)
                truth = store.read_mask(image_id)
                pred = predictor.mask(image)
                rgb = np.repeat(image[..., None], 3, axis=2).astype(np.uint8)
                rgb[find_boundaries(truth > 0, mode="inner")] = (40, 220, 40)
                rgb[find_boundaries(pred > 0, mode="inner")] = (255, 50, 50)
                scale = max(1, 192 // max(rgb.shape[:2]))  # small synthetic images: enlarge for reading
                rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
                tiles.append(np.pad(rgb, ((2, 2), (2, 2), (0, 0)), constant_values=255))
            rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    iio.imwrite(out, np.concatenate(rows, axis=0))


def run_demo(out: str | Path, rounds: int = 8, images: int = 32, size: int = 64, width: int = 8,
             seed: int = 0, round_timeout: float = 300.0) -> Path:
    """Run the demo into ``out``; returns the path of the overlay PNG. Raises ``DemoStopped`` when a
    signal stops it."""
    out = Path(out)
    config = demo_server_config(rounds, size, width, seed, round_timeout)  # a bad one said now, not in a log
    held = fresh_demo_folder(out)
    try:
        with _stopped_by_signals():
            return _run(out, held, config, images)
    finally:
        held()


_DEMO_OPTIONS = {"rounds": "--rounds", "model.base_width": "--width", "image_size": "--size",
                 "crop_size": "--size", "seed": "--seed"}


def demo_server_config(rounds: int, size: int, width: int, seed: int, round_timeout: float) -> ServerConfig:
    """The settings the demo's server is started with, checked as ``serve`` checks them and refused under the
    demo's own option: a bad one wrote the sample data, then failed as 'server: did not start'."""
    crop = max(16, (size * 3 // 4) // 16 * 16)
    config = ServerConfig(sites=len(SITES), min_sites=2, round_timeout=round_timeout, rounds=rounds, seed=seed,
                          model=ModelConfig(base_width=width),
                          train=TrainConfig(image_size=size, crop_size=crop, batch_size=4, epochs=2),
                          class_names=tuple(CLASS_SETS[1]))
    try:
        config.validate()
    except InputError as exc:
        raise InputError(_DEMO_OPTIONS.get(str(exc.where), exc.where), exc.reason) from None
    return config


def _run(out: Path, held: HeldFolder, config: ServerConfig, images: int) -> Path:
    import httpx

    data, state = out / "data", out / "server-state"
    print(f"1/4 writing a synthetic federation to {data} (A: masks, B: boxes, C: tags)", flush=True)
    make_sample(data, sites=len(SITES), images=images, eval_images=12, seed=config.seed,
                size=config.train.image_size)
    tokens = TokenStore(state)
    site_tokens = {site: tokens.add(site) for site in SITES}
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 4 processes share the cores
    # all on this machine: a web proxy set for it (a hospital's HTTP_PROXY) must not carry the sites' requests
    loopback = ",".join(filter(None, ["127.0.0.1,localhost", env.get("NO_PROXY") or env.get("no_proxy")]))
    env.update(NO_PROXY=loopback, no_proxy=loopback)
    server_cmd = [sys.executable, "-m", "fedmix_engine.cli", "serve", "--state", str(state), "--port", str(port),
                  "--sites", str(config.sites), "--min-sites", str(config.min_sites),
                  "--round-timeout", str(config.round_timeout), "--rounds", str(config.rounds),
                  "--width", str(config.model.base_width), "--image-size", str(config.train.image_size),
                  "--crop-size", str(config.train.crop_size), "--batch-size", str(config.train.batch_size),
                  "--local-epochs", str(config.train.epochs), "--seed", str(config.seed),
                  "--class-names", ",".join(config.class_names)]
    logs = out / "logs"
    logs.mkdir(parents=True)
    # the server and sites hold the folder's lock too: a demo killed with kill -9 cannot stop them, and
    # its folder must not be emptied under them by the next demo
    inherit = {"pass_fds": [held.descriptor]} if held.descriptor is not None else {}
    procs: list[subprocess.Popen] = []
    try:
        with open(logs / "server.log", "wb") as log:
            procs.append(subprocess.Popen(server_cmd, stdout=log, stderr=subprocess.STDOUT, env=env, **inherit))
        url = f"http://127.0.0.1:{port}"
        if not wait_for_server(url, 60, trust_env=False):
            raise InputError("server", f"did not start; see {logs / 'server.log'}")
        print(f"2/4 server on {url} (admin page: {url}/); starting 3 site clients", flush=True)
        for site in SITES:
            with open(logs / f"{site}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "fedmix_engine.cli", "join", "--server", url,
                     "--site", str(data / site), "--device", "cpu", "--poll", "0.3",
                     "--eval", str(data / "eval" / site / "test")],
                    stdout=log, stderr=subprocess.STDOUT, env={**env, "FEDMIX_TOKEN": site_tokens[site]},
                    **inherit))
        print("3/4 rounds (w = site weight; D = Dice of the new global model on the site's test images, scored "
              "at the site and sent to the server)", flush=True)
        print("round  " + "  ".join(f"{s:>16}" for s in SITES) + "   mean Dice   time", flush=True)
        shown, started = 0, time.time()
        while shown < config.rounds:
            if any(p.poll() not in (None, 0) for p in procs):
                raise InputError("demo", f"a process failed; see the logs in {logs}")
            sites_done = all(p.poll() is not None for p in procs[1:])  # before the status: all they sent is in it
            status = httpx.get(f"{url}/v1/status", timeout=10, trust_env=False).json()
            scored = {e["round"]: e for e in status["evaluations"]}
            for meta in status["history"][shown:]:
                evaluation = scored.get(meta["round"])
                if not sites_done and (evaluation is None or len(evaluation["sites"]) < len(SITES)):
                    break  # the sites score a model as they start the next round, or once finished
                dice = {s: (evaluation or {}).get("sites", {}).get(s, {}).get("dice") for s in SITES}
                cells = "  ".join((f"w={meta['sites'].get(s, {}).get('weight', 0):.2f} "
                                   + ("D=  – " if dice[s] is None else f"D={dice[s]:.2f}")).rjust(16) for s in SITES)
                pooled = "–" if evaluation is None else f"{evaluation['dice']:.3f}"
                print(f"{meta['round']:5d}  {cells}   {pooled:>9}  {time.time() - started:5.0f}s", flush=True)
                shown += 1
            time.sleep(0.5)
        for p in procs[1:]:
            p.wait(120)
    finally:
        _stop(procs)
    png = out / "predictions.png"
    _overlay_png(round_dir(state, config.rounds) / GLOBAL_FILE, data, png)
    print(f"4/4 wrote {png} (red: prediction of the final global model, green: ground truth; one row per site)")
    return png
