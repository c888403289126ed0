"""Do full-size predictions sit on their truth when the training resizes images? Side by side in one run.

Real images are resized to the training size; the synthetic quality benchmark writes its images at
that size and never resizes, so it cannot see how masks are resampled. This benchmark can: synthetic
sites at 256², trained at 64² with full masks (``supervised-upper``), once with the engine's mask
resampling (the image's own filter, then ≥ ½) and once with torch's ``nearest`` (each block's
top-left pixel: the engine's rule until session 13), same data and seeds. For every test image with a
lesion the table gives how far the full-size prediction lies from the truth — the centroid of the
predicted pixels within 10 px of the lesion minus the lesion's centroid (positive: down or right;
sub-pixel, and blind to false positives elsewhere) — the lesion Dice and the predicted area over the
true area.

    python benchmarks/alignment.py [--seeds 4] [--rounds 30] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, held_out_images, machine, publish, trained_predictor
from fedmix_engine.data.synthetic import make_sample
from fedmix_engine.data.tensors import resize_channels
from fedmix_engine.fedmix.metrics import dice
from fedmix_engine.fedmix.train_config import TrainConfig
from fedmix_engine.model import ModelConfig
from fedmix_engine.simulate import SimulationConfig

RESAMPLING = ("grid", "nearest")
ENGINE_RESAMPLING = resize_channels
NEAR = 10  # px around the lesion in which predicted pixels count towards its offset


def _nearest(channels: np.ndarray, size: int):
    """The engine's mask resampling before session 13."""
    import torch
    from torch.nn import functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(channels, dtype=np.uint8))[None].float()
    if tensor.shape[-2:] != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="nearest")
    return tensor[0] > 0.5


def offset(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float] | None:
    """(down, right) from the truth's centroid to that of the predicted pixels near it; None if there are none."""
    from scipy import ndimage

    near = pred & ndimage.binary_dilation(truth, iterations=NEAR)
    if not near.any():
        return None
    return tuple(float(a.mean() - b.mean()) for a, b in zip(np.nonzero(near), np.nonzero(truth), strict=True))


def use_resampling(name: str) -> None:
    """Resample masks the named way in this process. Set for every job, both ways: a pool worker runs
    several jobs, and a 'nearest' job must not leave its rule to the next one."""
    from fedmix_engine.data import tensors

    tensors.resize_channels = _nearest if name == "nearest" else ENGINE_RESAMPLING  # looked up there


def run_one(job: dict) -> dict:
    """Train one run in a worker process (one torch thread), then measure its predictions."""
    use_resampling(job["resampling"])
    data = Path(job["data"])
    config = SimulationConfig(method="supervised-upper", rounds=job["rounds"], seed=job["seed"], device="cpu",
                              model=ModelConfig(base_width=job["width"]),
                              train=TrainConfig(image_size=job["image_size"], crop_size=job["image_size"] * 3 // 4,
                                                batch_size=4))
    predictor = trained_predictor(data, Path(job["out"]), config)
    shifts, dices, area = [], [], []
    for image_id, image, truth in held_out_images(data):
        if truth is None or not truth.any():
            continue
        truth = truth > 0
        pred = predictor.mask(image, 0.5, image_id) > 0
        if (moved := offset(pred, truth)) is not None:
            shifts.append(moved)
        dices.append(dice(pred, truth))
        area.append(pred.sum() / truth.sum())
    down, right = np.array(shifts, float).T
    return {**job, "down": float(down.mean()), "right": float(right.mean()), "dice": float(np.mean(dices)),
            "area": float(np.median(area)), "images": len(dices)}


def _paired(rows: list[dict], key: str) -> tuple[float, float]:
    """Mean and standard error over seeds of nearest − grid."""
    by = {(r["seed"], r["resampling"]): r[key] for r in rows}
    diffs = np.array([by[(s, "nearest")] - by[(s, "grid")] for s in sorted({r["seed"] for r in rows})])
    return float(diffs.mean()), float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic images")
    parser.add_argument("--image-size", type=int, default=64, help="training size they are resized to")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-alignment"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.size == args.image_size:
        parser.error("--size equal to --image-size resizes nothing: there is nothing to measure")
    data = args.workdir / f"data-{args.size}"
    if not (data / "federation.json").exists():
        make_sample(data, sites=3, images=32, eval_images=30, seed=0, size=args.size, supervision=["mask"] * 3)
    jobs = [{"seed": seed, "resampling": resampling, "data": str(data), "rounds": args.rounds, "width": args.width,
             "image_size": args.image_size, "out": str(args.workdir / f"run-{seed}-{resampling}")}
            for seed in range(args.seeds) for resampling in RESAMPLING]
    started = time.time()
    with get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.map(run_one, jobs)
    minutes = (time.time() - started) / 60

    lines = ["## Alignment of full-size predictions (images resized for training)", "",
             f"Command: `{command()}`  ", f"Machine: {machine()}  ",
             f"Data: synthetic, 3 sites, {args.size}² px, trained at {args.image_size}² with full masks "
             f"(supervised-upper), width {args.width}, {args.rounds} rounds, seeds 0–{args.seeds - 1}; "
             f"{rows[0]['images']} test images with a lesion per run. {minutes:.1f} min.", "",
             "| mask resampling | offset down (px) | offset right (px) | lesion Dice | area / truth (median) |",
             "|---|---|---|---|---|"]
    for resampling in RESAMPLING:
        mine = [r for r in rows if r["resampling"] == resampling]
        name = "image's grid (the engine)" if resampling == "grid" else "torch `nearest` (before session 13)"
        lines.append(f"| {name} | {np.mean([r['down'] for r in mine]):+.2f} | "
                     f"{np.mean([r['right'] for r in mine]):+.2f} | {np.mean([r['dice'] for r in mine]):.3f} | "
                     f"{np.mean([r['area'] for r in mine]):.2f} |")
    (down, down_se), (right, right_se), (dice, dice_se) = (_paired(rows, k) for k in ("down", "right", "dice"))
    lines += ["", f"Nearest − grid, paired by seed (mean ± standard error): offset down {down:+.2f} ± {down_se:.2f} "
              f"px, right {right:+.2f} ± {right_se:.2f} px, lesion Dice {100 * dice:+.1f} ± {100 * dice_se:.1f} "
              f"points. Expected from the resampling alone: +{(args.size / args.image_size - 1) / 2:.1f} px each "
              "way; horizontal flips in training average the sideways part out."]
    publish("alignment", "\n".join(lines), not args.no_write)


if __name__ == "__main__":
    main()
