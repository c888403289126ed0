"""N sites in one process, for research and benchmarks.

Calls exactly the functions the real federation calls — ``local_update`` at each site and
``StreamingAggregate`` at the server — so a simulated result is a federated result without the
network. Model selection uses the validation split of every site (mean Dice); the test split is
evaluated once, with the selected round's model.

Methods (the paper's comparisons):

========================  ======================================================================
``fedmix``                all supervision, pseudo-labels, adaptive weights (λ, β)
``fedmix-fixed``          same, weights by samples used (λ = 0)
``fedavg``                same local update, FedAvg weights by full dataset size
``fedavg-mask-only``      only pixel-labelled images, at any site; FedAvg weights by their count
``supervised-upper``      every site fully labelled (``eval/<site>/oracle``), FedAvg: the upper bound
``local``                 each site trains alone on all its supervision; no federation
========================  ======================================================================
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from fedmix_engine.atomic import append_line, atomic_write_bytes, make_folder
from fedmix_engine.checkpoint import save_checkpoint
from fedmix_engine.config_diff import changed_fields
from fedmix_engine.data.site_store import SiteStore, refuse_site_folder
from fedmix_engine.data.tensors import SiteTensors, load_site_tensors
from fedmix_engine.device import DevicePlan, plan_device, release_memory
from fedmix_engine.environment import changed_between, describe_environment
from fedmix_engine.errors import InputError, SettingsDiffer
from fedmix_engine.evaluation import EvalSet, evaluate
from fedmix_engine.fedmix.aggregation import StreamingAggregate
from fedmix_engine.fedmix.local_update import (
    LocalResult,
    PseudoLabelsChosen,
    SiteState,
    TrainProgress,
    iter_local_update,
    site_seed,
)
from fedmix_engine.fedmix.pair import PairState, init_pair
from fedmix_engine.fedmix.pseudo_label_audit import audit_pseudo_labels, load_truth
from fedmix_engine.fedmix.pseudo_labels import needs_prediction
from fedmix_engine.fedmix.train_config import TrainConfig
from fedmix_engine.fedmix.weights import AggregationRule
from fedmix_engine.folder_lock import hold_folder
from fedmix_engine.json_values import parse_json
from fedmix_engine.model import ModelConfig
from fedmix_engine.predict import Predictor
from fedmix_engine.run_snapshot import Snapshot, clear_snapshots, latest_snapshot, load_snapshot, save_snapshot
from fedmix_engine.seeds import check_seed
from fedmix_engine.strict_json import strict_dumps

log = logging.getLogger(__name__)

METHODS = ("fedmix", "fedmix-fixed", "fedavg", "fedavg-mask-only", "supervised-upper", "local")


@dataclass(frozen=True)
class SimulationConfig:
    method: str = "fedmix"
    rounds: int = 10
    seed: int = 0
    lam: float = 10.0
    beta: float = 1.5
    inference: str = "net1"
    device: str = "auto"
    precision: str = "fp32"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(base_width=16))
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError("--method", f"'{self.method}' is not one of {', '.join(METHODS)}")
        if self.rounds < 1:
            raise InputError("--rounds", f"must be ≥ 1, not {self.rounds}")
        check_seed(self.seed, "--seed")
        self.train.validate()
        self.model.validate()
        AggregationRule(self.lam, self.beta)


@dataclass(frozen=True)
class SimulationStarted:
    """The run's data is loaded and its device chosen: said first, so an asked-for GPU that is not
    there is seen before the rounds, not after them."""

    device: str
    precision: str
    note: str  # why this device and precision (a fallback says so)
    first_round: int  # 1, or the round a resumed run continues from
    idle: tuple[str, ...] = ()  # sites with no sample the method trains on: weight 0 every round

    def idle_note(self, method: str) -> str:
        """Which sites train on nothing, and why, or "": a wrong or empty folder among the sites otherwise
        showed only as "n=0" in every round's line."""
        if not self.idle:
            return ""
        adds = "it adds" if len(self.idle) == 1 else "they add"
        return (f"{', '.join(self.idle)}: no image with {trained_on(method)}, so {adds} nothing to the global "
                "model (weight 0 every round)")


