"""Small value predicates shared by every config (LoraConfig, AdaLoRA, ladder, run config): one definition of
"an integer", "a finite number", "a boolean", so that every field is held to the same rule.

JSON and YAML both parse `Infinity` / `NaN` / `.inf` / `1e999` into floats that pass a plain `x > 0`; `True`
is an `int` to Python. These predicates refuse both where a count or a finite number is meant.
"""

from __future__ import annotations

import math
from typing import Any


def is_int(v: Any, low: int | None = None) -> bool:
    """An int (not a bool), at least `low` if given."""
    return isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low)


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool, not inf, not nan)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_str_list(v: Any) -> bool:
    """A list of strings."""
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def short(v: Any, limit: int = 60) -> str:
    """`repr(v)` cut to `limit` characters, for one-line messages."""
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."
