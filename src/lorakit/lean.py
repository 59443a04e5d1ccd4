"""The memory-lean causal-LM loss for everyone who calls `inject`: no change to the user's training loop.

After `lorakit.inject`, a Hugging Face causal LM's ordinary ``model(input_ids, labels=...)`` in training (model in
train mode, gradients enabled) runs the backbone and then `lorakit.head.lm_head_loss`: the N×V logits are never
held, only the positions whose label is learned are projected, and the gradient of the hidden states is computed
in the same pass. A plain loop, transformers' `Trainer` and TRL's `SFTTrainer` all call the model's forward, so
all of them get it. The fused LoRA linear layers need nothing: they are the adapted modules themselves.

The loss is transformers' `ForCausalLMLoss`: labels shifted by one (or `shift_labels` as given), `ignore_index`
(default -100) ignored, the mean over learned tokens, or the sum divided by `num_items_in_batch` when given (as
`Trainer` does under gradient accumulation). One difference: a batch without a single learned token gives a loss
of 0 connected to the graph, where transformers' mean gives NaN (0/0).

Like liger-kernel's and unsloth's patched forwards, the training output carries no logits: `out.logits` is a
`LogitsNotComputed` whose every use raises one line that says how to get them (evaluate in `model.eval()` or under
`torch.no_grad()`, or opt out). Everything else takes the model's own forward, unchanged: no labels, eval mode,
no gradients, a trainable LM head (or one whose adapters are not one plain LoRA without dropout), logit soft-capping or scaling, router losses of mixture-of-experts
models, and models that are not a Hugging Face causal LM with a plain head.

The patch is an instance attribute, `model.forward`, that keeps the class forward's signature (transformers'
`generate` and `Trainer` inspect it). `inject(..., lean=False)` or `set_lean_loss(model, False)` removes it,
and so do `unload` and deleting the last adapter.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from lorakit.head import lean_head, lm_head_loss

_MARK = "_lorakit_lean_forward"
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


class LogitsNotComputed:
    """Stands in for `logits` in a lean training output: the N×V logits were never built."""

    MESSAGE = (
        "logits are not computed by lorakit's lean loss in training with labels; call the model in eval mode or "
        "under torch.no_grad() for logits, or inject(..., lean=False) / lorakit.set_lean_loss(model, False)"
    )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(self.MESSAGE)

    def __getitem__(self, key: Any) -> Any:
        raise TypeError(self.MESSAGE)

    def __iter__(self):
        raise TypeError(self.MESSAGE)

    def __len__(self) -> int:
        raise TypeError(self.MESSAGE)

    def __repr__(self) -> str:
        return "LogitsNotComputed()"


def lean_loss_enabled(model: nn.Module) -> bool:
    """Whether `model.forward` is lorakit's lean training forward."""
    return getattr(model.__dict__.get("forward"), _MARK, False)


def set_lean_loss(model: nn.Module, enabled: bool) -> bool:
    """Install (True) or remove (False) the lean training forward on a causal LM. Returns whether it is installed
    afterwards: False for a model that is not a Hugging Face causal LM with a `base_model` and an output head."""
    if not enabled:
        if lean_loss_enabled(model):
            del model.__dict__["forward"]
        return False
    if lean_loss_enabled(model):
        return True
    if not _candidate(model):
        return False
    if "forward" in model.__dict__:  # someone else's instance forward (TRL, accelerate): leave it alone
        return False
    cls_forward = type(model).forward
    signature = inspect.signature(cls_forward)

    @functools.wraps(cls_forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        head = _lean_head(self, kwargs)
        if head is None:
            return cls_forward(self, *args, **kwargs)
        return _lean(self, head, signature, args, kwargs)

    setattr(forward, _MARK, True)
    model.forward = forward.__get__(model, type(model))
    return True


def _candidate(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    if not isinstance(model, PreTrainedModel) or getattr(model, "base_model", model) is model:
        return False
    getter = getattr(model, "get_output_embeddings", None)
    return getter is not None and getter() is not None


def _lean_head(model: nn.Module, kwargs: dict[str, Any]) -> tuple | None:
    """(the head's weight, its one LoRA (A, B, s) or None) to compute the lean loss with, or None where the
    model's own forward must run."""
    if kwargs.get("labels") is None or not model.training or not torch.is_grad_enabled():
        return None
    config = getattr(model, "config", None)
    if kwargs.get("output_router_logits") or getattr(config, "output_router_logits", False):
        return None  # the model adds its router's auxiliary loss
    return lean_head(model)


def _lean(model: nn.Module, head: tuple, signature: inspect.Signature, args: tuple, kwargs: dict) -> Any:
    bound = signature.bind(model, *args, **kwargs).arguments
    bound.pop(next(iter(signature.parameters)))  # self
    for name, p in signature.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
            bound.update(bound.pop(name))
    labels = bound.pop("labels")
    loss_kwargs = {k: bound.pop(k) for k in _LOSS_KWARGS if k in bound}
    config = model.config
    return_dict = bound.pop("return_dict", None)
    return_dict = getattr(config, "return_dict", True) if return_dict is None else return_dict
    bound.pop("logits_to_keep", None)
    bound.pop("num_logits_to_keep", None)
    bound.setdefault("use_cache", False)  # a training forward keeps no cache
    out = model.base_model(**bound)
    hidden = out[0]
    loss = lm_head_loss(
        hidden,
        head[0],
        labels,
        lora=head[1],
        ignore_index=int(loss_kwargs.get("ignore_index", -100)),
        shift_labels=loss_kwargs.get("shift_labels"),
        num_items_in_batch=loss_kwargs.get("num_items_in_batch"),
    )
    result = _output(out, loss)
    return result if return_dict else result.to_tuple()


def _output(backbone_out: Any, loss: torch.Tensor) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in fields(CausalLMOutputWithPast)}
    rest = {k: v for k, v in backbone_out.items() if k in names and k not in ("loss", "logits")}
    return CausalLMOutputWithPast(loss=loss, logits=LogitsNotComputed(), **rest)
