"""`--method dylora`: LoRA whose rank is resampled every optimizer step (the variant: lorakit.variants.dylora)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.train.methods.base import Method
from lorakit.variants.dylora import DyLoraConfig, attach, check_lora_config, dylora_adapters

if TYPE_CHECKING:
    from lorakit.train.config import RunConfig


def sample_rank(seed: int, step: int, min_rank: int, r_max: int) -> int:
    """Step `step`'s rank: a pure function of (seed, step), so a resumed run samples what the first would."""
    return random.Random(seed * 1_000_003 + step).randint(min_rank, r_max)


class DyLoraMethod(Method):
    """`--method dylora`: LoRA of rank lora.r whose rank is resampled every optimizer step."""

    name = "dylora"
    label = "DyLoRA"
    can_merge = True

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self._before: list[tuple[nn.Parameter, torch.Tensor, int]] = []  # (A or B, its value, rank dim)
        self._b = 0

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """A known mode, min_rank in 1..lora.r, LoRA settings DyLoRA can nest, no FSDP."""
        DyLoraConfig(mode=cfg.dylora.mode, min_rank=cfg.dylora.min_rank)
        check_lora_config(cfg.lora, cfg.dylora.min_rank)
        if cfg.train.fsdp:
            raise ConfigError("DyLoRA does not support train.fsdp (its rows are sliced per step); use DDP")

    def prepare(self, model: nn.Module, base_model_id: str | None) -> None:
        super().prepare(model, base_model_id)
        attach(model, "default", mode=self.cfg.dylora.mode, min_rank=self.cfg.dylora.min_rank)

    def before_step(self, model: nn.Module, step: int) -> None:
        self._b = b = sample_rank(self.cfg.train.seed, step, self.cfg.dylora.min_rank, self.cfg.lora.r)
        self._before = []
        for _, v, a in dylora_adapters(model):
            v.train_rank = b
            self._before += [
                (a.lora_A, a.lora_A.detach().clone(), 0),
                (a.lora_B, a.lora_B.detach().clone(), 1),
            ]

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        """Put back the components this step must not change: all but the b-th (frozen) or those after b."""
        b = self._b
        for p, old, dim in self._before:
            if self.cfg.dylora.mode == "frozen":
                new = p.narrow(dim, b - 1, 1).clone()
                p.copy_(old)
                p.narrow(dim, b - 1, 1).copy_(new)
            elif b < p.shape[dim]:
                p.narrow(dim, b, p.shape[dim] - b).copy_(old.narrow(dim, b, p.shape[dim] - b))
        self._before = []

    def finish(self, model: nn.Module) -> None:
        for _, v, _ in dylora_adapters(model):
            v.train_rank = None