@dataclass(frozen=True)
class RoundDone:
    """One round's record (also a line of ``metrics.jsonl``)."""

    round: int
    weights: dict[str, float]
    n: dict[str, int]
    losses: dict[str, float]
    counts: dict[str, dict[str, int]]
    val_dice: dict[str, float]
    val_mean: float
    best_round: int
    seconds: float
    # per site and kind: the pseudo-labels against the hidden truth (pseudo_label_audit; needs eval/<site>/oracle)
    pl_audit: dict[str, dict[str, dict]] = field(default_factory=dict)


@dataclass
class SimulationResult:
    method: str
    best_round: int
    val_dice: dict[str, float]
    test_dice: dict[str, float]
    test_mean: float
    out_dir: Path | None
    history: list[RoundDone] = field(default_factory=list)
    # per site, each class's test Dice (its mean over the images): which class the model learns, which it misses
    test_dice_per_class: dict[str, dict[str, float]] = field(default_factory=dict)

    def class_means(self) -> dict[str, float]:
        """Each class's test Dice, averaged over the sites as ``test_mean`` is."""
        if not self.test_dice_per_class:
            return {}
        classes = next(iter(self.test_dice_per_class.values()))
        return {c: round(float(np.mean([site[c] for site in self.test_dice_per_class.values()])), 4)
                for c in classes}


SimulationEvent = SimulationStarted | TrainProgress | RoundDone | SimulationResult


@dataclass
class _Site:
    name: str
    data: SiteTensors
    full_size: int
    state: SiteState = field(default_factory=SiteState)
    pair: PairState | None = None  # only for the "local" method
    val: EvalSet | None = None
    test: EvalSet | None = None
    truth: tuple | None = None  # the oracle's masks for the audit: (masks, known), never given to the trainer


def _site_name(path: Path) -> str:
    with SiteStore.open(path, readonly=True) as store:
        return store.config.name


def _load_sites(site_dirs: list[Path], eval_root: Path | None, config: SimulationConfig) -> list[_Site]:
    if not site_dirs:
        raise InputError("--sites", "give at least one site folder")
    sites, classes, seen = [], None, {}
    for path in site_dirs:
        name = _site_name(path)
        if name in seen:  # the server keys uploads by site name; found now, not after a round of training
            raise InputError("--sites", f"'{seen[name]}' and '{path}' are both site '{name}': give each site once "
                             "(sites are told apart by the name in site.json)")
        seen[name] = path
        train_dir = path
        if config.method == "supervised-upper":
            if eval_root is None:
                raise InputError("--eval", "supervised-upper needs the evaluation tree with <site>/oracle stores")
            train_dir = eval_root / name / "oracle"
            if not train_dir.is_dir():
                raise InputError(train_dir, "no oracle store (fully labelled training images) for this site")
        with SiteStore.open(train_dir, readonly=True) as store, store.training_view() as view:
            if classes is None:
                classes = view.classes
            elif view.classes != classes:
                raise InputError(path, f"classes {list(view.classes)} differ from the first site's {list(classes)}")
            if view.config.channels != config.model.in_channels:
                raise InputError(path, f"site has {view.config.channels} channel(s), the model expects "
                                 f"{config.model.in_channels}")
            data = load_site_tensors(view, config.train.image_size, mask_only=config.method == "fedavg-mask-only")
        site = _Site(name, data, len(data))
        if eval_root is not None:
            for split in ("val", "test"):
                split_dir = eval_root / name / split
                if not split_dir.is_dir():
                    raise InputError(split_dir, f"no {split} store for site '{name}' in the evaluation tree")
                setattr(site, split, EvalSet.from_store(split_dir, config.train.image_size, len(classes),
                                                       config.model.in_channels))
            if needs_prediction(data).any():  # a site (or a method's view of it) with pseudo-labels to audit
                site.truth = load_truth(eval_root / name / "oracle", data, config.train.image_size)
        sites.append(site)
    sites.sort(key=lambda s: s.name)  # the server aggregates in name order too
    if not any(s.full_size for s in sites):  # else every round trains nothing and a random model is "best"
        raise _nothing_to_train(site_dirs, sites, config.method)
    if config.model.num_classes != len(classes):
        raise InputError("model.num_classes", f"{config.model.num_classes} ≠ the sites' {len(classes)} classes")
    return sites


