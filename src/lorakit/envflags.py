"""Settings from the environment, read one way everywhere: boolean switches (LORAKIT_FUSED, LORAKIT_NATIVE,
LORAKIT_TRIM, ...) and the cache root (LORAKIT_CACHE)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LORAKIT_CACHE"

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


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the lorakit cache root: ``cache_dir``, else ``$LORAKIT_CACHE``, else ``~/.cache/lorakit``."""
    root = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lorakit"
    return Path(root).expanduser()
