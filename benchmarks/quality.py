"""Quality benchmark: Dice on every site's held-out test images, per method, over several seeds.

Settings: (a) paper-like — site A pixel masks, site B boxes, site C tags; (b) mixed within every
site — 10 % masks, 40 % boxes, 50 % tags. Synthetic ultrasound-like data with domain shift between
sites (``fedmix-engine make-sample``). Model selection on each site's validation split; the test
split is evaluated once. Writes the table to docs/benchmarks.md.

CPU configuration (default): 64² images, U-Net width 8, 50 + 50 evaluation images per site, ≈ 27 minutes
on 2 cores: the runs go to ``--jobs`` worker processes with one torch thread each (a width-8 U-Net does
not use two threads well: one run takes 1.1× as long on one thread as on two, so two single-thread runs
side by side do ~1.8× the work).
``--full`` (for a GPU): 256² images cropped to 224, the reference width 64, more data and rounds, one job.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, publish
from fedmix_engine.data.site_store import SiteStore
from fedmix_engine.data.synthetic import SHIFTS, make_sample
from fedmix_engine.device import plan_device
from fedmix_engine.errors import InputError, error_line
from fedmix_engine.evaluation import EvalSet, evaluate
from fedmix_engine.fedmix.train_config import TrainConfig
from fedmix_engine.model import ModelConfig
from fedmix_engine.predict import Predictor
from fedmix_engine.run_snapshot import latest_snapshot
from fedmix_engine.simulate import METHODS, SimulationConfig, run_simulation

SETTINGS = {
    "a": {"label": "(a) paper-like: A masks, B boxes, C tags", "supervision": ["mask", "box", "tag"], "mix": None},
    "b": {"label": "(b) mixed in every site: 10 % masks, 40 % boxes, 50 % tags", "supervision": None,
          "mix": [0.1, 0.4, 0.5]},
}
ORDER = ["supervised-upper", "fedmix", "fedmix-fixed", "fedavg", "fedavg-mask-only", "local"]


def profile(full: bool) -> dict:
    if full:
        # a resumable snapshot at the reference width is ≈ 1.1 GB (≈ 2.6 s to write here): every 10 rounds
        return {"size": 256, "images": 200, "eval_images": 50, "rounds": 100, "width": 64, "jobs": 1,
                "snapshot_every": 10,
                "train": TrainConfig(image_size=256, crop_size=224, batch_size=16), "device": "auto",
                "precision": "bf16"}
    # 50 validation + 50 test images per site: per-image Dice has a std of ≈ 0.3, so 15 (as before) left one
    # run's overall score with a standard error of 4–5 points, as large as the differences being measured.
    return {"size": 64, "images": 32, "eval_images": 50, "rounds": 18, "width": 8, "jobs": 2, "snapshot_every": 1,
            # forward passes of a width-8 net at 64² (pseudo-labels, per-round validation): batch 16 ran 1.1–1.25×
            # faster than the CPU default of 4 (chosen for the reference width) in two one-thread measurements
            "train": TrainConfig(image_size=64, crop_size=48, batch_size=4, epochs=2, pl_batch_size=16),
            "device": "cpu",
            "precision": "fp32"}


BASELINE = "fedavg-mask-only"


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float]:
    """Mean and standard error of a − b over the seeds both have (the same data per seed)."""
    diffs = np.array([a[s] - b[s] for s in sorted(set(a) & set(b))])
    if len(diffs) == 0:
        return float("nan"), float("nan")
    return float(diffs.mean()), float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")


def table(results: dict[tuple[str, str], dict[int, dict[str, float]]], setting: str, methods: list[str]) -> list[str]:
    """Markdown rows: Dice mean ± std over seeds per site and overall, and Δ overall vs the mask-only baseline."""
    site_names = sorted(k for k in next(iter(results[(setting, methods[0])].values())) if k != "overall")
    with_delta = BASELINE in methods
    lines = ["| method | " + " | ".join(site_names) + " | overall |" + (f" Δ vs {BASELINE} |" if with_delta else ""),
             "|---|" + "---|" * (len(site_names) + 1 + with_delta)]

    def overall(method: str) -> dict[int, float]:
        return {seed: row["overall"] * 100 for seed, row in results.get((setting, method), {}).items()}

    base = overall(BASELINE)
    for method in [m for m in ORDER if m in methods]:
        rows = results[(setting, method)]
        cells = []
        for key in [*site_names, "overall"]:
            values = np.array([r[key] for r in rows.values()]) * 100
            cells.append(f"{values.mean():.1f} ± {values.std():.1f}")
        if with_delta:
            mean, err = paired(overall(method), base)
            cells.append("—" if method == BASELINE else f"{mean:+.1f} ± {err:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    upper = overall("supervised-upper")
    if upper and base:
        gap, gap_err = paired(upper, base)
        if gap > 2 * gap_err:  # a share of a gap within noise would be a ratio of noise
            closed = [f"{m} {100 * paired(overall(m), base)[0] / gap:.0f} %"
                      for m in ORDER if m in methods and m not in ("supervised-upper", BASELINE)]
            shares = f"; share of it closed: {', '.join(closed)}" if closed else ""
            lines += ["", f"Gap between {BASELINE} and supervised-upper: {gap:.1f} points{shares}."]
        else:
            lines += ["", f"No gap between {BASELINE} and supervised-upper beyond noise ({gap:+.1f} ± {gap_err:.1f}):"
                          " no share of it to close."]
    return lines


def audit_totals(history: list) -> dict[str, list[float]]:
    """Per kind, over every round and site of one run: [selected, rejected, Σ Dice·selected,
    Σ Dice·rejected, Σ size ratio·selected] from the rounds' ``pl_audit`` (see pseudo_label_audit)."""
    totals: dict[str, list[float]] = {}
    for record in history:
        for kinds in record.pl_audit.values():
            for kind, a in kinds.items():
                t = totals.setdefault(kind, [0.0] * 5)
                t[0] += a["selected"]
                t[1] += a["rejected"]
                t[2] += (a["dice"] or 0) * a["selected"]
                t[3] += (a["rejected_dice"] or 0) * a["rejected"]
                t[4] += (a["size_ratio"] or 0) * a["selected"]
    return totals


