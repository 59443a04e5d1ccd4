"""Which adapter each row of the engine's next forward pass uses.

with route(model, bank, ["fr", None, "de"]):   # row 0 French, row 1 the base model, row 2 German
    model(input_ids=ids, ...)
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, nullcontext

from torch import nn

from lorakit.bank import AdapterBank
from lorakit.control import disabled, set_active
from lorakit.mixed import row_adapters
from lorakit.variants.ladder import ladder_rows


def route(model: nn.Module, bank: AdapterBank, names: list[str | None]) -> AbstractContextManager:
    """Row i of the next forward passes uses adapter names[i] (None: the base model).

    Not `bank.use`: that refuses adapters unloaded meanwhile, which the rows' leases (`bank.hold`) still keep.
    The bank's ladder, if any, reaches only its own rows, which are base rows for LoRA."""
    ladder = bank.ladder
    if ladder is None:
        return _lora(model, names)
    stack = ExitStack()
    stack.enter_context(ladder_rows(model, [n == ladder for n in names]))
    stack.enter_context(_lora(model, [None if n == ladder else n for n in names]))
    return stack


def _lora(model: nn.Module, names: list[str | None]) -> AbstractContextManager:
    distinct = set(names)
    if distinct == {None}:
        return disabled(model)
    if len(distinct) == 1:  # the single-adapter path, as offline generation takes
        set_active(model, names[0])
        return nullcontext()
    return row_adapters(model, names)
