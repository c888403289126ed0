"""Speed benchmark: one site's local update against the machine's limit and a reference-style baseline.

Measured side by side in one run, median of ``--repeats``:

1. fp32 matmul throughput (GFLOP/s): the practical compute limit of this machine;
2. the engine's local update (batched pseudo-label pass + dual-network training) at the reference
   U-Net width, at 128² and 224²: wall time, images/s, FLOPs counted with
   ``torch.utils.flop_counter``, achieved GFLOP/s and its share of (1);
3. the same update written the reference notebooks' way: pseudo-labels one image at a time with
   NumPy/PIL round trips, then the same training loop;
4. the pseudo-label forward pass at batch sizes 1, 4, 16 (how ``pl_batch_size`` was chosen);
5. aggregation time and peak memory for 2–16 sites and three model widths, streaming (the server's)
   against a naive stack-and-average, each in a fresh process;
6. prediction latency of one 512² image (napari's Predict button) against the network's forward pass
   alone and a reference-style prediction (PIL resize there and back), and a stack's frames batched
   against the same frames predicted one call each.

``--full``: larger site and more repeats, for a GPU (bf16 autocast, large pseudo-label batches).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, publish
from fedmix_engine.data.tensors import KIND_BOX, KIND_MASK, KIND_TAG, TAG_PRESENT, SiteTensors
from fedmix_engine.device import plan_device
from fedmix_engine.fedmix.aggregation import StreamingAggregate
from fedmix_engine.fedmix.local_update import local_update
from fedmix_engine.fedmix.pair import build_pair, init_pair
from fedmix_engine.fedmix.pseudo_labels import PseudoLabels, predict_binary
from fedmix_engine.fedmix.train_config import TrainConfig
from fedmix_engine.fedmix.weights import AggregationRule, fedmix_weights
from fedmix_engine.model import ModelConfig, build_model
from fedmix_engine.predict import Predictor
from fedmix_engine.steps import run_steps


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(device: torch.device, repeats: int, n: int = 2048) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up

    def run() -> None:
        (a @ b).sum().item()

    return 2 * n**3 / median_time(run, max(repeats, 5)) / 1e9


def synthetic_site(n: int, size: int) -> SiteTensors:
    """A site with a third each of masks, boxes and tags (contents do not affect speed)."""
    g = torch.Generator().manual_seed(0)
    kinds = torch.tensor([KIND_MASK, KIND_BOX, KIND_TAG] * (n // 3) + [KIND_MASK] * (n % 3), dtype=torch.int8)
    images = torch.rand((n, 1, size, size), generator=g)
    masks = torch.zeros((n, 1, size, size), dtype=torch.bool)
    masks[kinds == KIND_MASK, :, size // 4: size // 2, size // 4: size // 2] = True
    boxes = torch.zeros_like(masks)
    boxes[kinds == KIND_BOX, :, size // 5: size // 2, size // 5: size // 2] = True
    tags = torch.full((n, 1), TAG_PRESENT, dtype=torch.int8)
    return SiteTensors([f"i{k}" for k in range(n)], kinds, images, masks, boxes, tags, ("lesion",))


def training_flops(model_config: ModelConfig, batch: int, crop: int) -> float:
    """FLOPs of one training step of ONE network (forward + backward) on a batch."""
    net = build_model(model_config)
    x = torch.rand(batch, model_config.in_channels, crop, crop)
    with FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    return float(counter.get_total_flops())


def forward_flops(model_config: ModelConfig, size: int) -> float:
    net = build_model(model_config)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.rand(1, model_config.in_channels, size, size))
    return float(counter.get_total_flops())


def reference_style_update(pair, data: SiteTensors, model_config: ModelConfig, config: TrainConfig, plan) -> None:
    """The reference notebooks' way: one image at a time, NumPy/PIL round trips, then train."""
    net1, net2 = build_pair(model_config, pair, plan.device)
    net1.eval()
    net2.eval()
    targets1, targets2, keep = [], [], []
    for i in range(len(data)):
        array = (data.images[i, 0].numpy() * 255).astype(np.uint8)
        pil = Image.fromarray(array).resize((config.image_size, config.image_size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None, None].to(plan.device)
        with torch.no_grad():
            p1 = (torch.sigmoid(net1(x)) > 0.5).cpu().numpy()
            p2 = (torch.sigmoid(net2(x)) > 0.5).cpu().numpy()
        if data.kinds[i] == KIND_BOX:
            b = data.boxes[i].numpy()
            p1, p2 = p1[0] * b, p2[0] * b
        else:
            p1, p2 = p1[0], p2[0]
        inter, total = float((p1 * p2).sum()), float(p1.sum() + p2.sum())
        agreement = 1.0 if total == 0 else 2 * inter / total
        keep.append(bool(data.kinds[i] == KIND_MASK or agreement >= config.tau))
        targets1.append(torch.from_numpy(p2.astype(bool)) if data.kinds[i] != KIND_MASK else data.masks[i])
        targets2.append(torch.from_numpy(p1.astype(bool)) if data.kinds[i] != KIND_MASK else data.masks[i])
    labels = PseudoLabels(torch.stack(targets1), torch.stack(targets2), torch.tensor(keep))
    # same training loop as the engine: reuse it with pseudo-labels already chosen
    forced = SiteTensors(data.ids, torch.zeros_like(data.kinds), data.images, labels.target1, data.boxes,
                         data.tags, data.classes)
    local_update(pair, forced.subset(labels.keep), model_config, config.__class__(**{**config.__dict__,
                 "pseudo_labels": False}), plan)


def reference_style_predict(net: torch.nn.Module, image: np.ndarray, size: int, device: torch.device) -> np.ndarray:
    """The reference notebooks' prediction: PIL resize to the training size, forward, PIL resize back."""
    pil = Image.fromarray(image).resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None, None].to(device)
    with torch.no_grad():
        p = torch.sigmoid(net(x))[0, 0].cpu().numpy()
    return np.asarray(Image.fromarray(p).resize(image.shape[::-1], Image.BILINEAR))


