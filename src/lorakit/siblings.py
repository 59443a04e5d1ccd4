"""Sibling groups: one x·Aᵀ for the LoRA projections that read the same input (a decoder's q/k/v, or gate/up).

`assign_sibling_groups` groups a model's LoRA layers by parent module and input width; `probe_groups` runs one
small forward pass to see which of them really share their input, and switches the shared product on. The
product itself is `lorakit.fused.lora_from_xa`. Off by default (`lorakit.fused.set_groups`).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit import fused
from lorakit.layers import Variant
from lorakit.registry import lora_layers


class SiblingGroup:
    """LoRA layers under one parent that take the same input (a decoder's q/k/v, or gate/up).

    When the first member is called with x, it computes ``x·[A₁;A₂;…]ᵀ`` for every member at once (one GEMM of
    width Σr instead of several skinny ones; in backward, one GEMM for ∂x and one for the stacked ∂A) and leaves
    the slices for the others, which pick them up if they are called with the very same tensor. A member called
    with another input, or any member that cannot take the fused path, falls back to its own computation.

    Which siblings really share the input is observed, not guessed: a group does nothing until `probe_groups`
    has run one forward pass and seen which members receive the lead member's tensor (o_proj, under the same
    parent as q/k/v with the same width, does not). Membership then stays fixed, so a recomputing backward
    (gradient checkpointing) sees the same graph as the forward it replays.
    """

    def __init__(self, members: list) -> None:
        self.candidates = members
        self.members: list = []  # confirmed by probe_groups; empty: inactive
        self.probe: list | None = None  # while probing: [lead's input, members seen with it]
        self.cache: tuple | None = (
            None  # (x, x version, xa_all, {member: (offset, r)}, members still to serve)
        )

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        if self.probe is not None:
            if layer is self.candidates[0]:
                self.probe[:] = [x, [layer]]
            elif self.probe and self.probe[0] is x:
                self.probe[1].append(layer)
            return None
        if len(self.members) < 2:
            return None
        c = self.cache
        if c is not None and c[0] is x and c[1] == x._version and layer in c[4]:
            c[4].discard(layer)
            if not c[4]:
                self.cache = None
            off, r = c[3][layer]
            return self._apply(layer, x, c[2][:, off : off + r])
        if layer is not self.members[0]:
            return None
        specs = []
        for m in self.members:
            ok = len(m._run) == 1 and m.row_plan is None and not m.disabled
            adapter = m.adapters[m._run[0][0]] if ok else None
            if adapter is None or not _plain_no_dropout(adapter, m.training):
                return None
            if not fused.can_fuse(m.base_layer, x, adapter.lora_A, mixed=False):
                return None
            specs.append(adapter.lora_A)
        xa_all = x.reshape(-1, x.shape[-1]) @ torch.cat(specs).t()
        offsets, off = {}, 0
        for m, a in zip(self.members, specs, strict=True):
            offsets[m] = (off, a.shape[0])
            off += a.shape[0]
        self.cache = (x, x._version, xa_all, offsets, set(self.members[1:]))
        return self._apply(layer, x, xa_all[:, : specs[0].shape[0]])

    @staticmethod
    def _apply(layer, x: torch.Tensor, xa: torch.Tensor) -> torch.Tensor:
        name, weight = layer._run[0]
        adapter = layer.adapters[name]
        base = layer.base_layer
        return fused.lora_from_xa(x, base.weight, base.bias, xa, adapter.lora_B, adapter.scaling * weight)


@torch.no_grad()
def probe_groups(model: nn.Module, input_ids: torch.Tensor) -> int:
    """Run one small forward pass to see which sibling projections share an input, and switch their shared
    x·Aᵀ on; returns the number of active groups. `lorakit train` calls it before its first step."""
    groups = {id(g): g for _, layer in lora_layers(model) if (g := layer.group) is not None}.values()
    for g in groups:
        g.probe, g.members, g.cache = [], [], None
    was = model.training
    try:
        model.eval()
        model(input_ids=input_ids[:1, : min(8, input_ids.shape[1])])
    finally:
        model.train(was)
        for g in groups:
            seen = g.probe[1] if g.probe else []
            g.members = [m for m in g.candidates if m in seen]
            g.probe = None
    return sum(len(g.members) > 1 for g in groups)


def _plain_no_dropout(adapter, training: bool) -> bool:
    if type(adapter.variant) is not Variant:
        return False
    return not (training and isinstance(adapter.dropout, nn.Dropout) and adapter.dropout.p > 0)


def assign_sibling_groups(layers: list) -> None:
    """Group LoRA layers that share a parent module and an input width (q/k/v; gate/up); set `layer.group`."""
    by_parent: dict[tuple[str, int], list] = {}
    for name, layer in layers:
        layer.group = None
        if type(layer.base_layer) is not nn.Linear:
            continue
        parent = name.rpartition(".")[0]
        by_parent.setdefault((parent, layer.base_layer.in_features), []).append(layer)
    for members in by_parent.values():
        if len(members) > 1:
            group = SiblingGroup(members)
            for m in members:
                m.group = group
