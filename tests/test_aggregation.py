"""FedMix weights against hand computation; streaming aggregation against a naive stack-and-average."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmix_engine.errors import InputError
from fedmix_engine.fedmix.aggregation import StreamingAggregate, aggregate
from fedmix_engine.fedmix.weights import AggregationRule, fedmix_weights


def test_weights_match_hand_computation() -> None:
    n, losses, lam, beta = [60, 30, 10], [0.2, 0.4, 0.8], 10.0, 1.5
    d = [60 / 100, 30 / 100, 10 / 100]
    lb = [0.2 ** 1.5, 0.4 ** 1.5, 0.8 ** 1.5]
    s = [x / sum(lb) for x in lb]
    expected = [(dk + lam * sk) / (1 + lam) for dk, sk in zip(d, s, strict=True)]
    w = fedmix_weights(n, losses, AggregationRule(lam, beta))
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    assert math.isclose(w.sum(), 1.0)
    assert w[2] > w[1] > w[0], "a site with a higher loss gets more weight"
    # λ = 0 is data-size weighting (fixed weights / FedAvg)
    np.testing.assert_allclose(fedmix_weights(n, losses, AggregationRule(0.0, beta)), d)


def test_zero_sample_sites_are_left_out_and_all_zero_losses_fall_back_to_data_size() -> None:
    w = fedmix_weights([10, 0, 30], [0.5, 0.9, 0.5], AggregationRule(10, 3))
    assert w[1] == 0.0 and math.isclose(w.sum(), 1.0)
    np.testing.assert_allclose(fedmix_weights([10, 30], [0.0, 0.0], AggregationRule(10, 3)), [0.25, 0.75])
    assert fedmix_weights([0, 0], [0.1, 0.2], AggregationRule()).sum() == 0.0


@pytest.mark.parametrize(("n", "loss", "field"), [(-1, 0.5, "n"), (float("nan"), 0.5, "n"), (3, float("inf"), "loss"),
                                                  (3, -0.1, "loss")])
def test_bad_reports_are_refused(n: float, loss: float, field: str) -> None:
    acc = StreamingAggregate(AggregationRule())
    with pytest.raises(InputError, match=rf"site-x\.{field}"):
        acc.add("site-x", {"w": torch.ones(2)}, n, loss)
    assert acc.sites == []


def _random_states(k: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"conv.weight": torch.randn(8, 4, 3, 3, generator=g), "conv.bias": torch.randn(8, generator=g),
             "norm.weight": torch.rand(8, generator=g)} for _ in range(k)]


@pytest.mark.parametrize(("lam", "beta"), [(10.0, 1.5), (10.0, 3.0), (2.0, 3.0), (0.0, 1.0)])
def test_streaming_equals_naive_stack_and_average(lam: float, beta: float) -> None:
    states = _random_states(7)
    n = [50, 3, 0, 20, 8, 100, 1]
    losses = [0.3, 0.9, 0.5, 0.1, 0.6, 0.2, 0.95]
    rule = AggregationRule(lam, beta)
    theta, weights = aggregate([(f"s{k}", st, n[k], losses[k]) for k, st in enumerate(states)], rule)
    w = torch.tensor(fedmix_weights(n, losses, rule), dtype=torch.float64)
    for key in states[0]:
        stacked = torch.stack([st[key].double() for st in states])  # naive: all models in memory
        naive = (w.view(-1, *[1] * (stacked.dim() - 1)) * stacked).sum(0)
        assert torch.allclose(theta[key].double(), naive, atol=1e-6, rtol=0), key
        assert theta[key].dtype == states[0][key].dtype
    assert weights["s2"] == 0.0 and math.isclose(sum(weights.values()), 1.0)


def test_streaming_memory_is_two_model_buffers_whatever_the_number_of_sites() -> None:
    acc = StreamingAggregate(AggregationRule())
    for k, st in enumerate(_random_states(20)):
        acc.add(f"s{k}", st, 10 + k, 0.5)
    assert len(acc._sum_n) == len(acc._sum_l) == 3  # one buffer per tensor key, not per site


def test_mismatched_uploads_are_refused_without_touching_the_sum() -> None:
    acc = StreamingAggregate(AggregationRule())
    good = _random_states(1)[0]
    acc.add("a", good, 10, 0.5)
    before = {k: v.clone() for k, v in acc._sum_n.items()}
    with pytest.raises(InputError, match="b: tensor keys differ"):
        acc.add("b", {"conv.weight": good["conv.weight"]}, 10, 0.5)
    with pytest.raises(InputError, match=r"c\.conv\.bias: shape \(9,\)"):
        acc.add("c", {**good, "conv.bias": torch.zeros(9)}, 10, 0.5)
    with pytest.raises(InputError, match="a: this site already contributed"):
        acc.add("a", good, 10, 0.5)
    assert acc.sites == ["a"] and all(torch.equal(before[k], acc._sum_n[k]) for k in before)


def test_a_rule_the_formula_cannot_use_is_refused_by_name() -> None:
    for lam, beta, said in ((-1.0, 1.5, "lam: λ must be"), (float("nan"), 1.5, "lam: λ must be"),
                            (10.0, 0.0, "beta: β must be"), (10.0, float("inf"), "beta: β must be")):
        with pytest.raises(InputError, match=said):
            AggregationRule(lam, beta)
    with pytest.raises(InputError, match="method: 'fedprox' is not one of"):
        AggregationRule.for_method("fedprox")
    assert AggregationRule.for_method("fedmix").lam == 10.0 and AggregationRule.for_method("fedavg").lam == 0.0


def test_a_closed_aggregate_gives_the_same_result_and_takes_no_more_sites() -> None:
    acc = StreamingAggregate(AggregationRule())
    states = _random_states(2)
    acc.add("a", states[0], 10, 0.5)
    first = acc.result()
    assert first is not None and acc.result() is first
    with pytest.raises(InputError, match="b: this aggregate is already closed"):
        acc.add("b", states[1], 10, 0.5)
    idle = StreamingAggregate(AggregationRule())
    idle.add("a", states[0], 0, 0.5)  # trained on nothing: no model to average
    assert idle.result() is None
