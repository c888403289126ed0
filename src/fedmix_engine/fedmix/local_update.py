"""One site's local update: global pair + the site's own data → new pair + report {n_k, ℓ_k, …}.

The function a site runs each round, in the real federation, the simulator and the Flower client
alike. It is a generator of small typed events (``TrainProgress``), ending with a ``LocalResult``;
``local_update`` drains it for callers that do not need progress. Closing the generator early
(e.g. a Stop button) stops after the current batch; the caller keeps the last good global pair.
"""

from __future__ import annotations

import copy
import math
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from fedmix_engine.data.tensors import KIND_MASK, KIND_TAG, TAG_ABSENT, SiteTensors
from fedmix_engine.device import (
    DevicePlan,
    autocast,
    grad_scaler,
    is_out_of_memory,
    on_device,
    out_of_memory,
    to_device,
)
from fedmix_engine.errors import InputError
from fedmix_engine.fedmix.losses import LOSSES
from fedmix_engine.fedmix.pair import PairState, build_pair, join_pair
from fedmix_engine.fedmix.pseudo_labels import (
    PseudoLabels,
    needs_prediction,
    predict_where_needed,
    select_pseudo_labels,
)
from fedmix_engine.fedmix.train_config import TrainConfig
from fedmix_engine.model import ModelConfig


@dataclass
class SiteState:
    """What a site keeps between rounds: Adam moments of both networks."""

    optimizers: tuple[dict, dict] | None = None
    rounds_done: int = 0


@dataclass(frozen=True)
class TrainProgress:
    stage: str  # "pseudo-labels" or "train"
    step: int
    total: int
    loss: float | None = None


@dataclass(frozen=True)
class PseudoLabelsChosen:
    """The round's targets after selection, for a caller that audits them (the simulator); the
    federation ignores it."""

    labels: PseudoLabels


@dataclass
class LocalReport:
    """Sent to the server with the weights: n_k and ℓ_k, plus counts and timings for people."""

    n: int  # samples trained on this round (pixel-labelled + selected pseudo-labelled)
    loss: float  # mean training loss of network 1 this round (ℓ_k)
    loss2: float
    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LocalResult:
    pair: PairState
    report: LocalReport
    state: SiteState


def site_seed(federation_seed: int, site: str) -> int:
    """The local-update seed of a site: the same in the simulator and the real federation."""
    return federation_seed * 1000 + zlib.crc32(site.encode()) % 1000