def audit_table(audits: dict[tuple[str, str], dict[str, list[float]]], setting: str) -> list[str]:
    """Markdown rows: how good the pseudo-labels were against the hidden truth, per method and kind."""
    rows = [(method, kind, t) for (s, method), kinds in audits.items() if s == setting
            for kind, t in sorted(kinds.items())]
    if not rows:
        return []
    lines = ["Pseudo-labels against the hidden truth (all rounds, sites and seeds; images whose pseudo-label "
             "came from the networks):", "",
             "| method | kind | selected | Dice of selected | Dice of rejected | size of selected / truth |",
             "|---|---|---|---|---|---|"]
    for method, kind, (sel, rej, dice_sel, dice_rej, size) in sorted(rows, key=lambda r: (ORDER.index(r[0]), r[1])):
        def share(total: float, count: float, fmt: str) -> str:
            return format(total / count, fmt) if count else "—"

        lines.append(f"| {method} | {kind} | {share(sel, sel + rej, '.0%')} of {sel + rej:.0f} | "
                     f"{share(dice_sel, sel, '.2f')} | {share(dice_rej, rej, '.2f')} | {share(size, sel, '.2f')} |")
    return [*lines, ""]


def make_one(kwargs: dict) -> None:
    """Write one synthetic federation (in a worker process)."""
    make_sample(**kwargs)


def _model_for(federation: Path, width: int, name: str = "unet") -> ModelConfig:
    """The network for a federation's images: its first site's channels and classes (synthetic data: grey, one)."""
    with SiteStore.open(sorted(federation.glob("site-*"))[0], readonly=True) as site:
        return ModelConfig(name=name, in_channels=site.config.channels, num_classes=len(site.config.classes),
                           base_width=width)


