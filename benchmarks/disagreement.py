"""Does the two networks' disagreement point at the prediction's errors? Measured, side by side with the
simplest alternative, in one run.

napari's Predict can show ``|p¹ − p²|``, where the pair's two networks disagree, as the place to check a
prediction first. This benchmark trains FedMix on the paper-like synthetic setting (site A masks, site
B boxes, site C tags; the CPU quality profile's size, width and crops) for a few seeds, predicts every
test image at full size, and asks of every pixel whether the thresholded prediction is wrong. It
reports how well the disagreement ranks the wrong pixels above the right ones (AUROC: 0.5 is chance,
1 perfect), how many of the errors lie in the 5 % of pixels where the networks disagree most, and the
error rate by band of disagreement — and the same for the probability's own closeness to the threshold,
``1 − 2·|p − 0.5|``, which needs no second network.

    python benchmarks/disagreement.py [--seeds 3] [--rounds 30] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, held_out_images, machine, publish, trained_predictor
from fedmix_engine.data.synthetic import make_sample
from fedmix_engine.fedmix.train_config import TrainConfig, default_crop_size
from fedmix_engine.model import ModelConfig
from fedmix_engine.predict import probabilities_to_labels
from fedmix_engine.simulate import SimulationConfig

BANDS = ((0.0, 0.05), (0.05, 0.2), (0.2, 0.5), (0.5, 1.0))  # of |p¹ − p²|, the last one closed
TOP = 0.05  # the share of pixels, most uncertain first, whose errors are counted


def auroc(score: np.ndarray, wrong: np.ndarray) -> float:
    """How often a wrong pixel scores above a right one (ties count half): the area under the ROC curve of
    ``score`` as a detector of ``wrong``; NaN without both kinds."""
    wrong = wrong.astype(bool)
    positives, negatives = int(wrong.sum()), int((~wrong).sum())
    if not positives or not negatives:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[wrong].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def errors_in_top(score: np.ndarray, wrong: np.ndarray, share: float = TOP) -> float:
    """The share of all wrong pixels that lie among the ``share`` of pixels with the highest score."""
    if not wrong.any():
        return float("nan")
    top = np.argsort(-score, kind="stable")[:max(1, round(share * len(score)))]
    return float(wrong[top].sum() / wrong.sum())


def band_rows(disagreement: np.ndarray, wrong: np.ndarray) -> list[tuple[str, float, float]]:
    """Per band of disagreement: its label, the share of pixels in it and their error rate (NaN if empty)."""
    rows = []
    for low, high in BANDS:
        inside = (disagreement >= low) & ((disagreement <= high) if high == 1.0 else (disagreement < high))
        rows.append((f"{low:g}–{high:g}", float(inside.mean()),
                     float(wrong[inside].mean()) if inside.any() else float("nan")))
    return rows


def probability_to_mask(probability: np.ndarray) -> np.ndarray:
    """Foreground where the predicted label is not background (the threshold the widgets start at)."""
    return probabilities_to_labels(probability, 0.5) > 0


def run_one(job: dict) -> dict:
    """Train one seed in a worker process (one torch thread), then score every test pixel."""
    data = Path(job["data"])
    config = SimulationConfig(method="fedmix", rounds=job["rounds"], seed=job["seed"], device="cpu",
                              model=ModelConfig(base_width=job["width"]),
                              train=TrainConfig(image_size=job["image_size"], crop_size=job["crop"], batch_size=4,
                                                epochs=2))
    predictor = trained_predictor(data, Path(job["out"]), config)
    disagreement, closeness, wrong = [], [], []
    for image_id, image, truth in held_out_images(data):
        truth = np.zeros(image.shape[:2], bool) if truth is None else truth > 0
        probability = predictor.probabilities(image, image_id)
        wrong.append((probability_to_mask(probability) != truth).ravel())
        disagreement.append(predictor.disagreement(image, image_id).max(axis=0).ravel())
        closeness.append((1 - 2 * np.abs(probability.max(axis=0) - 0.5)).ravel())
    d, c, w = (np.concatenate(a) for a in (disagreement, closeness, wrong))
    return {**job, "pixels": len(w), "error_rate": float(w.mean()),
            "auroc": {"disagreement": auroc(d, w), "closeness": auroc(c, w)},
            "top": {"disagreement": errors_in_top(d, w), "closeness": errors_in_top(c, w)},
            "bands": band_rows(d, w)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--size", type=int, default=64, help="side of the synthetic images (also the training size)")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-disagreement"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    data = args.workdir / f"data-{args.size}"
    if not (data / "federation.json").exists():
        make_sample(data, sites=3, images=32, eval_images=30, seed=0, size=args.size)
    jobs = [{"seed": seed, "data": str(data), "rounds": args.rounds, "width": args.width, "image_size": args.size,
             "crop": default_crop_size(args.size), "out": str(args.workdir / f"run-{seed}")}
            for seed in range(args.seeds)]
    started = time.time()
    with get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.map(run_one, jobs)
    minutes = (time.time() - started) / 60

    def mean_sd(values: list[float]) -> str:
        return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    lines = ["## Does the networks' disagreement point at the errors?", "",
             f"Command: `{command()}`  ", f"Machine: {machine()}  ",
             f"Data: synthetic, setting (a) (site A masks, B boxes, C tags), {args.size}² px; FedMix, width "
             f"{args.width}, {args.rounds} rounds × 2 local epochs, seeds 0–{args.seeds - 1}; every pixel of "
             f"{rows[0]['pixels']:,} test pixels per seed, wrong where the prediction at threshold 0.5 differs "
             f"from the truth ({mean_sd([r['error_rate'] for r in rows])} of them). {minutes:.1f} min.", "",
             "| pixel score | AUROC for wrong pixels | errors in the 5 % of pixels scored highest |", "|---|---|---|",
             f"| disagreement \\|p¹ − p²\\| (napari's Predict option) | "
             f"{mean_sd([r['auroc']['disagreement'] for r in rows])} | "
             f"{mean_sd([r['top']['disagreement'] for r in rows])} |",
             f"| closeness to the threshold 1 − 2·\\|p − 0.5\\| (one network) | "
             f"{mean_sd([r['auroc']['closeness'] for r in rows])} | {mean_sd([r['top']['closeness'] for r in rows])} |",
             "", "AUROC per seed: disagreement " + ", ".join(f"{r['auroc']['disagreement']:.3f}" for r in rows)
             + "; closeness " + ", ".join(f"{r['auroc']['closeness']:.3f}" for r in rows) + ".", "",
             "Error rate by band of disagreement (per seed, then the mean over seeds):", "",
             "| \\|p¹ − p²\\| | share of pixels | error rate |", "|---|---|---|"]
    for k, (band, _, _) in enumerate(rows[0]["bands"]):
        share = np.mean([r["bands"][k][1] for r in rows])
        rates = [r["bands"][k][2] for r in rows if not np.isnan(r["bands"][k][2])]
        lines.append(f"| {band} | {share:.1%} | {np.mean(rates):.1%} |" if rates else f"| {band} | {share:.1%} | — |")
    publish("disagreement", "\n".join(lines), not args.no_write)


if __name__ == "__main__":
    main()