def trained_on(method: str) -> str:
    """What a site's image needs for ``method`` to train on it."""
    return {"fedavg-mask-only": "a pixel mask (fedavg-mask-only trains on masks only)",
            "supervised-upper": "full ground truth in the oracle store"}.get(method, "a mask, a box or a tag")


def _nothing_to_train(site_dirs: list[Path], sites: list[_Site], method: str) -> InputError:
    """Why no site has a sample, in the words of the method's view of the sites; one site (napari's Train
    alone) is named by its folder."""
    where, whose = (site_dirs[0], "no image") if len(sites) == 1 else \
        ("--sites", "no image of " + ", ".join(f"'{s.name}'" for s in sites))
    if method == "fedavg-mask-only":
        return InputError(where, f"{whose} has a pixel mask, and fedavg-mask-only trains on masks only")
    if method == "supervised-upper":
        return InputError(where, f"{whose} is in the oracle store: supervised-upper trains on nothing")
    return InputError(where, f"{whose} has a mask, a box or a tag: there is nothing to train on (annotate images in "
                             "napari's FedMix Annotate, or import --masks, --boxes or --tags with "
                             "`fedmix-engine site import`)")


def _evaluate_pair(pair: PairState, config: SimulationConfig, plan: DevicePlan, sites: list[_Site],
                   split: str) -> dict[str, float]:
    return {name: scores["dice"] for name, scores in _scores(pair, config, plan, sites, split).items()}


def _scores(pair: PairState, config: SimulationConfig, plan: DevicePlan, sites: list[_Site],
            split: str) -> dict[str, dict]:
    """``evaluate``'s figures per site with a ``split`` (val or test)."""
    predictor = Predictor(pair, config.model, config.train.image_size, plan, config.inference,
                          batch_size=config.train.pl_batch_size or None)
    return {s.name: evaluate(predictor, getattr(s, split)) for s in sites if getattr(s, split) is not None}


RUN_FILES = ("metrics.jsonl", "summary.json", "config.json", "final.safetensors", "best.safetensors")


def check_out_folder(out: Path, overwrite: bool) -> None:
    """An earlier run's metrics and checkpoints are results: refuse to write over them unless asked,
    before any work is done (a second run with the default ``--out`` used to empty the first's metrics).
    A site folder is refused even with ``--overwrite``: a run's files would mix with the site's own."""
    refuse_site_folder(out, f"the run (e.g. --out runs/{out.name})")
    if overwrite or not out.is_dir():
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found:
        raise InputError(out, f"holds an earlier run ({', '.join(found)}); choose another output folder, "
                              "or allow replacing it (--overwrite)")


# what may differ when a run is resumed: where it runs, and how many rounds it should reach
RESUME_MAY_DIFFER = ("rounds", "device")


def _config_record(config: SimulationConfig) -> dict:
    return parse_json(json.dumps(asdict(config), default=str))


def eval_identity(eval_root: Path | None) -> str | None:
    """A digest of an evaluation tree's validation and test stores (site, split, image ids, sizes and
    which have masks): what a resumed run must evaluate on, whatever path the tree has now."""
    if eval_root is None:
        return None
    digest = hashlib.sha256()
    for split_dir in sorted(p for p in eval_root.glob("*/*") if p.name in ("val", "test") and p.is_dir()):
        with SiteStore.open(split_dir, readonly=True) as store:
            for rec in store.records():
                digest.update(f"{split_dir.parent.name}/{split_dir.name}/{rec.id}/{rec.height}x{rec.width}/"
                              f"{rec.has_mask}\n".encode())
    return digest.hexdigest()


