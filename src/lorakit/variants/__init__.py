"""LoRA flavours and adapter kinds, one small file each, plugged into the core through its registries.

Importing this package registers them: DoRA (a `Variant`, picked by `use_dora`), PEFT's `lora_bias`, aLoRA and
BD-LoRA and KaSA (`Variant`s), the PiSSA, OLoRA, orthogonal, EVA, CorDA,
LoRA-GA and MiCA inits, DyLoRA (a
variant restored from the adapter file's safetensors metadata, which PEFT never reads: the folder stays exactly
what PEFT writes and loads), AdaLoRA (a variant and PEFT's ADALORA file format) and the ladder side network (our
LADDER format, and a merge guard). LoRA+ is an optimizer setting (`loraplus`). `lorakit/__init__.py` imports this.
"""

from __future__ import annotations

from lorakit.formats import read_metadata
from lorakit.variants import (
    adalora_io,
    alora,
    bdlora,
    corda,
    dora,
    dylora,
    eva,
    kasa,
    ladder,
    ladder_io,
    lora_bias,
    loraga,
    mica,
    orthogonal,
    pissa,
)

__all__ = [
    "adalora_io",
    "alora",
    "bdlora",
    "corda",
    "dora",
    "dylora",
    "eva",
    "kasa",
    "ladder",
    "ladder_io",
    "lora_bias",
    "loraga",
    "mica",
    "orthogonal",
    "pissa",
    "read_metadata",
]
