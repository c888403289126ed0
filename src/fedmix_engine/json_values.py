"""Type checks for values that a file or a peer wrote as JSON. Python counts ``true`` as the integer 1 and
reads ``NaN`` and ``Infinity`` as floats, so ``isinstance`` alone lets them through as numbers; every reader
of untrusted JSON (an upload's report, a safetensors header, an annotation tool's file) checks with these."""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """An integer, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_count(value: Any) -> bool:
    """An integer ≥ 0, not a bool: a size, an offset, a number of samples."""
    return is_int(value) and value >= 0


def is_number(value: Any) -> bool:
    """A finite number, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
