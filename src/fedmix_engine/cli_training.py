"""Training-side subcommands of ``fedmix-engine`` (simulate, predict), kept apart from the data
commands so that ``fedmix-engine site ...`` never imports torch."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from fedmix_engine.atomic import check_writable_file
from fedmix_engine.errors import InputError, first_names
from fedmix_engine.json_values import parse_json


def progress_bar(done: int, total: int, label: str, width: int = 24) -> None:
    """One line of progress on a terminal's stderr (nothing when stderr is a file or a pipe); a count
    alone when the total is unknown (0: a video whose container does not state its frames)."""
    if not sys.stderr.isatty():
        return
    if total <= 0:
        sys.stderr.write(f"\r  {label} {done}")
    else:
        filled = int(width * min(done, total) / total)
        sys.stderr.write(f"\r  {label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    sys.stderr.flush()


def clear_progress_bar() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r" + " " * 60 + "\r")


def _sites_from(args: argparse.Namespace) -> tuple[list[Path], Path | None]:
    sites, eval_root = list(args.sites or []), args.eval
    if args.sample:
        sample = Path(args.sample)
        if not sample.is_dir():
            raise InputError(sample, "sample folder not found (make one with 'fedmix-engine make-sample')")
        sites = sites or sorted(p for p in sample.iterdir() if p.is_dir() and p.name.startswith("site-"))
        eval_root = eval_root or (sample / "eval" if (sample / "eval").is_dir() else None)
    if not sites:
        raise InputError("--sites", "give site folders with --sites, or a make-sample folder with --sample")
    return sites, eval_root


def cmd_simulate(args: argparse.Namespace) -> int:
    import torch

    from fedmix_engine.dice_text import per_class_text, shown_loss
    from fedmix_engine.fedmix.local_update import TrainProgress
    from fedmix_engine.fedmix.train_config import TrainConfig, default_crop_size
    from fedmix_engine.model import ModelConfig
    from fedmix_engine.simulate import (
        RoundDone,
        SimulationConfig,
        SimulationResult,
        SimulationStarted,
        iter_simulation,
    )

    cores = os.cpu_count() or 1
    if not 0 <= args.threads <= cores:  # far more crashed torch (libgomp cannot create them: a segfault)
        raise InputError("--threads", f"must be 0 (torch's default) to this machine's {cores} cores, not "
                                      f"{args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    sites, eval_root = _sites_from(args)
    from fedmix_engine.data.site_store import SiteStore

    with SiteStore.open(sites[0], readonly=True) as first:
        num_classes, channels = len(first.config.classes), first.config.channels
    config = SimulationConfig(
        method=args.method, rounds=args.rounds, seed=args.seed, lam=args.lam, beta=args.beta,
        inference=args.inference, device=args.device, precision=args.precision,
        model=ModelConfig(name=args.model, in_channels=channels, num_classes=num_classes, base_width=args.width),
        train=TrainConfig(image_size=args.image_size, crop_size=args.crop_size or default_crop_size(args.image_size),
                          batch_size=args.batch_size, lr=args.lr, epochs=args.local_epochs, tau=args.tau,
                          loss=args.loss, pl_warmup_rounds=args.pl_warmup),
    )
    config.validate()  # a bad setting is said alone, not after a line that says the run began
    out = args.out
    names = None
    for event in iter_simulation(sites, eval_root, config, out, overwrite=args.overwrite, resume=args.resume,
                                 snapshot_every=args.snapshot_every):
        if isinstance(event, SimulationStarted):  # said once the run is checked: a refused one never began
            action = f"resuming at round {event.first_round}" if args.resume else "simulating"
            print(f"{action} {config.method} on {len(sites)} site(s) for {config.rounds} round(s) → {out}")
            print(f"device: {event.device}, {event.precision} ({event.note})", flush=True)
            if idle := event.idle_note(config.method):
                print(f"note: {idle}", flush=True)
        elif isinstance(event, TrainProgress):
            progress_bar(event.step, event.total, event.stage)
        elif isinstance(event, RoundDone):
            clear_progress_bar()
            if names is None:
                names = list(event.n)
                header = "round " + " ".join(f"{n[:10]:>10}" for n in names)
                print(f"{header}   {'val Dice' if eval_root else 'training loss'} per site (weight, samples used)")
            shown = ({n: f"{event.val_dice[n]:.3f}" if n in event.val_dice else "—" for n in names} if eval_root
                     else {n: shown_loss(event.n[n], event.losses[n]) for n in names})  # no evaluation: the loss
            cells = " ".join(f"{shown[n]:>10}" for n in names)
            extra = ", ".join(f"{n}: w={event.weights.get(n, 0):.2f} n={event.n[n]}" for n in names)
            mean = f"mean {event.val_mean:.3f} " if eval_root else ""
            print(f"{event.round:5d} {cells}   {mean}({extra}) {event.seconds:.1f}s", flush=True)
        elif isinstance(event, SimulationResult):
            if eval_root is None:
                kept = "" if config.method == "local" else "; best.safetensors is the last round's model"
                print(f"no evaluation data (--eval, or a --sample with eval/): no validation or test Dice{kept}")
            else:
                print(f"best round (validation): {event.best_round}")
                print("test Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in event.test_dice.items())
                      + f"  | mean {event.test_mean:.3f}")
                if each := per_class_text(event.class_means()):
                    print(f"test Dice per class (mean over sites): {each} (summary.json: per site)")
            audited = event.history[-1].pl_audit if event.history else {}
            for site, kinds in audited.items():  # the oracle was there: how good were the pseudo-labels?
                for kind, a in kinds.items():
                    print(f"pseudo-labels, last round, {site} {kind}: kept {a['selected']} of "
                          f"{a['selected'] + a['rejected']}; Dice with the hidden truth {_figure(a['dice'])} "
                          f"(rejected {_figure(a['rejected_dice'])}), size/truth {_figure(a['size_ratio'])}")
            if out:
                written = [name for name in ("metrics.jsonl", "summary.json", "best.safetensors", "final.safetensors")
                           if (out / name).is_file()]
                print(f"wrote {out}/{', '.join(written)}")
    return 0


def _figure(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _model_file(path: Path) -> Path:
    """A checkpoint as given, or a site folder's newest model (as napari's Predict starts with), said."""
    if not path.is_dir():
        return path
    from fedmix_engine.site_models import GLOBAL_MODEL, LOCAL_MODEL, newest_site_model

    model = newest_site_model(path)
    if model is None and (runs := [n for n in ("best.safetensors", "final.safetensors") if (path / n).is_file()]):
        raise InputError(path, f"is a simulate run's folder: give one of its checkpoints, {' or '.join(runs)} "
                               "(best: the round chosen on the validation images)")
    if model is None:
        raise InputError(path, f"is a folder without a model ({GLOBAL_MODEL} or {LOCAL_MODEL}); "
                               "give a .safetensors checkpoint, or a site folder that has trained")
    print(f"model: {model}")
    return model


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedmix_engine.evaluation import (
        left_out_note,
        mean_image_dice,
        own_model_note,
        score_site,
        summarise,
        write_scores,
    )
    from fedmix_engine.predict import Predictor, check_threshold

    check_threshold(args.threshold)
    if args.out:
        check_writable_file(args.out, args.overwrite, "pass --overwrite")  # before the work, not after it
    model = _model_file(args.model)
    predictor = Predictor.from_checkpoint(model, device=args.device, inference=args.inference)
    _say_gpu_not_used(predictor)
    if note := own_model_note(model, args.site):
        print(f"note: {note}", file=sys.stderr)
    rows = score_site(predictor, args.site, lambda done, total: progress_bar(done, total, "evaluate"), args.threshold)
    clear_progress_bar()
    if args.out:
        write_scores(args.out, rows, args.threshold)  # a failing disk: said by the command line's OSError line
    summary = summarise(rows)
    in_mm = any(c.with_spacing for c in summary)
    cut = f"; masks at probability > {args.threshold:g}" if args.threshold != 0.5 else ""
    images = len({r.image for r in rows})
    left_out = f" ({left})" if (left := left_out_note(args.site, images)) else ""
    spacing_note = " and in mm where it has a pixel spacing" if in_mm else " (no image has a pixel spacing for mm)"
    print(f"{args.site}: {images} image(s) with full ground truth{left_out}{cut}; Dice and IoU "
          f"per image (both empty: 1), HD95 in pixels of the image{spacing_note}")
    print(f"{'class':<16} {'images':>6} {'present':>7}  {'Dice mean ± std':<16} {'IoU':>5}  {'HD95 px':>7}"
          + (f"  {'HD95 mm':>7}" if in_mm else "") + "  (medians)")
    for c in summary:
        undefined = f"; {c.hd95_undefined} undefined: one mask empty" if c.hd95_undefined else ""
        partly = f"; mm from {c.with_spacing} of {c.images} images" if in_mm and c.with_spacing < c.images else ""
        mm = f"  {_defined(c.hd95_mm_median, 2):>7}" if in_mm else ""
        print(f"{c.label:<16} {c.images:>6} {c.lesion_images:>7}  {c.dice_mean:.3f} ± {c.dice_std:.3f}    "
              f"{c.iou_mean:.3f}  {_defined(c.hd95_median, 1):>7}{mm}" + (f"  ({(undefined + partly)[2:]})"
                                                                if undefined or partly else ""))
    reported = "as simulate reports" if args.threshold == 0.5 else "simulate reports them at 0.5"
    print(f"mean Dice over images (classes averaged per image, {reported}): {mean_image_dice(rows):.3f}"
          + (f"; every image's metrics: {args.out}" if args.out else ""))
    return 0


def _say_gpu_not_used(predictor) -> None:
    """predict and evaluate print no device line: a --device cuda on a machine whose GPU is gone (a driver
    update) ran on the CPU, many times slower, and nothing said so."""
    if predictor.plan.gpu_not_used:
        print(f"note: {predictor.plan.note}", file=sys.stderr)


def _defined(value: float, digits: int) -> str:
    """A median, or "—" where no image defines it (as the Evaluate panel writes it), not "nan"."""
    return "—" if math.isnan(value) else f"{value:.{digits}f}"


SHOWN_PROBLEMS = 20  # images predict could not predict, listed one by one; the rest are counted


def cmd_predict(args: argparse.Namespace) -> int:
    from fedmix_engine.predict import (
        RECORD_FILE,
        Predictor,
        batch_notes,
        check_batch,
        earlier_masks,
        predict_folder,
        unread_subfolders,
    )

    check_batch(args.input, args.threshold, args.out, args.recursive)  # before the model loads, as napari does
    unread = [] if args.recursive else unread_subfolders(args.input, args.out)
    predictor = Predictor.from_checkpoint(_model_file(args.checkpoint), device=args.device, inference=args.inference)
    _say_gpu_not_used(predictor)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    rows = predict_folder(predictor, args.input, args.out, args.threshold,
                          progress=lambda done, total, row: progress_bar(done, total, "predict"),
                          dicom_seg=args.dicom_seg, classes=classes,
                          on_frames=lambda path, done, total: progress_bar(done, total, f"predict {path.name}: frame"),
                          recursive=args.recursive, resume=args.resume)
    failed = [r for r in rows if r.failed]
    others = [r for r in rows if r.status != "ok" and not r.failed]  # files that are no images to predict
    no_seg = [r for r in rows if r.seg_file.startswith("not written")]
    clear_progress_bar()
    segs = sum(r.seg_file.endswith(".dcm") for r in rows)
    kept = parse_json((args.out / RECORD_FILE).read_text())["files"].get("kept", 0)
    done = len(rows) - len(failed) - len(others)
    print(f"predicted {done - kept} image(s) into {args.out} (summary.csv, prediction.json)"
          + (f"; {kept} kept from the earlier batch" if args.resume else "")
          + (f"; {segs} DICOM SEG(s)" if args.dicom_seg else "")
          + (" (--dicom-seg: none of the images is DICOM, and a SEG is written for DICOM images only: it refers "
             "to its source image)" if args.dicom_seg and not segs and not no_seg and done else ""))
    lines = [f"  {r.file}: {r.status}" for r in failed] + [f"  {r.file}: mask written, DICOM SEG {r.seg_file}"
                                                           for r in no_seg]
    for line in lines[:SHOWN_PROBLEMS]:
        print(line)
    if len(lines) > SHOWN_PROBLEMS:
        print(f"  … and {len(lines) - SHOWN_PROBLEMS} more (every file's status is in summary.csv)")
    if others:
        print(f"  {len(others)} other file(s) are not images to predict ({first_names([r.file for r in others])}); "
              "summary.csv lists them")
    for note in batch_notes(rows, unread, earlier_masks(args.out, rows)):
        print(f"note: {note}")
    return 1 if failed or no_seg else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the training-side subcommands."""
    p = sub.add_parser("simulate", help="run FedMix or a baseline on N sites in one process")
    p.add_argument("--sites", type=Path, nargs="+", help="site folders")
    p.add_argument("--eval", type=Path, help="evaluation tree: <site>/val and <site>/test stores (and <site>/oracle)")
    p.add_argument("--sample", type=Path, help="a make-sample folder: its site-* folders and eval/ tree")
    p.add_argument("--method", default="fedmix",
                   choices=("fedmix", "fedmix-fixed", "fedavg", "fedavg-mask-only", "supervised-upper", "local"),
                   help="FedMix with adaptive or data-size weights, or a baseline of the paper (docs/engine.md)")
    p.add_argument("--rounds", type=int, default=10, help="federated rounds")
    p.add_argument("--seed", type=int, default=0, help="initialisation, augmentation and batch order (CPU runs "
                   "repeat exactly on one machine, torch build and --threads)")
    p.add_argument("--lam", type=float, default=10.0, help="λ: weight of the loss term (paper: 10 breast/skin, 2 OCT)")
    p.add_argument("--beta", type=float, default=1.5, help="β: loss exponent (paper: 1.5 breast, 3 skin/OCT)")
    p.add_argument("--model", default="unet", metavar="NAME",
                   help="the network: unet (the paper's), or one an installed package offers (entry point group "
                        "fedmix_engine.models; docs/engine.md)")
    p.add_argument("--width", type=int, default=16, help="U-Net base width (64 = the paper's 17.3 M parameters)")
    p.add_argument("--image-size", type=int, default=128, help="images are resized to this side (reference: 256)")
    p.add_argument("--crop-size", type=int,
                   help="random training crop, a multiple of 16 (default: 7/8 of --image-size, rounded down to "
                        "a multiple of 16: 112 for 128; reference: 224 of 256)")
    p.add_argument("--batch-size", type=int, default=8, help="training batch (reference: 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (reference: 1e-3)")
    p.add_argument("--local-epochs", type=int, default=1, help="epochs over a site's data per round")
    p.add_argument("--tau", type=float, default=0.9, help="pseudo-label agreement threshold")
    p.add_argument("--pl-warmup", type=int, default=0,
                   help="rounds trained on pixel masks only (and lesion-free images at sites that have masks) "
                        "before pseudo-labels; sites without masks sit these rounds out")
    p.add_argument("--loss", default="dice", choices=("dice", "dice+bce"), help="training loss (reference: dice)")
    p.add_argument("--inference", default="net1", choices=("net1", "mean"),
                   help="evaluate network 1 of the pair or the mean of both")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (an Apple GPU: only when named)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast on GPU")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch, at most the machine's cores (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("runs/simulate"),
                   help="output folder (metrics.jsonl, summary.json, checkpoints); must not hold an earlier run")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p.add_argument("--snapshot-every", type=int, default=1, metavar="K",
                   help="write the resumable snapshot every K rounds and after the last (0: never); at the "
                        "reference width one is ≈ 1.1 GB for 3 sites")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out after its last completed round (same settings; --rounds may "
                        "be raised to extend a finished run)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("evaluate", help="a model's Dice, IoU and HD95 on a site's fully labelled images")
    p.add_argument("model", type=Path, help="a .safetensors checkpoint, or a site folder: its newest model")
    p.add_argument("site", type=Path, help="a site folder with masks (an image tagged all-absent counts as "
                                           "lesion-free), not trained on: e.g. a sample federation's "
                                           "eval/site-a/test, or labelled images kept apart")
    p.add_argument("--out", type=Path, help="also write every image's metrics per class to this CSV (a new file)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="probability above which a pixel is foreground (as predict's --threshold)")
    p.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    p.add_argument("--inference", choices=("net1", "mean"),
                   help="network 1 of the pair, or the mean of both (default: the checkpoint's choice, else net1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (an Apple GPU: only when named)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="predict masks for a folder of images (or one file) with a checkpoint")
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint (simulate's best.safetensors, "
                   "a server round, or one the plugin saved), or a site folder: its newest model")
    p.add_argument("input", type=Path, help="folder of images (2-D, or stacks such as multi-page TIFFs, "
                                             "DICOM cine loops and videos, predicted frame by frame), or one "
                                             "such file")
    p.add_argument("out", type=Path, help="output folder: <stem>_mask.tif per image (<stem>_<suffix>_mask.tif "
                   "where two images share a stem), summary.csv and prediction.json (the model "
                   "and settings)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability above which a pixel is foreground")
    p.add_argument("--inference", choices=("net1", "mean"),
                   help="network 1 or the mean of both (default: what the checkpoint was evaluated with)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (an Apple GPU: only when named)")
    p.add_argument("--recursive", "-r", action="store_true",
                   help="also predict the images in the folder's sub-folders (a PACS export's patient, study and "
                        "series folders); each mask goes to the same sub-folder of the output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped batch into the same output folder: the masks it wrote are kept, not "
                        "predicted again (refused unless it had the same model, input and settings)")
    p.add_argument("--dicom-seg", action="store_true",
                   help="also write each DICOM image's mask as a DICOM SEG (<stem>_seg.dcm) for PACS and viewers")
    p.add_argument("--classes", help="segment names for the DICOM SEG, comma-separated, one per model class "
                                     "(default: the checkpoint's class names if it has them, else lesion, or "
                                     "class 1, class 2, …)")
    p.set_defaults(func=cmd_predict)
