"""Engine values ↔ Flower records: weights as an ``ArrayRecord``, the site report as a ``MetricRecord``.

Flower serialises each ``Array`` as ``.npy`` bytes read with ``allow_pickle=False``; on top of that,
every reply is checked exactly like an upload to the built-in server: same keys, shapes and dtypes
as the global model, all values finite, and a sane report (n_k an integer ≥ 0, ℓ_k finite ≥ 0).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedmix_engine.errors import InputError
from fedmix_engine.federation.federated_evaluation import EvaluationReport
from fedmix_engine.federation.flower import FLWR_HINT
from fedmix_engine.federation.wire import ChangeSize, UpdateReport, check_finite, check_specs

try:
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
except ImportError as exc:  # the [flower] extra is optional
    raise ImportError(FLWR_HINT) from exc

ARRAYS = "arrays"  # the RecordDict keys, as Flower's own strategies name them
METRICS = "metrics"
CONFIG = "config"
NUM_EXAMPLES = "num-examples"  # n_k (FedAvg's weighting key, so stock tools read it too)
TRAIN_LOSS = "train-loss"  # ℓ_k: mean training loss of network 1
TRAIN_LOSS2 = "train-loss-net2"
COUNT_PREFIX = "count-"
HELD_OUT_DICE = "dice"  # an evaluation reply: the mean Dice over its held-out images (num-examples of them)
CLASS_FIGURES = {"dice": "dice-", "iou": "iou-", "lesion_images": "lesion-images-"}  # + the class name


def pair_to_arrays(pair: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The dual pair's state dict (``net1.*``, ``net2.*``) as an ``ArrayRecord``, key order kept."""
    # torch's contiguous(), not np.ascontiguousarray: that one turns a 0-dim tensor (BatchNorm's
    # num_batches_tracked) into shape (1,), which the receiver then refuses as another layout
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in pair.items()})


def arrays_to_pair(record: ArrayRecord, template: Mapping[str, tuple[tuple[int, ...], str]] | None,
                   where: str, reference: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Decode and check an ``ArrayRecord``; ``template`` (``wire.tensor_template``) is the global model's layout,
    ``reference`` the global pair a reply was trained from (``wire.ChangeSize``)."""
    if not isinstance(record, ArrayRecord):
        raise InputError(where, f"'{ARRAYS}' is not an ArrayRecord")
    declared = {key: (tuple(int(d) for d in array.shape), str(array.dtype)) for key, array in record.items()}
    try:
        if template is not None:
            check_specs(declared, template)
        out: dict[str, torch.Tensor] = {}
        change = ChangeSize(reference) if reference is not None else None
        for key, array in record.items():
            try:
                value = array.numpy()
            except Exception as exc:  # malformed bytes, object arrays (allow_pickle=False), ...
                raise InputError(f"tensor '{key}'", f"cannot be decoded ({type(exc).__name__}: {exc})") from None
            if (tuple(value.shape), str(value.dtype)) != declared[key]:
                raise InputError(f"tensor '{key}'", f"holds {tuple(value.shape)} {value.dtype} but declares "
                                 f"{declared[key][0]} {declared[key][1]}")
            tensor = torch.from_numpy(np.array(value, copy=True))
            check_finite(key, tensor)
            if change is not None:
                change.add(key, tensor)
            out[key] = tensor
        if change is not None:
            change.check()
    except InputError as exc:
        raise InputError(where, f"{exc.where}: {exc.reason}") from None
    return out


def report_to_metrics(report: UpdateReport) -> MetricRecord:
    metrics = {NUM_EXAMPLES: int(report.n), TRAIN_LOSS: float(report.loss), TRAIN_LOSS2: float(report.loss2)}
    metrics.update({f"{COUNT_PREFIX}{k}": int(v) for k, v in report.counts.items()})
    return MetricRecord(metrics)


def metrics_to_report(metrics: MetricRecord, where: str, loss: str | None = None) -> UpdateReport:
    """The same report validation as the built-in server's (``UpdateReport.from_dict``, and with ``loss``
    ``UpdateReport.check_loss``)."""
    if not isinstance(metrics, MetricRecord):
        raise InputError(where, f"'{METRICS}' is not a MetricRecord")
    if NUM_EXAMPLES not in metrics or TRAIN_LOSS not in metrics:
        raise InputError(where, f"the reply's metrics lack '{NUM_EXAMPLES}' or '{TRAIN_LOSS}' (n_k, ℓ_k)")
    raw = {"n": metrics[NUM_EXAMPLES], "loss": metrics[TRAIN_LOSS], "loss2": metrics.get(TRAIN_LOSS2, 0.0),
           "counts": {k.removeprefix(COUNT_PREFIX): v for k, v in metrics.items() if k.startswith(COUNT_PREFIX)}}
    try:
        report = UpdateReport.from_dict(raw)
        if loss is not None:
            report.check_loss(loss)
        return report
    except InputError as exc:
        raise InputError(where, f"{exc.where}: {exc.reason}") from None


def evaluation_to_metrics(report: EvaluationReport | None) -> MetricRecord:
    """A site's held-out scores as an evaluate reply's metrics (``num-examples`` 0: the site has no held-out
    folder); a key per class and figure, readable in Flower's own log."""
    if report is None:
        return MetricRecord({NUM_EXAMPLES: 0})
    metrics: dict[str, int | float] = {NUM_EXAMPLES: report.images, HELD_OUT_DICE: report.dice}
    for label, score in report.classes.items():
        metrics.update({prefix + label: getattr(score, field) for field, prefix in CLASS_FIGURES.items()})
    return MetricRecord(metrics)


def metrics_to_evaluation(metrics: MetricRecord, where: str, class_names: tuple[str, ...] = (),
                          num_classes: int | None = None) -> EvaluationReport | None:
    """The built-in server's checks (``EvaluationReport.from_dict``) on an evaluate reply; None for a site
    that scored nothing."""
    if not isinstance(metrics, MetricRecord) or not isinstance(metrics.get(NUM_EXAMPLES), int):
        raise InputError(where, f"an evaluate reply's '{METRICS}' must be a MetricRecord with '{NUM_EXAMPLES}'")
    if metrics[NUM_EXAMPLES] == 0:
        return None
    labels = [key.removeprefix(CLASS_FIGURES["dice"]) for key in metrics if key.startswith(CLASS_FIGURES["dice"])]
    raw = {"images": metrics[NUM_EXAMPLES], "dice": metrics.get(HELD_OUT_DICE),
           "classes": {label: {"images": metrics[NUM_EXAMPLES],
                               **{field: metrics.get(prefix + label) for field, prefix in CLASS_FIGURES.items()}}
                       for label in labels}}
    try:
        return EvaluationReport.from_dict(raw, class_names, num_classes)
    except InputError as exc:
        raise InputError(where, f"{exc.where}: {exc.reason}") from None


def decode_reply(content: RecordDict, template: Mapping[str, tuple[tuple[int, ...], str]],
                 where: str, reference: Mapping[str, torch.Tensor] | None = None, loss: str | None = None
                 ) -> tuple[dict[str, torch.Tensor], UpdateReport]:
    """One training reply → (the site's pair, its report), or an ``InputError`` naming what is wrong;
    ``reference``: the global pair the reply was trained from; ``loss``: the run's training loss, whose
    range the reported losses must keep (``UpdateReport.check_loss``)."""
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        raise InputError(where, f"the reply must hold an ArrayRecord '{ARRAYS}' and a MetricRecord '{METRICS}'")
    report = metrics_to_report(content.metric_records[METRICS], where, loss)
    return arrays_to_pair(content.array_records[ARRAYS], template, where, reference), report