def pseudo_label_throughput(model_config: ModelConfig, plan, size: int, repeats: int, images: int = 16,
                            batches: tuple[int, ...] = (1, 4, 16)) -> list[tuple[int, float]]:
    """Images/s of the engine's own pseudo-label pass (``predict_binary``: the plan's autocast, each batch's
    masks back on the CPU, so a GPU's queued work is waited for, not only launched) at each batch size."""
    net = build_model(model_config).to(plan.device)
    x = torch.rand(images, model_config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    rows = []
    for batch in batches:
        def run(batch: int = batch) -> None:
            predict_binary(net, x, plan, batch_size=batch)  # without gradients, as the engine calls it

        run()  # warm-up
        rows.append((batch, images / median_time(run, repeats)))
    return rows


def prediction_latency(model_config: ModelConfig, size: int, plan, repeats: int, side: int = 512,
                       frames: int = 8) -> dict[str, float]:
    """Seconds for one ``side``² image through ``Predictor.probabilities`` (validate, normalise, resize,
    forward, resize back), for the network's forward alone on the resized tensor, for the reference
    style; and for a stack of ``frames`` batched vs one call per frame."""
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 256, (frames, side, side), dtype=np.uint8)
    image = stack[0]
    predictor = Predictor(init_pair(model_config, 0), model_config, size, plan)
    predictor.probabilities(image)  # warm-up
    x = torch.rand(1, model_config.in_channels, size, size, device=plan.device)

    def forward() -> None:
        with torch.no_grad():
            predictor.net1(x).sum().item()

    return {"engine": median_time(lambda: predictor.probabilities(image), repeats),
            "forward": median_time(forward, repeats),
            "reference": median_time(lambda: reference_style_predict(predictor.net1, image, size, plan.device),
                                     repeats),
            "stack": median_time(lambda: run_steps(predictor.iter_stack_probabilities(stack, False)), repeats),
            "per_frame": median_time(lambda: [predictor.probabilities(f) for f in stack], repeats),
            "frames": frames, "side": side, "batch": predictor.batch_size}