def _check_resumable(out: Path, config: SimulationConfig, eval_root: Path | None, identity: str | None) -> dict:
    """Resuming with other settings would silently mix two experiments: name every differing field.
    Returns the run's stored config.json."""
    try:
        stored = parse_json((out / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(out / "config.json", f"cannot resume: the run's settings are unreadable ({exc})") from None
    stored_eval = stored.get("eval") if stored.get("eval") not in (None, "None") else None
    if "eval_identity" in stored:  # the same images wherever the tree now lies: a moved or copied workdir resumes
        same_eval = stored["eval_identity"] == identity
    else:  # a run from before identities were recorded: its path
        now = eval_root.resolve() if eval_root else None
        same_eval = (Path(stored_eval).resolve() if stored_eval else None) == now
    other_eval = [] if same_eval else [
        f"eval: {stored_eval!r} in the run, {str(eval_root) if eval_root else None!r} now, and not the same "
        "validation and test images (the best round is chosen on its validation split)"]
    settings = [change for change in changed_fields(stored, _config_record(config))
                if change[0] not in RESUME_MAY_DIFFER]
    if other_eval or settings:  # each setting named by the function the message is written with
        raise SettingsDiffer(out, lambda name: "cannot resume with other settings (" + "; ".join(
            [*other_eval, *(f"{name(key)}: {was!r} in the run, {now!r} now" for key, was, now in settings)]) + ")")
    return stored


def _environments(earlier: list[dict], from_round: int, plan: DevicePlan, out: Path) -> list[dict]:
    """The run's environments so far plus this one, from the round it starts at; a resume on other
    versions or hardware is said, since its later rounds will not repeat an uninterrupted run exactly."""
    now = {"from_round": from_round, **describe_environment(plan.device)}
    earlier = [e for e in earlier if e.get("from_round", 1) < from_round]  # later rounds are trained again
    if earlier:
        changed = changed_between(earlier[-1], now)
        if not changed:
            return earlier  # the same environment goes on
        log.warning("%s: resumed at round %d on another environment (%s); the rounds from here on will not "
                    "be bit-identical to an uninterrupted run", out, from_round, "; ".join(changed))
    return [*earlier, now]


def iter_simulation(site_dirs: list[str | Path], eval_root: str | Path | None, config: SimulationConfig,
                    out_dir: str | Path | None = None, overwrite: bool = False, resume: bool = False,
                    snapshot_every: int = 1) -> Iterator[SimulationEvent]:
    """Run a simulation, yielding ``SimulationStarted``, per-batch progress, one ``RoundDone`` per round,
    then the result.

    ``out_dir`` must not hold an earlier run unless ``overwrite`` is set; with ``resume`` the run in
    ``out_dir`` continues after its last snapshot (``run_snapshot``), up to ``config.rounds``. A
    snapshot is written every ``snapshot_every`` rounds and after the last (0: never): at the
    reference width it is ≈ 1.1 GB for 3 sites, ≈ 2.6 s to write here."""
    held: list[Callable[[], None]] = []  # the output folder's lock, once taken: released however the run ends
    try:
        yield from _simulation(site_dirs, eval_root, config, out_dir, overwrite, resume, snapshot_every, held)
    finally:
        for release in held:
            release()


def _simulation(site_dirs: list[str | Path], eval_root: str | Path | None, config: SimulationConfig,
                out_dir: str | Path | None, overwrite: bool, resume: bool, snapshot_every: int,
                held: list[Callable[[], None]]) -> Iterator[SimulationEvent]:
    """The run itself; it locks ``out_dir`` (into ``held``) before writing to it."""
    config.validate()
    if snapshot_every < 0:
        raise InputError("--snapshot-every", f"must be ≥ 0 (0: no snapshots), not {snapshot_every}")
    out = Path(out_dir) if out_dir is not None else None
    eval_root = Path(eval_root) if eval_root is not None else None
    identity = eval_identity(eval_root) if out is not None else None
    if resume:
        if out is None or overwrite:
            raise InputError("--resume", "continues the run in --out; give --out, and not --overwrite")
        if out.is_dir():  # held before its snapshot is read: a run still writing there replaces its snapshots
            held.append(hold_folder(out, _ANOTHER_RUN, RUN_LOCK))
        snapshot = load_snapshot(out)
        stored = _check_resumable(out, config, eval_root, identity)
        if snapshot.round > config.rounds:
            raise InputError("--rounds", f"the run in {out} has already done {snapshot.round} rounds; "
                                         f"give --rounds {snapshot.round} or more")
    elif out is not None:
        check_out_folder(out, overwrite)
    plan = plan_device(config.device, config.precision)
    global_pair = init_pair(config.model, config.seed)  # before anything is written: it probes another network
    sites = _load_sites([Path(p) for p in site_dirs], eval_root, config)
    if resume and snapshot.sites != [s.name for s in sites]:
        raise InputError("--sites", f"the run in {out} trained sites {snapshot.sites}, not {[s.name for s in sites]}")
    if out is not None:
        make_folder(out)
        if not held:
            held.append(hold_folder(out, _ANOTHER_RUN, RUN_LOCK))
        environments = _environments(stored.get("environments", []) if resume else [],
                                     snapshot.round + 1 if resume else 1, plan, out)
        if not resume:
            clear_snapshots(out)  # an overwritten run's snapshots must never be resumed into this one
            (out / "metrics.jsonl").write_text("")
        (out / "config.json").write_text(json.dumps(
            {**_config_record(config), "sites": [str(p) for p in site_dirs],
             "eval": str(eval_root.resolve()) if eval_root is not None else None,
             "eval_identity": identity,
             "device": str(plan.device), "device_note": plan.note, "environments": environments},
            indent=2, default=str) + "\n")

    rule = AggregationRule.for_method("fedmix" if config.method == "fedmix" else "fedavg", config.lam, config.beta)
    train = config.train
    if config.method in ("fedavg-mask-only", "supervised-upper"):
        train = replace(train, pseudo_labels=config.method == "supervised-upper")
    meta = {"image_size": train.image_size, "inference": config.inference, "method": config.method,
            "classes": list(sites[0].data.classes)}  # names the predictions' labels (DICOM SEG segments)
    if config.method == "local":
        for s in sites:
            s.pair = {k: v.clone() for k, v in global_pair.items()}

    best_round, best_val, best_pair = 0, -np.inf, global_pair
    per_site_best: dict[str, tuple[float, int, PairState]] = {}
    history: list[RoundDone] = []
    if resume:
        best_round, best_val, per_site_best = snapshot.best_round, snapshot.best_val, snapshot.site_best
        try:
            history = [RoundDone(**record) for record in snapshot.history]
        except TypeError as exc:  # a damaged progress.json's history: records of another shape, or none
            raise InputError(latest_snapshot(out), f"damaged snapshot, cannot resume from it (TypeError: {exc})") \
                from None
        if snapshot.global_pair is not None:
            global_pair, best_pair = snapshot.global_pair, snapshot.best_pair
        for s in sites:
            s.state = snapshot.states.get(s.name, SiteState())
            if config.method == "local":
                s.pair = snapshot.site_pairs[s.name]
        # what followed the snapshot may have been cut short: the outputs are made again from it
        atomic_write_bytes(out / "metrics.jsonl", "".join(strict_dumps(r) + "\n" for r in snapshot.history).encode())
        if config.method != "local":
            save_checkpoint(out / "final.safetensors", global_pair, config.model, {**meta, "round": snapshot.round})
            save_checkpoint(out / "best.safetensors", best_pair, config.model, {**meta, "round": best_round})
    first_round = (snapshot.round if resume else 0) + 1
    yield SimulationStarted(str(plan.device), plan.precision, plan.note, first_round,
                            tuple(s.name for s in sites if not s.full_size))
    for rnd in range(first_round, config.rounds + 1):
        t0 = time.perf_counter()
        acc = StreamingAggregate(rule)
        n, losses, counts, audits = {}, {}, {}, {}
        for s in sites:
            start = s.pair if config.method == "local" else global_pair
            result: LocalResult | None = None
            for event in iter_local_update(start, s.data, config.model, train, plan, s.state,
                                           seed=site_seed(config.seed, s.name), round_index=rnd):
                if isinstance(event, LocalResult):
                    result = event
                elif isinstance(event, PseudoLabelsChosen):
                    if s.truth is not None:
                        audits[s.name] = audit_pseudo_labels(event.labels, s.data, *s.truth)
                else:
                    yield event
            assert result is not None
            s.state = result.state
            rep = result.report
            n[s.name], losses[s.name], counts[s.name] = rep.n, round(rep.loss, 6), rep.counts
            if config.method == "local":
                s.pair = result.pair
            else:
                # FedAvg and the upper bound weigh by full dataset size; FedMix by samples used
                weight_n = s.full_size if config.method in ("fedavg", "supervised-upper") and rep.n > 0 else rep.n
                acc.add(s.name, result.pair, weight_n, rep.loss)
        if config.method == "local":
            weights = {s.name: 1.0 for s in sites}
            val = {}
            for s in sites:
                if s.val is not None:
                    score = _evaluate_pair(s.pair, config, plan, [s], "val")[s.name]
                    val[s.name] = score
                    if score > per_site_best.get(s.name, (-np.inf, 0, None))[0]:
                        per_site_best[s.name] = (score, rnd, {k: v.clone() for k, v in s.pair.items()})
        else:
            weights = acc.weights()
            new_pair = acc.result()
            if new_pair is not None:
                global_pair = new_pair
            val = _evaluate_pair(global_pair, config, plan, sites, "val") if eval_root else {}
        val_mean = float(np.mean(list(val.values()))) if val else float("nan")
        if config.method != "local" and (not val or val_mean > best_val):
            best_val, best_round = val_mean, rnd
            best_pair = {k: v.clone() for k, v in global_pair.items()}
        if out is not None and config.method != "local":
            save_checkpoint(out / "final.safetensors", global_pair, config.model, {**meta, "round": rnd})
            if best_round == rnd:
                save_checkpoint(out / "best.safetensors", global_pair, config.model, {**meta, "round": rnd})
        record = RoundDone(rnd, {k: round(v, 6) for k, v in weights.items()}, n, losses, counts,
                           {k: round(v, 4) for k, v in val.items()}, round(val_mean, 4), best_round,
                           round(time.perf_counter() - t0, 2), {k: v for k, v in audits.items() if v})
        history.append(record)
        if out is not None and snapshot_every and (rnd % snapshot_every == 0 or rnd == config.rounds):
            federated = config.method != "local"
            save_snapshot(out, Snapshot(
                rnd, [s.name for s in sites], best_round, best_val, [asdict(r) for r in history],
                global_pair if federated else None, best_pair if federated else None,
                {s.name: s.state for s in sites if s.state.optimizers is not None},
                {} if federated else {s.name: s.pair for s in sites}, per_site_best), config.model)
        if out is not None:
            append_line(out / "metrics.jsonl", strict_dumps(asdict(record)))
        yield record

    if config.method == "local":
        scores = {}
        for s in sites:
            if s.test is not None and s.name in per_site_best:
                scores.update(_scores(per_site_best[s.name][2], config, plan, [s], "test"))
        best_round = -1
        val_final = {k: v[0] for k, v in per_site_best.items()}
    else:
        scores = _scores(best_pair, config, plan, sites, "test") if eval_root else {}
        val_final = history[best_round - 1].val_dice if best_round else {}
    test = {name: score["dice"] for name, score in scores.items()}
    test_mean = float(np.mean(list(test.values()))) if test else float("nan")
    per_class = {name: {c: round(v, 4) for c, v in score["dice_per_class"].items()} for name, score in scores.items()}
    result = SimulationResult(config.method, best_round, val_final, {k: round(v, 4) for k, v in test.items()},
                              round(test_mean, 4), out, history, per_class)
    if out is not None:
        (out / "summary.json").write_text(strict_dumps(
            {"method": config.method, "best_round": best_round, "val_dice": val_final, "test_dice": result.test_dice,
             "test_mean": result.test_mean, "test_dice_per_class": per_class}, indent=2) + "\n")
    release_memory(plan)
    yield result


RUN_LOCK = "run.lock"  # Windows: a running simulation's lock file in its --out (on POSIX it flocks the folder)
_ANOTHER_RUN = ("another run is writing to this folder (a terminal's simulate, or napari's Train & federate on this "
                "site); wait for it to end, or give this one another --out")


def run_simulation(site_dirs: list[str | Path], eval_root: str | Path | None, config: SimulationConfig,
                   out_dir: str | Path | None = None,
                   on_round: Callable[[RoundDone], None] | None = None,
                   overwrite: bool = False, resume: bool = False, snapshot_every: int = 1) -> SimulationResult:
    """``iter_simulation`` without per-batch progress; calls ``on_round`` after every round."""
    final = None
    for event in iter_simulation(site_dirs, eval_root, config, out_dir, overwrite, resume, snapshot_every):
        if isinstance(event, RoundDone) and on_round:
            on_round(event)
        elif isinstance(event, SimulationResult):
            final = event
    assert final is not None
    return final
