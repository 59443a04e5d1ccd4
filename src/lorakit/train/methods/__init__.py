"""Training methods behind one small interface, so the loop and `run_training` stay unbranched.

A `Method` decides how adapters are put on the model and what the loop does around each step. Plain LoRA is the
base class; DyLoRA, AdaLoRA and Ladder override the hooks they need, one file each here (their layers and files
live in `lorakit.variants`, which knows nothing of training). LoRA+ is not a method of its own: it changes the
optimizer's parameter groups and composes with any method.

The loop calls, per optimizer step:

    method.before_step(model, step)            # e.g. DyLoRA samples this step's rank
    loss = task_loss + method.extra_loss(model) # e.g. AdaLoRA's orthogonality regulariser (per micro-batch)
    loss.backward()
    clip; opt.step()
    method.after_step(model, step)              # gradients still present: e.g. AdaLoRA's rank allocation
    opt.zero_grad()

A new method is a `Method` subclass with its own `name`, made known with `register_method(MyMethod)`; then
`--method <name>` selects it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorakit.train.methods.adalora import AdaLoraMethod
from lorakit.train.methods.base import Method, param_groups
from lorakit.train.methods.dylora import DyLoraMethod
from lorakit.train.methods.ladder import LadderMethod

if TYPE_CHECKING:
    from lorakit.train.config import RunConfig

__all__ = [
    "METHODS",
    "AdaLoraMethod",
    "DyLoraMethod",
    "LadderMethod",
    "Method",
    "make_method",
    "param_groups",
    "register_method",
]

METHODS: dict[str, type[Method]] = {}
"""`train.method`'s base name -> its Method class, in the order the run config's errors list them."""


def register_method(cls: type[Method]) -> type[Method]:
    """Make `--method <cls.name>` train with `cls` (a Method subclass); returns it, so it can decorate the class."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"a training method must be a Method subclass, got {cls!r}")
    if not cls.name.isidentifier() or cls.name == "loraplus":  # "+" composes, and loraplus is not a method
        raise ValueError(f"method name {cls.name!r}: must be an identifier other than 'loraplus'")
    METHODS[cls.name] = cls
    return cls


for _cls in (Method, DyLoraMethod, AdaLoraMethod, LadderMethod):
    register_method(_cls)
del _cls


def make_method(cfg: RunConfig) -> Method:
    """The Method object for `cfg.train.method`."""
    base, _ = cfg.methods
    if base not in METHODS:  # validate() rejects these first
        raise ValueError(f"unknown method {base!r}")
    return METHODS[base](cfg)