def run_one(job: dict) -> dict:
    """One simulation in a worker process (one torch thread); returns its test row and diagnostics."""
    import torch

    torch.set_num_threads(job["threads"])
    data, out, method = Path(job["data"]), Path(job["out"]), job["method"]
    sites = sorted(data.glob("site-*"))
    t0 = time.time()
    # --resume: a run with a snapshot continues (or, finished, is only evaluated); the others start afresh
    resume = job["resume"] and latest_snapshot(out) is not None
    res = run_simulation(sites, data / "eval", job["config"], out, overwrite=not resume, resume=resume,
                         snapshot_every=job["snapshot_every"])
    row = dict(res.test_dice)
    row["overall"] = res.test_mean
    extra: dict = {"best_round": res.best_round, "seconds": time.time() - t0, "audit": audit_totals(res.history)}
    if method == "fedmix":
        extra["selected"] = sum(h.counts[s].get("box_selected", 0) + h.counts[s].get("tag_selected", 0)
                                for h in res.history[-1:] for s in h.counts)
        # inference with network 1 vs the mean of both networks, same checkpoint
        model = job["config"].model
        tests = [EvalSet.from_store(data / "eval" / s.name / "test", job["config"].train.image_size, model.num_classes,
                                    model.in_channels) for s in sites]
        for mode in ("net1", "mean"):
            predictor = Predictor.from_checkpoint(out / "best.safetensors", "cpu", mode)
            extra[mode] = float(np.mean([evaluate(predictor, test)["dice"] for test in tests]))
    return {**job, "row": row, **extra}


