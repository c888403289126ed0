"""Type checks for values that a file or a peer wrote as JSON. Python counts ``true`` as the integer 1 and
reads ``NaN`` and ``Infinity`` as floats, so ``isinstance`` alone lets them through as numbers; every reader
of untrusted JSON (an upload's report, a safetensors header, an annotation tool's file) checks with these,
and reads the text with :func:`parse_json`."""

from __future__ import annotations

import json
import math
from typing import Any


def parse_json(text: str | bytes) -> Any:
    """``json.loads``, with text nested deeper than Python's parser can follow (arrays a few thousand deep
    raise RecursionError, which no reader expects) refused as a ``ValueError`` like any other malformed
    JSON. Nothing this project reads nests more than a few levels, so such text is damage or an attack."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deep to be JSON that anything wrote for this project") from None


def is_int(value: Any) -> bool:
    """An integer, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_count(value: Any) -> bool:
    """An integer ≥ 0, not a bool: a size, an offset, a number of samples."""
    return is_int(value) and value >= 0


def is_number(value: Any) -> bool:
    """A finite number, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_text_list(value: Any) -> bool:
    """A list of texts: class names, as a server's settings and a round's config carry them."""
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def of_kind(value: Any, default: Any) -> bool:
    """Whether a setting's value has its default's kind: a finite number where the default is a float (an
    integer too: JSON and TOML write 1.0 as 1), an integer that is not a bool for an int, else its type."""
    if isinstance(default, float):
        return is_number(value)
    if is_int(default):
        return is_int(value)
    return type(value) is type(default)


def kind_wanted(default: Any) -> str:
    """What :func:`of_kind` wants for a setting of this default, as an error message says it."""
    return {float: "a finite number", int: "an integer", bool: "true or false"}.get(type(default), "a text")
