"""`--method adalora`: a rank budget moved between layers while training (the variant: lorakit.variants.adalora)."""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.io import save_adapter
from lorakit.train.methods.base import Method
from lorakit.variants.adalora import (
    AdaLoraAllocator,
    AdaLoraConfig,
    check_lora_for_adalora,
    inject_adalora,
    orth_loss,
)

if TYPE_CHECKING:
    from pathlib import Path

    from lorakit.train.config import RunConfig

log = logging.getLogger(__name__)


def config_from_run(cfg: RunConfig) -> AdaLoraConfig:
    """The AdaLoraConfig of a run's `adalora` section (total_step defaults to train.steps)."""
    s = cfg.adalora
    values = {f.name: getattr(s, f.name) for f in fields(s)}
    if values.get("total_step") is None:
        values["total_step"] = cfg.train.steps
    try:
        config = AdaLoraConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"adalora: {e}") from None
    try:
        check_lora_for_adalora(cfg.lora)
    except ConfigError as e:
        raise ConfigError(f"lora: {e}") from None
    return config


class AdaLoraMethod(Method):
    """`lorakit train --method adalora`: inject at init_r, add the orthogonality term, allocate after each step."""

    name = "adalora"
    label = "AdaLoRA"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        if cfg.train.fsdp:
            raise ConfigError(
                "adalora does not support train.fsdp (its allocator needs whole tensors); use DDP"
            )
        self.config = config_from_run(cfg)
        self.allocator: AdaLoraAllocator | None = None
        self.budgets: list[int] = []

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """The schedule's own checks (target_r <= init_r, tinit < total_step - tfinal, ...) and the LoRA settings."""
        config_from_run(cfg)

    def prepare(self, model: nn.Module, base_model_id: str | None) -> None:
        if self.cfg.lora.r != type(self.cfg)().lora.r:  # set away from the run config's default
            log.warning("lora.r=%d is not used by AdaLoRA (adalora.init_r is)", self.cfg.lora.r)
        inject_adalora(model, self.cfg.lora.replace(base_model=base_model_id), self.config)
        self.allocator = AdaLoraAllocator(model)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        w = self.config.orth_reg_weight
        return w * orth_loss(model) if w > 0 else None

    def after_step(self, model: nn.Module, step: int) -> None:
        self.budgets.append(self.allocator.update_and_allocate(model, step + 1))

    def finish(self, model: nn.Module) -> None:
        ranks = self.allocator.ranks()
        if ranks:
            log.info("AdaLoRA final ranks: %s", ranks)

    def save(self, model: nn.Module, path: Path) -> Path:
        return save_adapter(model, path)  # recognises the AdaLoRA adapter: PEFT's ADALORA layout

    def state_dict(self) -> dict[str, Any]:
        return self.allocator.state_dict() if self.allocator else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.allocator.load_state_dict(state)
