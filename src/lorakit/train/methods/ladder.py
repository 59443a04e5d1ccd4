"""`--method ladder`: a side network trained on a frozen base (the variant: lorakit.variants.ladder)."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from torch import nn

from lorakit.errors import ConfigError
from lorakit.train.methods.base import Method
from lorakit.variants.ladder import LadderConfig, attach_ladder
from lorakit.variants.ladder_io import save_ladder

if TYPE_CHECKING:
    from pathlib import Path

    from lorakit.train.config import RunConfig

log = logging.getLogger(__name__)


def config_from_run(cfg: RunConfig) -> LadderConfig:
    """The LadderConfig of a run's `ladder` section (its checks: "ladder.rank must be an int >= 1, got 0")."""
    return LadderConfig(**dataclasses.asdict(cfg.ladder))


class LadderMethod(Method):
    """`--method ladder`: a frozen base (no backward through it) and a trainable side network."""

    name = "ladder"
    label = "Ladder side network"
    can_merge = False

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        if cfg.methods[1]:
            raise ConfigError(
                "train.method ladder+loraplus: LoRA+ applies to LoRA's A/B matrices; use --method ladder"
            )
        self.config = config_from_run(cfg)
        self.base_model: str | None = None

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        config_from_run(cfg)

    def prepare(self, model: nn.Module, base_model_id: str | None) -> None:
        if self.cfg.train.grad_checkpointing:
            log.warning(
                "train.grad_checkpointing does nothing for a ladder: the backbone keeps no activations"
            )
        self.base_model = base_model_id
        attach_ladder(model, self.config)

    def save(self, model: nn.Module, path: Path) -> Path:
        return save_ladder(model, path, base_model=self.base_model)
