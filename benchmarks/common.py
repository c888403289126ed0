"""Shared by the benchmarks: machine description and writing a section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    import torch

    from fedmix_engine.environment import cpu_model

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    # the vector instructions torch's CPU kernels use, which the model name does not tell: two "AMD EPYC, 2 cores"
    # machines trained at 94-101 % (session 15's table) and 149-174 % (one with AVX-512) of their matmul figure
    simd = torch.backends.cpu.get_cpu_capability()
    return (f"{cpu_model()} ({simd}), {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")


def command() -> str:
    return "python " + " ".join([Path(sys.argv[0]).as_posix().split("/work/main/")[-1], *sys.argv[1:]])


def publish(name: str, text: str, write: bool) -> None:
    """Print a benchmark's table and, unless told not to, put it in docs/benchmarks.md."""
    print(text)
    if write:
        write_section(name, text)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nMeasured by the scripts in `benchmarks/`.\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def trained_predictor(data: Path, out: Path, config):
    """Simulate ``config`` on a federation's sites (in a benchmark's worker process: one torch thread) and
    return a predictor of the run's best model, on the CPU."""
    import torch

    from fedmix_engine.predict import Predictor
    from fedmix_engine.simulate import run_simulation

    torch.set_num_threads(1)
    run_simulation(sorted(data.glob("site-*")), data / "eval", config, out, overwrite=True, snapshot_every=0)
    return Predictor.from_checkpoint(out / "best.safetensors", "cpu")


def held_out_images(data: Path):
    """Every test image of a federation's evaluation tree: (id, image, truth mask or None)."""
    from fedmix_engine.data.site_store import SiteStore

    for test in sorted((data / "eval").glob("*/test")):
        with SiteStore.open(test, readonly=True) as store:
            for rec in store.records():
                yield rec.id, store.read_image(rec.id), store.read_mask(rec.id)
