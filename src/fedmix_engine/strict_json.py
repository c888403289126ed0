"""JSON that strict readers take (jq, JavaScript, a monitoring script): Python's ``json`` writes NaN and
Infinity, which are not JSON, so a figure that is no finite number is written as ``null`` (a Dice with no
validation data, no round deadline)."""

from __future__ import annotations

import json
import math
from typing import Any


def strict_dumps(record: Any, indent: int | None = None) -> str:
    """``json.dumps`` with every non-finite number as ``null``."""
    return json.dumps(_finite_or_none(record), indent=indent, allow_nan=False)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    return value
