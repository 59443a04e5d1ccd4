"""What a served adapter may be called: the model's rule for adapter names, which `lorakit serve` checks at
start-up and `/v1/load_lora_adapter` before it reads a file."""

from __future__ import annotations

from lorakit.inject import ADAPTER_NAME


def adapter_name_problem(name: object) -> str | None:
    """Why `name` cannot name a served adapter, or None: a model's adapter names (letters, digits, _ and -; no '.',
    '/' or ':', which the adapters' module dicts and folders do not take), at most 256 characters."""
    if isinstance(name, str) and len(name) <= 256 and ADAPTER_NAME.match(name):
        return None
    return f"adapter name {name!r}: use 1 to 256 letters, digits, _ and - (no '.', '/', ':' or spaces)"