def _augment(images: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, crop: int, config: TrainConfig,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random crop (per sample), horizontal flip, intensity jitter; the same geometry for image and targets."""
    n, _, size, _ = images.shape
    ys = torch.randint(0, size - crop + 1, (n,), generator=gen).tolist()
    xs = torch.randint(0, size - crop + 1, (n,), generator=gen).tolist()
    flips = (torch.rand(n, generator=gen) < 0.5).tolist() if config.flip else [False] * n
    out_x, out_1, out_2 = [], [], []
    for i in range(n):
        sl = (slice(ys[i], ys[i] + crop), slice(xs[i], xs[i] + crop))
        x, a, b = images[i][:, sl[0], sl[1]], t1[i][:, sl[0], sl[1]], t2[i][:, sl[0], sl[1]]
        if flips[i]:
            x, a, b = x.flip(-1), a.flip(-1), b.flip(-1)
        out_x.append(x)
        out_1.append(a)
        out_2.append(b)
    x = torch.stack(out_x)
    if config.intensity > 0:
        gain = 1 + config.intensity * (2 * torch.rand((n, 1, 1, 1), generator=gen) - 1)
        gamma = torch.exp(config.intensity * (2 * torch.rand((n, 1, 1, 1), generator=gen) - 1))
        x = (x.clamp(0, 1) ** gamma * gain).clamp(0, 1)
    return x, torch.stack(out_1), torch.stack(out_2)


def iter_local_update(global_pair: PairState, data: SiteTensors, model_config: ModelConfig, config: TrainConfig,
                      plan: DevicePlan, state: SiteState | None = None, seed: int = 0,
                      round_index: int = 0) -> Iterator[TrainProgress | PseudoLabelsChosen | LocalResult]:
    """Run one local round, yielding progress events (and the chosen pseudo-labels) and finally a
    ``LocalResult``."""
    config.validate()
    state = state or SiteState()
    gen = torch.Generator().manual_seed(seed * 100_003 + round_index)
    with on_device(plan):
        net1, net2 = build_pair(model_config, global_pair, plan.device)
        t0 = time.perf_counter()
        warming_up = config.pl_warmup_rounds > 0 and round_index <= config.pl_warmup_rounds
        if config.pseudo_labels and not warming_up and (data.kinds != KIND_MASK).any():
            pl_batch = config.pl_batch_size or plan.pl_batch_size
            needed = needs_prediction(data)
            pred1 = predict_where_needed(net1, data, needed, plan, pl_batch)
            yield TrainProgress("pseudo-labels", 1, 2)
            pred2 = predict_where_needed(net2, data, needed, plan, pl_batch)
            yield TrainProgress("pseudo-labels", 2, 2)
            labels = select_pseudo_labels(pred1, pred2, data, config.tau, config.min_box_fill)
            labels.counts["predicted"] = int(needed.sum())
            yield PseudoLabelsChosen(labels)
        else:  # certain targets only: pixel masks, and (when pseudo-labels are on) images with every class absent
            is_mask = data.kinds == KIND_MASK
            certain = is_mask
            # During a warm-up, lesion-free images train only beside masks: a site holding nothing else would
            # learn "predict nothing" and, averaged in with a large loss-driven weight, undo the mask sites.
            if config.pseudo_labels and (not warming_up or bool(is_mask.any())):
                all_absent = (data.kinds == KIND_TAG) & (data.tags == TAG_ABSENT).all(1)
                certain = is_mask | all_absent
            labels = PseudoLabels(data.masks, data.masks, certain,
                                  {"mask": int(is_mask.sum()), "certain_negatives": int((certain & ~is_mask).sum())})
        t_pl = time.perf_counter() - t0

        keep = torch.nonzero(labels.keep).flatten()
        n = len(keep)
        opt1 = torch.optim.Adam(net1.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        opt2 = torch.optim.Adam(net2.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        if state.optimizers is not None:  # copies: load_state_dict keeps the tensors, which training then
            # changes in place, so the caller's state would take this round's step even if its update never counts
            opt1.load_state_dict(copy.deepcopy(state.optimizers[0]))
            opt2.load_state_dict(copy.deepcopy(state.optimizers[1]))
        scaler = grad_scaler(plan)
        loss_fn = LOSSES[config.loss]
        net1.train()
        net2.train()
        losses1, losses2 = [], []
        t1 = time.perf_counter()
        batches_per_epoch = (n + config.batch_size - 1) // config.batch_size
        total = batches_per_epoch * config.epochs
        step = 0

        def settle(done: int, loss1: torch.Tensor, loss2: torch.Tensor) -> TrainProgress:
            """Read a launched step's losses (on a GPU: wait for it) and check them."""
            losses = float(loss1), float(loss2)
            if not all(map(math.isfinite, losses)):  # every later step, and the update, would be NaN too
                raise _diverged(config, plan, round_index, f"at step {done} of {total} (loss {losses[0]:g})")
            losses1.append(losses[0])
            losses2.append(losses[1])
            return TrainProgress("train", done, total, losses[0])

        # a step's losses are read after the next step is launched: on a GPU the CPU crops and copies the next
        # batch while the GPU computes, instead of waiting for each step (on the CPU the same work, in order)
        launched: tuple[int, torch.Tensor, torch.Tensor] | None = None
        for _ in range(config.epochs):
            order = keep[torch.randperm(n, generator=gen)] if n else keep
            for start in range(0, n, config.batch_size):
                idx = order[start:start + config.batch_size]
                x, y1, y2 = _augment(data.images[idx], labels.target1[idx], labels.target2[idx], config.crop_size,
                                     config, gen)
                losses = _train_step(net1, net2, opt1, opt2, scaler, loss_fn, x, y1, y2, plan)
                if losses is None:  # not retried at a smaller batch: the soft Dice sums over the batch, so that
                    # would change the training, not only its speed
                    raise out_of_memory(plan, f"training at batch {config.batch_size} with {config.crop_size}² "
                                              f"crops (U-Net width {model_config.base_width}, {plan.precision})",
                                        "lower the batch or crop size (--batch-size, --crop-size; in a federation "
                                        "the server sets them), or train on the CPU (--device cpu)")
                step += 1
                if launched is not None:
                    yield settle(*launched)
                launched = (step, *losses)
        if launched is not None:
            yield settle(*launched)
        t_train = time.perf_counter() - t1
        new_pair = join_pair(net1, net2)
        if not all(bool(torch.isfinite(value).all()) for value in new_pair.values() if value.is_floating_point()):
            raise _diverged(config, plan, round_index, "in its last step (the weights are not finite)")
        new_state = SiteState((_on_cpu(opt1.state_dict()), _on_cpu(opt2.state_dict())), state.rounds_done + 1)
        report = LocalReport(
            n=n,
            loss=sum(losses1) / len(losses1) if losses1 else 0.0,
            loss2=sum(losses2) / len(losses2) if losses2 else 0.0,
            counts={**labels.counts, "trained": n},
            seconds={"pseudo_labels": round(t_pl, 4), "train": round(t_train, 4)},
        )
    yield LocalResult(new_pair, report, new_state)


def _on_cpu(optimiser_state: dict) -> dict:
    """An optimiser's ``state_dict`` with its tensors on the CPU. The moments (two model sizes a network) wait
    there between rounds, so a GPU shared with napari gets that memory back while the site waits for the
    server, and a saved state reads on a machine without that GPU. ``load_state_dict`` moves them back to
    the parameters' device."""
    return {**optimiser_state, "state": {
        index: {name: value.cpu() if isinstance(value, torch.Tensor) else value for name, value in moments.items()}
        for index, moments in optimiser_state["state"].items()}}


def _diverged(config: TrainConfig, plan: DevicePlan, round_index: int, where: str) -> InputError:
    """Training that went to NaN, said with what to change: an update of NaN weights was refused by the
    server (or stopped simulate) naming only the report's loss field."""
    fp16 = " or train in bf16 or fp32 (fp16 overflows)" if plan.precision == "fp16" else ""
    return InputError("training", f"diverged in round {round_index} {where}: lower the learning rate (lr "
                                  f"{config.lr:g}: --lr; in a federation the server sets it){fp16}")


def _train_step(net1: torch.nn.Module, net2: torch.nn.Module, opt1: torch.optim.Optimizer, opt2: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, loss_fn, x: torch.Tensor, y1: torch.Tensor, y2: torch.Tensor,
                plan: DevicePlan) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Launch one step of both networks (cross pseudo supervision: each its own targets); their losses, not
    read back (that would wait for a GPU), or None when the GPU ran out of memory (caught here, so the step's
    tensors are freed as it returns)."""
    try:
        x = to_device(x, plan)
        y1, y2 = to_device(y1, plan).float(), to_device(y2, plan).float()
        with autocast(plan):
            loss1 = loss_fn(net1(x), y1)
            loss2 = loss_fn(net2(x), y2)
        opt1.zero_grad(set_to_none=True)
        opt2.zero_grad(set_to_none=True)
        scaler.scale(loss1 + loss2).backward()
        scaler.step(opt1)
        scaler.step(opt2)
        scaler.update()
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
        if not is_out_of_memory(exc):
            raise
        return None
    return loss1.detach(), loss2.detach()


def local_update(global_pair: PairState, data: SiteTensors, model_config: ModelConfig, config: TrainConfig,
                 plan: DevicePlan, state: SiteState | None = None, seed: int = 0, round_index: int = 0) -> LocalResult:
    """``iter_local_update`` without progress: returns the ``LocalResult``."""
    result = None
    for event in iter_local_update(global_pair, data, model_config, config, plan, state, seed, round_index):
        if isinstance(event, LocalResult):
            result = event
    assert result is not None
    return result
