"""Boolean switches from the environment (LORAKIT_FUSED, LORAKIT_NATIVE, LORAKIT_TRIM, ...), read one way everywhere."""

from __future__ import annotations

import os

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")


def env_flag(name: str, default: bool | None = None) -> bool | None:
    """The switch `name` in the environment: 1/true/yes/on is True, 0/false/no/off is False (any case, spaces
    trimmed); unset, empty or anything else gives `default`."""
    value = os.environ.get(name, "").strip().lower()
    if value in ON:
        return True
    if value in OFF:
        return False
    return default