def _aggregation_peak(width: int, sites: int, naive: bool) -> tuple[float, float, float]:
    """Run in a fresh process: (seconds, peak RSS above the start in MB, pair MB) for aggregating ``sites``
    updates arriving one at a time as the server receives them (each a new model-sized state that is
    dropped once folded in); ``naive`` keeps them all and averages a stack of each tensor."""
    import gc
    import os

    model_config = ModelConfig(base_width=width)
    template = init_pair(model_config, 0)
    pair_mb = sum(v.numel() * v.element_size() for v in template.values()) / 2**20
    rule = AggregationRule()
    n, losses = [10.0 + k for k in range(sites)], [0.5 + 0.01 * k for k in range(sites)]

    def update(k: int) -> dict[str, torch.Tensor]:
        return {key: value + k for key, value in template.items()}

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    start = _rss_mb(os.getpid())
    t0 = time.perf_counter()
    if naive:
        updates = [update(k) for k in range(sites)]
        w = torch.tensor(fedmix_weights(n, losses, rule), dtype=torch.float32)
        result = {key: (w.view(-1, *[1] * updates[0][key].dim()) * torch.stack([u[key] for u in updates])).sum(0)
                  for key in template}
    else:
        acc = StreamingAggregate(rule)
        for k in range(sites):
            acc.add(f"s{k}", update(k), n[k], losses[k])
        result = acc.result()
    seconds = time.perf_counter() - t0
    assert result is not None
    return seconds, _rss_mb(os.getpid(), "VmHWM") - start, pair_mb


def aggregation_memory(widths: tuple[int, ...], site_counts: tuple[int, ...]) -> list[tuple]:
    """(width, pair MB, sites, streaming s, streaming peak MB, naive s, naive peak MB), each in its own process."""
    import multiprocessing

    rows = []
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for width in widths:
            for sites in site_counts:
                stream_s, stream_mb, pair_mb = pool.apply(_aggregation_peak, (width, sites, False))
                naive_s, naive_mb, _ = pool.apply(_aggregation_peak, (width, sites, True))
                rows.append((width, pair_mb, sites, stream_s, stream_mb, naive_s, naive_mb))
                print(f"aggregate width {width}, {sites} sites: streaming {stream_s:.2f} s, +{stream_mb:.0f} MB; "
                      f"naive {naive_s:.2f} s, +{naive_mb:.0f} MB", flush=True)
    return rows


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _measure_server(model_config: ModelConfig, sites: int, workdir: Path) -> dict[str, float]:
    """Start a real server, upload one update per site (all at once when ``sites`` > 3), measure."""
    import os
    import shutil
    import socket
    import subprocess
    import threading

    import httpx

    from fedmix_engine.federation.client import wait_for_server
    from fedmix_engine.federation.tokens import TokenStore
    from fedmix_engine.federation.wire import UpdateReport, encode_update

    state = workdir / f"state-{sites}"
    shutil.rmtree(state, ignore_errors=True)
    tokens = TokenStore(state)
    names = [f"s{k:02d}" for k in range(sites)]
    keys = {n: tokens.add(n) for n in names}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fedmix_engine.cli", "serve", "--state", str(state), "--port",
                             str(port), "--sites", str(sites), "--min-sites", str(sites), "--rounds", "1",
                             "--width", str(model_config.base_width), "--max-upload-mb", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    out: dict[str, float] = {}
    try:
        if not wait_for_server(url, 120):
            raise RuntimeError("the benchmark server did not start")
        time.sleep(1.0)
        out["idle"] = _rss_mb(proc.pid)
        t0 = time.perf_counter()
        global_bytes = httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {keys[names[0]]}"},
                                 timeout=600).content
        out["download"] = time.perf_counter() - t0
        out["model_mb"] = len(global_bytes) / 2**20
        t0 = time.perf_counter()
        body = encode_update(init_pair(model_config, 1), UpdateReport(10, 0.5))
        out["serialise"] = time.perf_counter() - t0
        peak, stop, timings = [out["idle"]], threading.Event(), {}

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_mb(proc.pid))
                time.sleep(0.05)

        def send(name: str) -> None:
            t = time.perf_counter()
            httpx.post(f"{url}/v1/rounds/1/update", content=body, timeout=1200,
                       headers={"Authorization": f"Bearer {keys[name]}"}).raise_for_status()
            timings[name] = time.perf_counter() - t

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        if sites <= 3:  # sequential: the last upload includes validation + aggregation + commit
            for name in names:
                send(name)
        else:
            threads = [threading.Thread(target=send, args=(n,)) for n in names]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        stop.set()
        watcher.join()
        out["peak"] = max(peak[0], _rss_mb(proc.pid, "VmHWM"))
        out["upload"], out["last_upload"] = timings[names[0]], timings[names[-1]]
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(state, ignore_errors=True)
    return out


