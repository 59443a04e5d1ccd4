"""The training form of `lorakit ui`, from the run-config dataclasses (`lorakit.train.fields.field_specs`, which
`lorakit train --help` lists too): each section with its fields' type, default, doc and choices."""

from __future__ import annotations

import types
import typing
from typing import Any

from lorakit.ui.runs import LOCKED

CHOICES: dict[tuple[str, str], list[Any]] = {
    ("model", "dtype"): ["auto", "float32", "bfloat16", "float16"],
    ("model", "adapter_dtype"): ["float32", "same"],
    ("model", "quantize"): [None, "nf4"],
    ("train", "schedule"): ["cosine", "linear", "constant"],
}
SECTION_OBJECTIVES = {"classify": ["classify", "token_classify"]}
"""The objectives whose form shows a section other than their own (classify's class weights weigh tags too)."""


def form_schema() -> dict[str, Any]:
    """The training form, from the run-config dataclasses (as `lorakit train --help` lists them): each section
    with its fields' type, default (as command-line text for lists and mappings), doc and choices."""
    from lorakit.config_checks import CORDA_MODES, INITS, LORA_GA_DIRECTIONS, LORA_GA_SCALES
    from lorakit.data.tasks import TASKS
    from lorakit.train.fields import field_specs
    from lorakit.train.methods import METHODS
    from lorakit.train.objectives import DPO_LOSSES, OBJECTIVES, PREFERENCE_OBJECTIVES
    from lorakit.train.validation import SECTION_METHOD

    choices = {
        **CHOICES,
        ("data", "task"): [None, *sorted(TASKS)],
        ("lora", "init"): list(INITS),
        ("lora", "corda_mode"): list(CORDA_MODES),
        ("lora", "lora_ga_direction"): list(LORA_GA_DIRECTIONS),
        ("lora", "lora_ga_scale"): list(LORA_GA_SCALES),
        ("train", "method"): [*METHODS, "loraplus", *(f"{m}+loraplus" for m in METHODS)],
        ("train", "objective"): list(OBJECTIVES),
        ("dpo", "loss"): list(DPO_LOSSES),
        ("cpo", "loss"): list(DPO_LOSSES),
    }
    sections = []
    for section, specs in field_specs().items():
        fields = []
        for spec in specs:
            kind, optional, literal = _kind(spec.type)
            fields.append(
                {
                    "name": spec.name,
                    "type": kind,
                    "optional": optional,
                    "default": _as_text(spec.default) if kind in ("list", "dict") else spec.default,
                    "doc": spec.doc,
                    "choices": choices.get((section, spec.name), literal),
                    "locked": (section, spec.name) in LOCKED,
                }
            )
        # an objective's own section (dpo, simpo, orpo, cpo, kto, reward, classify, embed) shows when train.objective
        # names it
        # (`objectives`: every objective it shows for; classify's class weights weigh a token classifier's tags too)
        shown = (
            {"objective": section, "objectives": SECTION_OBJECTIVES.get(section, [section])}
            if section in (*PREFERENCE_OBJECTIVES, "classify", "embed")
            else {}
        )
        sections.append({"name": section, "method": SECTION_METHOD.get(section), **shown, "fields": fields})
    return {"sections": sections}


def _kind(tp: Any) -> tuple[str, bool, list[Any] | None]:
    """(form type, null allowed, Literal choices) of a field type."""
    union = typing.get_origin(tp) is typing.Union or isinstance(tp, types.UnionType)
    args = typing.get_args(tp) if union else (tp,)
    optional = type(None) in args
    arms = [a for a in args if a is not type(None)]
    literal = None
    names = []
    for arm in arms:
        origin = typing.get_origin(arm)
        if origin is typing.Literal:
            literal = list(typing.get_args(arm))
            names.append("str")
        elif origin is list or arm is list:
            names.append("list")
        elif origin is dict or arm is dict:
            names.append("dict")
        else:
            names.append({bool: "bool", int: "int", float: "float", str: "str"}.get(arm, "any"))
    kind = names[0] if len(set(names)) == 1 else ("str" if "str" in names else "any")
    if literal and optional:
        literal = [None, *literal]
    return kind, optional, literal


def _as_text(value: Any) -> str:
    """A list or mapping as `lorakit train` takes it on the command line ("[q_proj, v_proj]", "{q_proj: 4}")."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


__all__ = ["form_schema"]
