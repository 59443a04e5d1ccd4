"""BD-LoRA (PEFT's `use_bdlora`): LoRA with a block-diagonal A or B, for serving many adapters on a model that is
sharded across devices.

Under tensor parallelism a row-sharded layer (o_proj, down_proj) splits its input across N devices, and a
column-sharded one (q/k/v, gate/up) its output. A LoRA with a dense A on a row-sharded layer needs the whole input
on every device, an extra communication per layer; a block-diagonal A of N blocks reads only each device's slice
(and a block-diagonal B on a column-sharded layer writes only each device's slice). PEFT's config:

    {"target_modules_bd_a": ["o_proj", "down_proj"], "target_modules_bd_b": ["q_proj", "k_proj", "v_proj",
     "gate_proj", "up_proj"], "nblocks": 2, "match_strict": true}

A module whose name contains a bd_a pattern gets a block-diagonal A, bd_b a block-diagonal B; with
`match_strict`, a target that matches neither is refused. The block-diagonal factor is stored as PEFT stores it,
its N blocks stacked: A (r, in/N) with block i = rows [i·r/N, (i+1)·r/N), B (out, r/N) likewise by output rows. The
same file keys as LoRA (`lora_A.weight`, `lora_B.weight`), in those shapes.

`factors` returns the dense block-diagonal matrix, so everything that reasons about ΔW = s·B·A (merging, GGUF
export, extraction, mixed batches through the generic path) works unchanged, and the zeros off the blocks stay
zeros: only the blocks are parameters. The block-diagonal factor starts as PEFT's does (A Kaiming-uniform with
a=0, B zero); the other factor follows `init`.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import TargetError
from lorakit.handlers import Handler, TransposedHandler
from lorakit.layers import LoraAdapter, LoraLayer, Variant, register_variant


def block_diagonal(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """The dense matrix of `n` blocks stacked by rows, (rows, cols/n·...) -> block_diag of the n row chunks."""
    return torch.block_diag(*torch.chunk(blocks, n, dim=0))


@register_variant
class BdLoraVariant(Variant):
    name = "bdlora"
    label = "BD-LoRA"

    def __init__(self, which: str | None = None, nblocks: int = 1) -> None:
        self.which = which  # "A", "B", or None (a plain LoRA module of a BD-LoRA adapter, match_strict false)
        self.nblocks = nblocks

    @classmethod
    def selects(cls, config: LoraConfig) -> bool:
        return config.use_bdlora is not None

    @classmethod
    def refusal(cls, handler: Handler) -> str | None:
        if not handler.linear or isinstance(handler, TransposedHandler):
            return "BD-LoRA adapts nn.Linear layers only (as in PEFT)"
        return None

    @classmethod
    def create(cls, config: LoraConfig, module: str) -> BdLoraVariant:
        spec = config.use_bdlora or {}
        on_a = any(p in module for p in spec.get("target_modules_bd_a") or [])
        on_b = any(p in module for p in spec.get("target_modules_bd_b") or [])
        if module and on_a and on_b:
            raise TargetError(f"use_bdlora: {module!r} matches both target_modules_bd_a and target_modules_bd_b")
        if module and spec.get("match_strict", True) and not (on_a or on_b):
            raise TargetError(
                f"use_bdlora: {module!r} matches neither target_modules_bd_a nor target_modules_bd_b "
                "(match_strict: set it false to give such modules plain LoRA)"
            )
        return cls("A" if on_a else "B" if on_b else None, int(spec.get("nblocks", 1)))

    def tensor_shapes(self, handler: Handler, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        a, b = handler.shapes(base, r)
        n = self.nblocks
        if self.which == "A":
            a = (a[0], a[1] // n)
        elif self.which == "B":
            b = (b[0], b[1] // n)
        return {"lora_A": a, "lora_B": b}

    def init(self, layer: LoraLayer, adapter: LoraAdapter) -> None:
        if self.which is None:
            return
        n, (r, fan_in), out = self.nblocks, adapter.lora_A.shape, adapter.lora_B.shape[0]
        sides = (r, fan_in) if self.which == "A" else (r, out)
        if any(d % n for d in sides):
            raise TargetError(
                f"use_bdlora: a block-diagonal {self.which} of {n} blocks needs r and the "
                f"{'input' if self.which == 'A' else 'output'} features divisible by {n}, got r={r} and "
                f"{sides[1]}"
            )
        old = adapter.lora_A if self.which == "A" else adapter.lora_B
        if self.which == "A":
            blocks = torch.empty((r, fan_in // n), dtype=old.dtype, device=old.device)
            nn.init.kaiming_uniform_(blocks)  # PEFT's BlockDiagonalLinear: a=0
            adapter.lora_A = nn.Parameter(blocks, requires_grad=old.requires_grad)
        else:
            blocks = torch.zeros((out, r // n), dtype=old.dtype, device=old.device)
            adapter.lora_B = nn.Parameter(blocks, requires_grad=old.requires_grad)

    def factors(self, adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor, float]:
        A, B = self.dense(adapter.lora_A, adapter.lora_B)
        return A, B, adapter.scaling

    def fused_factors(self, adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.dense(adapter.lora_A, adapter.lora_B)  # the fused kernels' gradients reach the blocks
        return A, B

    def plain_pair(self, adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.which is None else self.dense(adapter.lora_A, adapter.lora_B)

    def dense(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as stored (the block-diagonal one as its stacked blocks) -> the dense factors."""
        if self.which == "A":
            A = block_diagonal(A, self.nblocks)
        elif self.which == "B":
            B = block_diagonal(B, self.nblocks)
        return A, B

    def forward(
        self, layer: LoraLayer, adapter: LoraAdapter, x: torch.Tensor, base_out: torch.Tensor
    ) -> torch.Tensor:
        A, B, s = self.factors(adapter)
        if x.is_floating_point() and x.dtype != A.dtype:
            x = x.to(A.dtype)
        y = layer.handler.lora(layer.base_layer, adapter.dropout(x), A, B, s)
        return y if y.dtype == base_out.dtype else y.to(base_out.dtype)
