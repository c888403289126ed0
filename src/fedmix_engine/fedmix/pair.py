"""The dual network pair (F¹, F²) as one flat state dict: keys ``net1.*`` and ``net2.*``.

One flat dict is what travels and what is aggregated: both networks get the same site weights.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmix_engine.model import ModelConfig, build_model

PairState = dict[str, torch.Tensor]
PREFIXES = ("net1.", "net2.")


def init_pair(model_config: ModelConfig, seed: int) -> PairState:
    """Two networks with *different* initialisations (seed and seed + 1), without touching global RNG."""
    state: PairState = {}
    with torch.random.fork_rng(devices=[]):
        for offset, prefix in enumerate(PREFIXES):
            torch.manual_seed(seed * 2 + offset)
            net = build_model(model_config)
            state.update({prefix + k: v.detach().clone() for k, v in net.state_dict().items()})
    return state


def pair_layout(model_config: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """The keys, shapes and dtypes of a pair of this config (as ``wire.tensor_template`` gives them), built
    on the meta device: no weights allocated, however wide the model."""
    with torch.device("meta"):
        net = build_model(model_config)
    one = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in net.state_dict().items()}
    return {prefix + k: spec for prefix in PREFIXES for k, spec in one.items()}


def split_pair(state: PairState) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    halves = tuple({k[len(p):]: v for k, v in state.items() if k.startswith(p)} for p in PREFIXES)
    return halves[0], halves[1]


def join_pair(net1: nn.Module | dict, net2: nn.Module | dict) -> PairState:
    out: PairState = {}
    for prefix, net in zip(PREFIXES, (net1, net2), strict=True):
        sd = net.state_dict() if isinstance(net, nn.Module) else net
        out.update({prefix + k: v.detach().to("cpu", copy=True) for k, v in sd.items()})
    return out


def build_pair(model_config: ModelConfig, state: PairState, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Instantiate both networks on ``device`` with the given weights."""
    sd1, sd2 = split_pair(state)
    nets = []
    for sd in (sd1, sd2):
        net = build_model(model_config)
        net.load_state_dict(sd)
        nets.append(net.to(device))
    return nets[0], nets[1]
