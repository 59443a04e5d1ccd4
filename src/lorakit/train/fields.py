"""The run config as a list of fields, for the people who read it: `lorakit train --help` and the training form of
`lorakit ui` (lorakit.ui.schema). Each field with its section, type, default and one-line doc, read from the
dataclasses of lorakit.train.config, so a new field shows up in both without being listed anywhere.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from typing import Any

from lorakit.train.config import SECTIONS
from lorakit.train.fieldtypes import field_docs


@dataclass(frozen=True)
class FieldSpec:
    """One run-config field as `lorakit train --help` and `lorakit ui`'s form show it."""

    section: str
    name: str
    type: Any
    default: Any
    doc: str


def field_specs() -> dict[str, list[FieldSpec]]:
    """Every field of every section, in order, with its type, default and one-line doc: {section: [FieldSpec]}."""
    out: dict[str, list[FieldSpec]] = {}
    for section, f in SECTIONS.items():
        obj = f.default_factory()
        docs, hints = field_docs(type(obj)), typing.get_type_hints(type(obj))
        out[section] = [
            FieldSpec(
                section,
                fld.name,
                hints[fld.name],
                getattr(obj, fld.name),
                fld.metadata.get("doc", docs.get(fld.name, "")),
            )
            for fld in fields(obj)
        ]
    return out


def help_text() -> str:
    """Every field with its default and docstring, for `lorakit train --help`."""
    lines = []
    for section, specs in field_specs().items():
        lines.append(f"{section}:")
        for spec in specs:
            lines.append(f"  --{section}.{spec.name} (default: {spec.default!r})  {spec.doc}")
    return "\n".join(lines)


__all__ = ["FieldSpec", "field_specs", "help_text"]