def _results(done: Iterator[dict]) -> Iterator[dict]:
    """The workers' results; a refused input in one of them (say, ``--resume`` with other settings)
    ends the benchmark with its message and exit code 2, as the CLI does, and the pool is torn down."""
    try:
        yield from done
    except InputError as exc:
        print(error_line(exc), file=sys.stderr)
        raise SystemExit(2) from None


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """Turn SIGTERM into SystemExit so the worker pool is torn down on the way out."""
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="GPU configuration (reference width, 224² crops)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed … first-seed + seeds − 1")
    parser.add_argument("--rounds", type=int, help="override the profile's round count")
    parser.add_argument("--settings", default="a,b")
    parser.add_argument("--federation", type=Path,
                        help="run on this make-federation (or make-sample) folder instead of synthetic data: "
                             "one setting, its own; the seeds vary initialisation and training only")
    parser.add_argument("--methods", default=",".join(ORDER))
    parser.add_argument("--model", default="unet", metavar="NAME",
                        help="the network of every method: unet, or one an installed package offers (entry point "
                             "group fedmix_engine.models, docs/engine.md); its runs get folders of their own")
    parser.add_argument("--lam", type=float, default=10.0)
    parser.add_argument("--beta", type=float, default=1.5)
    parser.add_argument("--lr", type=float, help="override the profile's Adam learning rate")
    parser.add_argument("--loss", choices=("dice", "dice+bce"), default="dice",
                        help="training loss of every method (the reference's is soft Dice)")
    parser.add_argument("--pl-warmup", type=int, default=0,
                        help="rounds on masks only before pseudo-labels, for every method that uses them")
    parser.add_argument("--shift", default="mild", choices=tuple(SHIFTS),
                        help="synthetic domain shift between sites (strong: + look-alike lobules, see make-sample)")
    parser.add_argument("--jobs", type=int, help="simulations in parallel, one torch thread each (CPU default 2)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-quality"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--resume", action="store_true",
                        help="continue the runs in --workdir from their last completed round (a killed benchmark, "
                             "or a higher --rounds to extend finished runs); runs without a snapshot start afresh")
    args = parser.parse_args()
    prof = profile(args.full)
    if args.full and not (plan := plan_device(prof["device"], prof["precision"])).is_cuda:
        parser.error(f"--full is the GPU configuration (width 64, 256² images, {prof['rounds']} rounds per "
                     f"run), days of work on a CPU, and {plan.note}; leave out --full for the CPU profile")
    rounds = args.rounds or prof["rounds"]
    try:  # an unknown network or a package that cannot be imported: said before any data is made
        ModelConfig(name=args.model).validate()
    except InputError as exc:
        parser.error(f"--model: {exc.reason}")
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m}")
    settings = [s for s in args.settings.split(",") if s]
    if args.federation is not None:
        manifest_path = args.federation / "federation.json"
        if not manifest_path.is_file():
            parser.error(f"{manifest_path}: not found (write the folder with fedmix-engine make-federation)")
        manifest = json.loads(manifest_path.read_text())
        kinds = ", ".join(f"{site['name'][-1].upper()} {site['supervision']}" for site in manifest["sites"])
        SETTINGS["data"] = {"label": f"{args.federation.name}: {kinds}" + (
            f" ({', '.join(f'{f:.0%}' for f in manifest['mix'])} masks/boxes/tags)" if "mix" in manifest else "")}
        settings = ["data"]
    jobs_n = args.jobs or (prof["jobs"] if os.cpu_count() and os.cpu_count() >= prof["jobs"] else 1)
    train = replace(prof["train"], pl_warmup_rounds=args.pl_warmup, lr=prof["train"].lr if args.lr is None else args.lr,
                    loss=args.loss)
    started = time.time()
    jobs, samples = [], []
    suffix = "" if args.shift == "mild" else f"-{args.shift}"  # data and run folders of a non-default shift
    run_suffix = suffix + ("" if args.loss == "dice" else f"-{args.loss.replace('+', '')}") + (
        "" if args.model == "unet" else f"-{args.model}")
    for setting in settings:
        spec = SETTINGS[setting]
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            data = args.workdir / f"data-{setting}-{seed}-{prof['size']}-eval{prof['eval_images']}{suffix}"
            if setting == "data":
                data = args.federation
            elif not (data / "federation.json").exists():
                samples.append({"out": data, "sites": 3, "images": prof["images"], "eval_images": prof["eval_images"],
                                "seed": seed, "size": prof["size"], "supervision": spec["supervision"],
                                "mix": spec["mix"], "shift": args.shift})
            model = (_model_for(data, prof["width"], args.model) if setting == "data"
                     else ModelConfig(name=args.model, base_width=prof["width"]))
            for method in methods:
                config = SimulationConfig(method=method, rounds=rounds, seed=seed, lam=args.lam, beta=args.beta,
                                          device=prof["device"], precision=prof["precision"], model=model, train=train)
                jobs.append({"setting": setting, "seed": seed, "method": method, "config": config,
                             "data": str(data), "out": str(args.workdir / f"run-{setting}-{seed}-{method}{run_suffix}"),
                             "threads": 1 if jobs_n > 1 else max(1, os.cpu_count() or 1), "resume": args.resume,
                             "snapshot_every": prof["snapshot_every"]})
    results: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    audits: dict[tuple[str, str], dict[str, list[float]]] = {}
    inference: dict[str, list[float]] = {"net1": [], "mean": []}
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # a multiprocessing Pool terminates its workers when the block is left, normally or by an error or
    # SIGTERM (a ProcessPoolExecutor waits for them: a killed benchmark left two orphans computing)
    with get_context("spawn").Pool(jobs_n) as pool:
        pool.map(make_one, samples)  # synthetic data first, in parallel too
        for done in _results(pool.imap_unordered(run_one, jobs)):
            results.setdefault((done["setting"], done["method"]), {})[done["seed"]] = done["row"]
            for kind, totals in done["audit"].items():
                summed = audits.setdefault((done["setting"], done["method"]), {}).setdefault(kind, [0.0] * 5)
                summed[:] = [x + y for x, y in zip(summed, totals, strict=True)]
            for mode in inference:
                if mode in done:
                    inference[mode].append(done[mode])
            print(f"[{time.time() - started:6.0f}s] setting {done['setting']} seed {done['seed']} "
                  f"{done['method']:17s} test {json.dumps({k: round(v, 3) for k, v in done['row'].items()})} "
                  f"({done['seconds']:.0f}s, best round {done['best_round']}"
                  + (f", pseudo-labels selected in the last round {done['selected']}" if "selected" in done else "")
                  + ")", flush=True)

    seed_range = f" ({args.first_seed}–{args.first_seed + args.seeds - 1})" if args.first_seed else ""
    variant = "".join([f", pseudo-label warm-up {args.pl_warmup} rounds" if args.pl_warmup else "",
                       f", {rounds} rounds" if rounds != prof["rounds"] else "",
                       f", learning rate {train.lr:g}" if train.lr != prof["train"].lr else "",
                       f", {args.shift} domain shift" if args.shift != "mild" else "",
                       f", {args.loss} loss" if args.loss != "dice" else "",
                       f", network {args.model}" if args.model != "unet" else "",
                       f", on {args.federation.name}" if args.federation else ""])
    network = "U-Net" if args.model == "unet" else f"network {args.model}"
    lines = [f"## Quality ({'GPU --full' if args.full else 'CPU'} configuration{variant})", "",
             f"Command: `{command()}`  ", f"Machine: {machine()}  ",
             (f"Data: {args.federation} (federation.json: {len(manifest['sites'])} sites made from "
              f"{', '.join(manifest.get('made_from', ['synthetic data']))}), images resized to {prof['size']}² px.  "
              if args.federation else
              f"Data: synthetic ultrasound-like federation ({args.shift} shift), 3 sites, "
              f"{prof['images']} training images per site, "
              f"{prof['eval_images']} validation + {prof['eval_images']} test images per site, {prof['size']}² px.  "),
             f"Model: {network} width {prof['width']}; {rounds} rounds × {train.epochs} local epoch(s), batch "
             f"{train.batch_size} (pseudo-labels and evaluation {train.pl_batch_size or 'per device'}), "
             f"crops {train.crop_size}², Adam lr {train.lr:g}; λ = {args.lam}, β = {args.beta}; "
             f"pseudo-label warm-up {args.pl_warmup} round(s); {args.seeds} seeds"
             f"{seed_range}; {jobs_n} parallel job(s) of "
             f"{jobs[0]['threads'] if jobs else 1} torch thread(s) each; "
             f"wall time {(time.time() - started) / 60:.1f} min"
             f"{' (resumed: rounds run before the resume not counted)' if args.resume else ''}.  ",
             "Metric: per-image Dice on each site's test split (lesion-free images count 1 if predicted empty, "
             "else 0), mean ± std over seeds; the round is chosen on the validation split. "
             f"Δ: the method minus {BASELINE} on the same data (paired by seed), mean ± standard error.", ""]
    for setting in settings:
        lines += [f"### {SETTINGS[setting]['label']}", "", *table(results, setting, methods), "",
                  *audit_table(audits, setting)]
    if inference["net1"]:
        a, b = np.array(inference["net1"]) * 100, np.array(inference["mean"]) * 100
        lines += [f"Inference with network 1 vs the mean of both networks (FedMix, same checkpoints, all settings and "
                  f"seeds): {a.mean():.1f} vs {b.mean():.1f} mean test Dice (mean difference {np.mean(b - a):+.1f}).",
                  ""]
    name = ("quality-full" if args.full else "quality") + (f"-warmup{args.pl_warmup}" if args.pl_warmup else "")
    name += f"-rounds{rounds}" if rounds != prof["rounds"] else ""
    name += f"-lr{train.lr:g}" if train.lr != prof["train"].lr else ""
    name += f"-{args.shift}" if args.shift != "mild" else ""
    name += f"-{args.loss.replace('+', '')}" if args.loss != "dice" else ""
    name += f"-{args.federation.name}" if args.federation else ""
    publish(name, "\n".join(lines), not args.no_write)


if __name__ == "__main__":
    main()
