"""FedMix's site weights: who counts how much when the sites' models are averaged.

With n_k samples used and mean training loss ℓ_k at site k,

    d_k = n_k / Σ n,   s_k = ℓ_k^β / Σ ℓ^β,   w_k = (d_k + λ s_k) / (1 + λ),   θ = Σ w_k θ_k.

A site with a higher loss gets more weight (it is further from the global optimum). λ = 0 gives the
fixed data-size weights; FedAvg is the same with n_k = the site's full dataset size. Sites with
n_k = 0 trained on nothing and are left out. If every ℓ_k is 0 the loss term is undefined and
dropped (w_k = d_k). ``aggregation`` averages the models with these weights; this module holds no
tensors, so the server's settings and ``status`` are read without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedmix_engine.errors import InputError

METHODS = ("fedmix", "fedmix-fixed", "fedavg")

# Reference settings from the paper (λ, β) per data set.
PAPER_SETTINGS = {"breast": (10.0, 1.5), "skin": (10.0, 3.0), "oct": (2.0, 3.0)}


@dataclass(frozen=True)
class AggregationRule:
    """λ and β of FedMix; ``lam = 0`` is plain data-size weighting."""

    lam: float = 10.0
    beta: float = 1.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise InputError("lam", f"λ must be a finite number ≥ 0, not {self.lam}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise InputError("beta", f"β must be a finite number > 0, not {self.beta}")

    @classmethod
    def for_method(cls, method: str, lam: float = 10.0, beta: float = 1.5) -> AggregationRule:
        if method not in METHODS:
            raise InputError("method", f"'{method}' is not one of {', '.join(METHODS)}")
        return cls(lam if method == "fedmix" else 0.0, beta)


def check_report(n: float, loss: float, where: str) -> None:
    """Refuse a site's n_k or ℓ_k that the formula cannot weigh (negative, NaN, infinite), naming it."""
    if not (isinstance(n, int | float) and math.isfinite(n) and n >= 0):
        raise InputError(f"{where}.n", f"sample count must be a finite number ≥ 0, not {n}")
    if not (isinstance(loss, int | float) and math.isfinite(loss) and loss >= 0):
        raise InputError(f"{where}.loss", f"training loss must be a finite number ≥ 0, not {loss}")


def fedmix_weights(n: Sequence[float], losses: Sequence[float], rule: AggregationRule) -> np.ndarray:
    """The weights w_k (summing to 1 over sites with n_k > 0; 0 for sites with n_k = 0)."""
    n_arr = np.asarray(n, dtype=np.float64)
    l_arr = np.asarray(losses, dtype=np.float64)
    for k, (nk, lk) in enumerate(zip(n_arr, l_arr, strict=True)):
        check_report(float(nk), float(lk), f"site[{k}]")
    active = n_arr > 0
    if not active.any():
        return np.zeros_like(n_arr)
    d = np.where(active, n_arr, 0.0) / n_arr[active].sum()
    lb = np.where(active, l_arr ** rule.beta, 0.0)
    if rule.lam == 0 or lb.sum() == 0:
        return d
    s = lb / lb.sum()
    return (d + rule.lam * s) / (1.0 + rule.lam)
