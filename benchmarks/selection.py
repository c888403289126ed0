"""Does a quality table's verdict rest on choosing each run's round by its validation Dice?

``quality.py`` reports each run's test Dice at the round where its validation Dice was best (the
paper's protocol, and the issue's). Over hundreds of rounds a method on a noisy plateau gets many
chances at a lucky round, so the choice can move a comparison. This reads the runs of a
``quality.py --workdir`` and puts two views without that choice beside the table's: the test Dice of
the last round's model (``final.safetensors``, on the same test split) and the mean validation Dice
over the last K rounds (the level a method trains to, not one round). Nothing is trained.

    python benchmarks/selection.py --workdir runs/bench-quality --setting a
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, publish
from fedmix_engine.evaluation import EvalSet, evaluate
from fedmix_engine.model import ModelConfig
from fedmix_engine.predict import Predictor
from quality import BASELINE, ORDER, paired

UPPER = "supervised-upper"


def find_runs(workdir: Path, setting: str, methods: list[str]) -> dict[tuple[str, int], Path]:
    """``quality.py``'s finished runs of one setting, keyed by (method, seed); its folders for other losses,
    networks or federations (``run-a-0-fedmix-dicebce``) are not these runs and are left out."""
    runs = {}
    for folder in sorted(workdir.glob(f"run-{setting}-*")):
        if not (folder / "summary.json").is_file() or not (folder / "final.safetensors").is_file():
            continue
        config = json.loads((folder / "config.json").read_text())
        method, seed = config["method"], int(config["seed"])
        if method in methods and folder.name == f"run-{setting}-{seed}-{method}":
            runs[method, seed] = folder
    return runs


def run_views(folder: Path, last: int) -> dict[str, Any]:
    """One run's Dice per site (0–1) in the three views (``chosen``: the chosen round's test, ``final``: the
    final round's test, ``level``: the mean validation over the last ``last`` rounds), its rounds and the
    round validation chose."""
    config = json.loads((folder / "config.json").read_text())
    model = ModelConfig.from_dict(config["model"])
    summary = json.loads((folder / "summary.json").read_text())
    sites = list(summary["test_dice"])
    predictor = Predictor.from_checkpoint(folder / "final.safetensors", "cpu")  # loaded once for every site
    final = {}
    for site in sites:
        data = EvalSet.from_store(Path(config["eval"]) / site / "test", config["train"]["image_size"],
                                  model.num_classes, model.in_channels)
        final[site] = evaluate(predictor, data)["dice"]
    rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    tail = [r["val_dice"] for r in rounds if r["round"] > config["rounds"] - last]
    return {"chosen": summary["test_dice"], "final": final,
            "level": {site: float(np.mean([r[site] for r in tail])) for site in sites},
            "rounds": config["rounds"], "best_round": summary["best_round"]}


def view_rows(views: dict[tuple[str, int], dict], methods: list[str], view: str, label: str) -> tuple[str, str]:
    """A view's table row and its note. The row: each method's overall Dice (mean ± std over seeds), its Δ
    against the baseline (paired by seed, mean ± standard error) and the share of the upper bound's Δ it
    closes; the note: the Δs per site and per seed."""
    def overall(method: str, site: str | None = None) -> dict[int, float]:
        return {seed: 100 * (v[view][site] if site else np.mean(list(v[view].values())))
                for (m, seed), v in views.items() if m == method}

    base = overall(BASELINE)
    cells = [label]
    for method in methods:
        values = np.array(list(overall(method).values()))
        cells.append(f"{values.mean():.1f} ± {values.std():.1f}")
    others = [m for m in methods if m != BASELINE]
    for method in others:
        mean, err = paired(overall(method), base)
        cells.append(f"{mean:+.1f} ± {err:.1f}")
    gap, gap_err = paired(overall(UPPER), base) if UPPER in methods else (float("nan"), float("nan"))
    for method in others:
        if method != UPPER:  # as quality.py: no share of a gap within noise (a ratio of noise)
            cells.append(f"{100 * paired(overall(method), base)[0] / gap:.0f} %" if gap > 2 * gap_err else "—")
    sites = sorted(next(iter(views.values()))[view])
    per_site = "; ".join(f"{site} " + ", ".join(f"{m} {paired(overall(m, site), overall(BASELINE, site))[0]:+.1f}"
                                               for m in others) for site in sites)
    per_seed = "; ".join(f"{m} " + ", ".join(f"{overall(m)[s] - base[s]:+.1f}" for s in sorted(base))
                         for m in others)
    return "| " + " | ".join(cells) + " |", f"- {label}: Δ per site: {per_site}. Δ per seed: {per_seed}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="a quality.py --workdir with finished runs")
    parser.add_argument("--setting", default="a", help="the setting whose runs to read (quality.py --settings)")
    parser.add_argument("--methods", default=f"{BASELINE},fedmix,{UPPER}",
                        help=f"methods to compare; Δ is against {BASELINE}, which must be among them")
    parser.add_argument("--last", type=int, default=50, help="rounds at the end whose validation Dice is averaged")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    methods = [m for m in ORDER if m in args.methods.split(",")]
    if BASELINE not in methods:
        parser.error(f"--methods must include {BASELINE}: every Δ is against it")
    started = time.time()
    runs = find_runs(args.workdir, args.setting, methods)
    seeds = sorted({seed for _, seed in runs})
    missing = [f"{m} seed {s}" for m in methods for s in seeds if (m, s) not in runs]
    if not runs or missing:
        sys.exit(f"error: {args.workdir}: setting {args.setting} lacks finished runs of "
                 f"{', '.join(missing) or ', '.join(methods)} (summary.json and final.safetensors)")
    views = {key: run_views(folder, args.last) for key, folder in runs.items()}
    rounds = {v["rounds"] for v in views.values()}
    if len(rounds) > 1:
        sys.exit(f"error: {args.workdir}: the runs trained different numbers of rounds ({sorted(rounds)}); "
                 "extend them alike (quality.py --rounds N --resume)")
    (n_rounds,) = rounds
    others = [m for m in methods if m != BASELINE]
    chosen = ", ".join(f"{m} {'/'.join(str(views[m, s]['best_round']) for s in seeds)}" for m in methods)
    lines = [f"## Quality without choosing the round (setting ({args.setting}), {n_rounds} rounds)", "",
             f"Command: `{command()}`  ", f"Machine: {machine()}  ",
             f"Runs: {args.workdir.name}, {len(seeds)} seeds ({seeds[0]}–{seeds[-1]}), as quality.py trained them; "
             f"nothing trained here, {(time.time() - started) / 60:.1f} min. Rounds chosen by validation: "
             f"{chosen}.  ",
             "Views: *chosen round* = quality.py's table (test Dice at the best validation round); *final round* = "
             f"test Dice of round {n_rounds}'s model; *last {args.last} rounds* = mean validation Dice over rounds "
             f"{n_rounds - args.last + 1}–{n_rounds}. Overall = mean over sites; mean ± std over seeds; Δ against "
             f"{BASELINE}, paired by seed, mean ± standard error; share = Δ of the method / Δ of {UPPER}.", "",
             "| view | " + " | ".join(methods) + " | " + " | ".join(f"Δ {m}" for m in others) + " | "
             + " | ".join(f"share {m}" for m in others if m != UPPER) + " |",
             "|---|" + "---|" * (len(methods) + len(others) + len([m for m in others if m != UPPER]))]
    notes = []
    for view, label in (("chosen", "chosen round (test)"), ("final", f"final round {n_rounds} (test)"),
                        ("level", f"last {args.last} rounds (validation)")):
        row, note = view_rows(views, methods, view, label)
        lines.append(row)
        notes.append(note)
    publish(f"selection-{args.setting}-rounds{n_rounds}", "\n".join([*lines, "", *notes, ""]), not args.no_write)


if __name__ == "__main__":
    main()
