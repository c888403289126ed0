"""Which numbers are seeds: a whole number from 0 to 2³² − 1, which NumPy's generators (no negative
seeds) and torch's (a site's seed is the federation's × 1000 + a few, within 64 bits) both take. A
negative or huge ``--seed`` ended in a NumPy or torch traceback after work had started."""

from __future__ import annotations

from fedmix_engine.errors import InputError

MAX_SEED = 2**32 - 1


def check_seed(seed: int, where: str = "seed") -> None:
    """Refuse a seed outside 0 … :data:`MAX_SEED`, named by ``where``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InputError(where, f"a seed is a whole number from 0 to {MAX_SEED}, not {seed}")
