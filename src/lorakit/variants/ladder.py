"""Ladder LoRA: a low-rank ladder side network on a frozen Hugging Face decoder (our reading; docs/ladder.md).

>>> import lorakit
>>> model, tok = lorakit.load_model()
>>> lorakit.attach_ladder(model, lorakit.LadderConfig(reduction=8, rank=16, every=1))   # doctest: +SKIP
>>> lorakit.save_ladder(model, "out/ladder")                                          # doctest: +SKIP
>>> lorakit.load_adapter(fresh_model, "out/ladder")                                   # doctest: +SKIP

How it attaches, without changing the model's code or weights:
- a forward pre-hook on the decoder body (e.g. `model.model`) turns autograd off for the whole backbone, so it keeps
  no activation for backward; a forward hook (always called, errors included) turns it back to what it was;
- a forward hook on each selected decoder block records its output hidden state (no copy, no graph);
- a forward hook on the final norm runs the side network (with autograd as the caller had it) and returns the
  norm's output plus the side output, which the unchanged LM head turns into logits.
The side network is registered as `model.lorakit_ladder`, so its parameters are the model's only trainable ones.
Ladder adapters are not weight deltas: they cannot be merged into the base (a merge guard says so).
Its folders (peft_type "LADDER") are read and written by `ladder_io`, a format registered in lorakit.formats.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.checks import is_int, is_number
from lorakit.control import register_merge_guard
from lorakit.errors import AdapterError, ConfigError, TargetError
from lorakit.variants.ladder_side import BLOCKS, SideNetwork

log = logging.getLogger(__name__)

ATTR = "lorakit_ladder"
PEFT_TYPE = "LADDER"
NAME = "ladder"  # the name load_adapter returns for a ladder, and save_adapter takes
MERGE_REFUSAL = (
    "ladder adapters cannot be merged into the base: the side network is a separate module on top of the frozen "
    "backbone, not a weight delta; run it unmerged (lorakit generate --adapter DIR)"
)
# (decoder body, its list of blocks, its final norm), tried in order
_LAYOUTS = (
    ("model", "layers", "norm"),  # Llama, Mistral, Qwen2/3, Gemma, Phi-3, SmolLM
    ("transformer", "h", "ln_f"),  # GPT-2, GPT-J, Falcon, Bloom
    ("gpt_neox", "layers", "final_layer_norm"),  # GPT-NeoX, Pythia
)
EXPECTED = (
    "model.model.layers + model.model.norm (or transformer.h + ln_f, gpt_neox.layers + final_layer_norm)"
)


@dataclass
class LadderConfig:
    """Shape of a ladder side network (the `ladder` section of `lorakit train`)."""

    reduction: int = 8
    """The side network is hidden_size / reduction wide (must divide)."""
    rank: int = 16
    """Rank of each low-rank down-projection (ladder) from a backbone layer into the side network."""
    every: int = 1
    """A ladder from every k-th backbone block, i.e. one per group of k blocks (the last block always has one)."""
    block: str = "mlp"
    """Side block type: "mlp" (per token, light) or "transformer" (small causal attention + MLP)."""
    temperature: float = 0.1
    """Temperature T of the gates μ_i = σ(α_i / T)."""
    mlp_ratio: int = 4
    """Hidden width of a side MLP, in multiples of the side width."""

    def __post_init__(self) -> None:
        checks = [
            (
                is_int(self.reduction, 1),
                f"reduction must be an int >= 1, got {self.reduction!r}",
            ),
            (is_int(self.rank, 1), f"rank must be an int >= 1, got {self.rank!r}"),
            (
                is_int(self.every, 1),
                f"every must be an int >= 1, got {self.every!r}",
            ),
            (self.block in BLOCKS, f"block must be one of {', '.join(BLOCKS)}, got {self.block!r}"),
            (
                is_number(self.temperature) and self.temperature > 0,
                f"temperature must be a finite number > 0, got {self.temperature!r}",
            ),
            (
                is_int(self.mlp_ratio, 1),
                f"mlp_ratio must be an int >= 1, got {self.mlp_ratio!r}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"ladder.{msg}")

    def layers(self, n_layers: int) -> list[int]:
        """Indices of the backbone blocks that feed a ladder: the last of each group of `every` blocks."""
        picked = list(range(self.every - 1, n_layers, self.every))
        return picked if picked and picked[-1] == n_layers - 1 else [*picked, n_layers - 1]


def find_decoder(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """(decoder body, its blocks, its final norm) of a Hugging Face causal LM; TargetError naming the layout."""
    for body_name, list_name, norm_name in _LAYOUTS:
        body = getattr(model, body_name, None)
        blocks = getattr(body, list_name, None) if isinstance(body, nn.Module) else None
        norm = getattr(body, norm_name, None) if isinstance(body, nn.Module) else None
        if isinstance(blocks, nn.ModuleList) and len(blocks) and isinstance(norm, nn.Module):
            return body, blocks, norm
    raise TargetError(
        f"ladder: cannot find the decoder blocks of {type(model).__name__}; expected a Hugging Face decoder with "
        f"{EXPECTED}"
    )


def _hidden_size(model: nn.Module, norm: nn.Module) -> int:
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0]
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise TargetError(
            f"ladder: cannot tell the hidden size of {type(model).__name__} (no config.hidden_size)"
        )
    return hidden


def build_side(model: nn.Module, cfg: LadderConfig) -> tuple[SideNetwork, list[int]]:
    """A fresh side network sized for `model` (not attached), and the block indices its ladders read."""
    _, blocks, norm = find_decoder(model)
    hidden = _hidden_size(model, norm)
    if hidden % cfg.reduction:
        raise ConfigError(
            f"ladder.reduction {cfg.reduction} does not divide hidden size {hidden} of {type(model).__name__}; "
            f"pick a divisor (e.g. {', '.join(str(d) for d in range(2, 17) if hidden % d == 0)})"
        )
    layers = cfg.layers(len(blocks))
    side = SideNetwork(
        hidden, hidden // cfg.reduction, cfg.rank, len(layers), cfg.block, cfg.temperature, cfg.mlp_ratio
    )
    ref = getattr(norm, "weight", None)
    if isinstance(ref, torch.Tensor) and ref.is_floating_point():
        side.to(device=ref.device, dtype=ref.dtype)
    return side, layers


def attach_ladder(
    model: nn.Module, cfg: LadderConfig | None = None, *, side: SideNetwork | None = None
) -> SideNetwork:
    """Freeze `model` and attach a (new, or the given) side network; returns it. Its parameters are trainable."""
    cfg = cfg or LadderConfig()
    if ladder_of(model) is not None:
        raise AdapterError(
            f"{type(model).__name__} already has a ladder side network; detach_ladder it first"
        )
    body, blocks, norm = find_decoder(model)
    if side is None:
        side, layers = build_side(model, cfg)
    else:
        layers = cfg.layers(len(blocks))
    for p in model.parameters():
        p.requires_grad_(False)
    model.add_module(ATTR, side)
    side.config, side.layers = cfg, layers
    handles = [
        body.register_forward_pre_hook(
            _enter(side, "use_cache" in inspect.signature(body.forward).parameters), with_kwargs=True
        ),
        body.register_forward_hook(_leave(side), always_call=True),
        norm.register_forward_hook(_add_side(side)),
    ]
    handles += [blocks[i].register_forward_hook(_tap(side)) for i in layers]
    side.handles = handles
    return side


def detach_ladder(model: nn.Module) -> SideNetwork:
    """Remove the side network and its hooks; the model is its plain base again. Returns the side network."""
    side = ladder_of(model)
    if side is None:
        raise AdapterError(f"{type(model).__name__} has no ladder side network")
    for h in side.handles:
        h.remove()
    delattr(model, ATTR)
    return side


def ladder_of(model: nn.Module) -> SideNetwork | None:
    """The attached side network, or None."""
    side = model._modules.get(ATTR) if isinstance(model, nn.Module) else None
    return side if isinstance(side, SideNetwork) else None


def refuse_merge(model: nn.Module) -> None:
    """AdapterError if `model` carries a ladder (what `lorakit.merge` does, through its merge guard)."""
    reason = _merge_guard(model)
    if reason:
        raise AdapterError(reason)


def _merge_guard(model: nn.Module) -> str | None:
    return MERGE_REFUSAL if ladder_of(model) is not None else None


register_merge_guard(_merge_guard)


def _enter(side: SideNetwork, takes_use_cache: bool):
    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        mask = kwargs.get("attention_mask")
        mask = (
            mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        )  # (batch, keys) padding masks
        side.begin(mask, cache if hasattr(cache, "get_seq_length") else None)
        torch.set_grad_enabled(False)  # the frozen backbone keeps no activations for backward
        if side.outer_grad and cache is None and takes_use_cache:
            return args, {
                **kwargs,
                "use_cache": False,
            }  # training: no KV cache to fill (~47 MB at 4x256 here)
        return None

    return hook


def _leave(side: SideNetwork):
    def hook(module, args, output):
        torch.set_grad_enabled(side.outer_grad)
        side.taps.clear()

    return hook


def _tap(side: SideNetwork):
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        side.taps.append((h, h._version))

    return hook


def _add_side(side: SideNetwork):
    def hook(module, args, output):
        torch.set_grad_enabled(
            side.outer_grad
        )  # the rest of the body (e.g. GPT-2's reshape) is on the side's path
        return side(output)

    return hook


@contextmanager
def ladder_rows(model: nn.Module, rows: torch.Tensor | Sequence[bool] | bool | None) -> Iterator[None]:
    """Inside the block, the attached ladder's output reaches only the batch rows `rows` selects
    (`SideNetwork.set_rows`); the previous gate is restored afterwards."""
    side = ladder_of(model)
    if side is None:
        raise AdapterError(f"{type(model).__name__} has no ladder side network")
    before = side.rows
    side.set_rows(rows)
    try:
        yield
    finally:
        side.rows = before
