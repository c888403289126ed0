"""Aggregation: the sites' models averaged with FedMix's weights (``weights``), pure and streaming.

Because w_k = (d_k + λ s_k) / (1 + λ) is affine in two normalised terms, θ = Σ w_k θ_k can be
accumulated one upload at a time:

    θ = 1/(1+λ) · ( Σ n_k θ_k / Σ n  +  λ · Σ ℓ_k^β θ_k / Σ ℓ^β ),

so the server holds two model-sized sums — O(model) memory whatever the number of sites.
Sites with n_k = 0 are left out, as their weight is 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedmix_engine.errors import InputError
from fedmix_engine.fedmix.weights import AggregationRule, check_report, fedmix_weights


@dataclass
class StreamingAggregate:
    """Accumulates uploads one at a time in O(model) memory; ``result()`` gives θ and the weights.

    Tensors are summed in ``accumulate_dtype`` (float32 by default: two model-sized buffers; the
    error against a float64 reference is ~1e-7 relative). Non-floating tensors (none in the U-Net)
    are taken from the first upload.
    """

    rule: AggregationRule
    accumulate_dtype: torch.dtype = torch.float32
    sites: list[str] = field(default_factory=list)
    n: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    _sum_n: dict[str, torch.Tensor] = field(default_factory=dict)
    _sum_l: dict[str, torch.Tensor] = field(default_factory=dict)
    _other: dict[str, torch.Tensor] = field(default_factory=dict)
    _template: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    _result: dict[str, torch.Tensor] | None = None

    def add(self, site: str, state: Mapping[str, torch.Tensor], n: float, loss: float) -> None:
        """Fold one site's update in. Sites with n = 0 are recorded with weight 0 and not summed."""
        check_report(n, loss, site)
        if self._result is not None:
            raise InputError(site, "this aggregate is already closed")
        if site in self.sites:
            raise InputError(site, "this site already contributed to this aggregate")
        if self._template:
            self._check_like_template(site, state)
        self.sites.append(site)
        self.n.append(float(n))
        self.losses.append(float(loss))
        if n == 0:
            return
        lb = float(loss) ** self.rule.beta
        first = not self._sum_n and not self._other
        for key, value in state.items():
            if first:
                self._template[key] = (tuple(value.shape), value.dtype)
            if not value.is_floating_point():
                self._other.setdefault(key, value.detach().clone())
                continue
            v = value.detach().to(self.accumulate_dtype)
            if key not in self._sum_n:
                self._sum_n[key] = v * float(n)
                self._sum_l[key] = v * lb
            else:
                self._sum_n[key].add_(v, alpha=float(n))
                self._sum_l[key].add_(v, alpha=lb)

    def _check_like_template(self, site: str, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self._template):
            missing, extra = set(self._template) - set(state), set(state) - set(self._template)
            raise InputError(site, f"tensor keys differ from the other uploads (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]})")
        # a mapping that reads lazily (an upload on disk) reports specs from its header, unread
        specs = state.specs() if hasattr(state, "specs") else {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        for key, (shape, dtype) in specs.items():
            if (shape, dtype) != self._template[key]:
                want_shape, want_dtype = self._template[key]
                raise InputError(f"{site}.{key}", f"shape {shape} {dtype} differs from {want_shape} {want_dtype}")

    def weights(self) -> dict[str, float]:
        w = fedmix_weights(self.n, self.losses, self.rule)
        return {site: float(wk) for site, wk in zip(self.sites, w, strict=True)}

    def result(self) -> dict[str, torch.Tensor] | None:
        """The aggregated state dict (None when no site trained on anything).

        Frees each accumulator as soon as its tensor is combined, so the peak stays at two model
        sizes; the aggregate is closed afterwards (``add`` refuses, ``result`` returns the same dict).
        """
        if self._result is not None:
            return self._result
        active = [k for k, nk in enumerate(self.n) if nk > 0]
        if not active:
            return None
        total_n = sum(self.n[k] for k in active)
        total_l = sum(self.losses[k] ** self.rule.beta for k in active)
        use_loss = self.rule.lam > 0 and total_l > 0
        out: dict[str, torch.Tensor] = {}
        for key, (_, dtype) in self._template.items():
            if key in self._other:
                out[key] = self._other.pop(key)
                continue
            theta = self._sum_n.pop(key).div_(total_n)
            sum_l = self._sum_l.pop(key)
            if use_loss:
                theta = theta.add_(sum_l.div_(total_l), alpha=self.rule.lam).div_(1.0 + self.rule.lam)
            del sum_l
            out[key] = theta.to(dtype)
        self._result = out
        return out


def aggregate(updates: Sequence[tuple[str, Mapping[str, torch.Tensor], float, float]],
              rule: AggregationRule) -> tuple[dict[str, torch.Tensor] | None, dict[str, float]]:
    """Convenience: aggregate ``(site, state, n, loss)`` tuples; returns (θ, weights)."""
    acc = StreamingAggregate(rule)
    for site, state, n, loss in updates:
        acc.add(site, state, n, loss)
    return acc.result(), acc.weights()
