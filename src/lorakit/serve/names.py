"""What a served adapter may be called, which `lorakit serve` checks at start-up and `/v1/load_lora_adapter`
before it reads a file.

The bank maps a name to one of the model's adapters (`AdapterBank.slot`), so a served name is not bound by the
model's rule for adapter names (letters, digits, _ and -): names such as `org/adapter`, `sql-lora:v2` or
`ft:base:team@1.0`, common with vLLM and OpenAI, are served as given."""

from __future__ import annotations

import re

SERVED_NAME = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_\-.:/@+]*$")


def adapter_name_problem(name: object) -> str | None:
    """Why `name` cannot name a served adapter, or None: 1 to 256 letters, digits and `_ - . : / @ +`, starting
    with a letter, a digit, `_` or `-` (no spaces, no `=`, which `--adapter NAME=DIR` splits on)."""
    if isinstance(name, str) and len(name) <= 256 and SERVED_NAME.match(name):
        return None
    return (
        f"adapter name {name!r}: use 1 to 256 letters, digits and _ - . : / @ +, starting with a letter, a digit, "
        "_ or - (no spaces)"
    )