def federation_overhead(model_config: ModelConfig, update_seconds: float, concurrent: int, workdir: Path) -> str:
    """Round overhead on loopback, and the server's peak RSS under ``concurrent`` simultaneous uploads."""
    r = _measure_server(model_config, 3, workdir)
    overhead = r["serialise"] + r["upload"] + r["last_upload"] + r["download"]
    m = _measure_server(model_config, concurrent, workdir)
    return (f"Round overhead on loopback, 3 sites, reference-width pair ({r['model_mb']:.0f} MB): serialise "
            f"{r['serialise']:.2f} s + upload {r['upload']:.2f} s + last upload incl. validation, aggregation and "
            f"commit {r['last_upload']:.2f} s + download {r['download']:.2f} s = {overhead:.2f} s, "
            f"{100 * overhead / (overhead + update_seconds):.0f} % of a round whose local update takes "
            f"{update_seconds:.1f} s (the 128² update above).\n\n"
            f"Server memory with {concurrent} concurrent uploads of a reference-width pair ({m['model_mb']:.0f} MB "
            f"each): idle {m['idle']:.0f} MB, peak {m['peak']:.0f} MB → {m['peak'] - m['idle']:.0f} MB above idle "
            f"= {(m['peak'] - m['idle']) / m['model_mb']:.2f} × the model (target ≤ 3 ×).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="GPU configuration")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (as simulate's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=6, help="images in the benchmark site")
    parser.add_argument("--width", type=int, default=64, help="U-Net base width (64 = reference)")
    parser.add_argument("--sizes", default="128,224")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--skip-server", action="store_true", help="skip the federation overhead and memory runs")
    parser.add_argument("--concurrent", type=int, default=50, help="simultaneous uploads for the memory run")
    args = parser.parse_args()
    if args.full:
        args.images, args.repeats = max(args.images, 64), max(args.repeats, 5)
    plan = plan_device(args.device, "bf16" if args.full else "fp32")
    model_config = ModelConfig(base_width=args.width)
    peak = matmul_gflops(plan.device, args.repeats)
    print(f"matmul fp32: {peak:.1f} GFLOP/s on {plan.device}", flush=True)

    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        crop = size
        config = TrainConfig(image_size=size, crop_size=crop, batch_size=4 if not plan.is_cuda else 16,
                             intensity=0.0, pl_batch_size=plan.pl_batch_size)
        data = synthetic_site(args.images, size)
        pair = init_pair(model_config, 0)
        local_update(pair, data, model_config, config, plan)  # warm-up
        results = [local_update(pair, data, model_config, config, plan).report for _ in range(args.repeats)]
        # FLOPs of what was actually trained: the kept samples (random initial networks reject most
        # pseudo-labels, so n < site size), in the same batches, both networks
        trained = results[0].n
        steps = (trained + config.batch_size - 1) // config.batch_size
        flops_train = 2 * sum(training_flops(model_config, min(config.batch_size, trained - k * config.batch_size),
                                             crop) for k in range(steps))
        flops_pl = 2 * (len(data) - data.count(KIND_MASK)) * forward_flops(model_config, size)
        wall = statistics.median(r.seconds["pseudo_labels"] + r.seconds["train"] for r in results)
        train_s = statistics.median(r.seconds["train"] for r in results)
        pl_s = statistics.median(r.seconds["pseudo_labels"] for r in results)
        base = median_time(lambda p=pair, d=data, c=config: reference_style_update(p, d, model_config, c, plan),
                           args.repeats)
        rows.append((size, wall, train_s, pl_s, flops_train, flops_pl, base, trained))
        print(f"{size}²: engine {wall:.2f}s (train {train_s:.2f}s, pseudo-labels {pl_s:.2f}s), "
              f"reference-style {base:.2f}s", flush=True)

    # pseudo-label batch size: forward throughput at reference width
    pl_size = 128
    pl_rows = pseudo_label_throughput(model_config, plan, pl_size, args.repeats)

    # aggregation: time and peak memory vs number of sites and model size, streaming vs naive
    widths = tuple(sorted({16, 32, args.width}))
    agg_rows = aggregation_memory(widths, (2, 4, 8, 16))

    latency = {}
    for size in (int(s) for s in args.sizes.split(",")):
        latency[size] = prediction_latency(model_config, size, plan, args.repeats)
        print(f"predict one image at {size}²: {latency[size]['engine'] * 1e3:.0f} ms "
              f"(forward {latency[size]['forward'] * 1e3:.0f} ms)", flush=True)

    lines = [f"## Speed ({'GPU --full' if args.full else 'CPU'} configuration)", "",
             f"Command: `{command()}`  ", f"Machine: {machine()}  ",
             f"Device: {plan.device} ({plan.note}); U-Net width {args.width} "
             f"({sum(p.numel() for p in build_model(model_config).parameters()) / 1e6:.1f} M parameters per network); "
             f"a site of {args.images} images (⅓ masks, ⅓ boxes, ⅓ tags); median of {args.repeats}.", "",
             f"**Machine limit:** fp32 matmul {peak:.0f} GFLOP/s.", "",
             "| image | engine update (s) | site images/s | images trained | train GFLOP (dual) | train GFLOP/s | "
             "share of matmul | pseudo-label pass (s) | pseudo-label GFLOP/s | reference-style update (s) | "
             "engine speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for size, wall, train_s, pl_s, f_train, f_pl, base, trained in rows:
        achieved = f_train / train_s / 1e9
        lines.append(f"| {size}² | {wall:.2f} | {args.images / wall:.2f} | {trained} | {f_train / 1e9:.0f} | "
                     f"{achieved:.0f} | {100 * achieved / peak:.0f} % | {pl_s:.2f} | {f_pl / pl_s / 1e9:.0f} | "
                     f"{base:.2f} | {base / wall:.2f}× |")
    lines += ["", f"Pseudo-label forward pass at {pl_size}², 16 images, by batch size (images/s): "
              + ", ".join(f"batch {b}: {r:.1f}" for b, r in pl_rows)
              + f". The engine uses batch {plan.pl_batch_size} on {plan.device.type}.", "",
              "Aggregation of one round (the server's streaming sum against a naive stack-and-average; "
              "updates arrive one at a time, as uploads do; peak resident memory above the process's before "
              "the first update, in MB and in pairs; each measurement in a fresh process):", "",
              "| width | pair (MB) | sites | streaming (s) | streaming peak (MB) | streaming peak (pairs) | "
              "naive (s) | naive peak (MB) | naive peak (pairs) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for width, pair_mb, sites, stream_s, stream_mb, naive_s, naive_mb in agg_rows:
        lines.append(f"| {width} | {pair_mb:.0f} | {sites} | {stream_s:.2f} | {stream_mb:.0f} | "
                     f"{stream_mb / pair_mb:.1f} | {naive_s:.2f} | {naive_mb:.0f} | {naive_mb / pair_mb:.1f} |")
    lines += ["",
              "Prediction (napari's Predict button and batch predict; network 1 only, the default):", "",
              "| training size | one image (ms) | network forward alone (ms) | forward GFLOP | GFLOP/s (share of "
              "matmul) | reference-style (ms) | engine speed-up | stack, batched (frames/s) | stack, one call per "
              "frame (frames/s) | batching speed-up |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for size, t in latency.items():
        flops = forward_flops(model_config, size)
        rate = flops / t["engine"] / 1e9
        lines.append(f"| {size}² | {t['engine'] * 1e3:.0f} | {t['forward'] * 1e3:.0f} | {flops / 1e9:.1f} | "
                     f"{rate:.0f} ({100 * rate / peak:.0f} %) | {t['reference'] * 1e3:.0f} | "
                     f"{t['reference'] / t['engine']:.2f}× | {t['frames'] / t['stack']:.2f} | "
                     f"{t['frames'] / t['per_frame']:.2f} | {t['per_frame'] / t['stack']:.2f}× |")
    first = next(iter(latency.values()))
    lines += ["", f"One {first['side']}² uint8 image, predicted at the training size and resized back; the stack is "
              f"{first['frames']} such frames, batched {first['batch']} at a time (the predictor's batch on "
              f"{plan.device.type}).", ""]
    if not args.skip_server:
        update_128 = next((wall for size, wall, *_ in rows if size == 128), rows[0][1])
        lines += [federation_overhead(model_config, update_128, args.concurrent, Path("runs/bench-speed")), ""]
    publish("speed-full" if args.full else "speed", "\n".join(lines), not args.no_write)


if __name__ == "__main__":
    main()
