"""The `Method` interface (plain LoRA is the base class itself) and the optimizer's parameter groups."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.inject import inject
from lorakit.io import load_adapter, save_adapter
from lorakit.registry import lora_layers
from lorakit.train.objectives import REFERENCE_ADAPTER, REFERENCE_OBJECTIVES
from lorakit.variants.corda import CordaResult, inject_corda
from lorakit.variants.eva import EvaResult, inject_eva
from lorakit.variants.kasa import kasa_loss, trained_kasa
from lorakit.variants.loraga import LoraGaResult, inject_loraga
from lorakit.variants.loraplus import loraplus_groups

if TYPE_CHECKING:
    from lorakit.train.config import RunConfig


class Method:
    """Plain LoRA: inject `cfg.lora`, one parameter group, no per-step work."""

    name = "lora"
    """What `--method` calls it (the key of `lorakit.train.methods.METHODS`)."""
    label = "LoRA"
    """How the run's log names what it trains."""
    can_merge = True
    """Whether the trained adapter can be merged into the base (evaluation merges it for speed when it can)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None
        """The run's first training batches, for an init that reads data (EVA, CorDA, LoRA-GA); set by run_training."""
        self.data_init: EvaResult | CordaResult | LoraGaResult | None = None
        """What the data-driven init found, with lora.init eva, corda or lora_ga (after prepare)."""

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Raise ConfigError for settings of `cfg` this method cannot train with; called by the run config's
        validation, before any model is loaded."""

    def prepare(self, model: nn.Module, base_model_id: str | None) -> None:
        """Put the trainable adapter(s) on `model` (and freeze everything else): a new one as `cfg.lora` says, or
        train.init_adapter's, loaded trainable (and for DPO and KTO once more, frozen and inactive: the reference)."""
        start = self.cfg.train.init_adapter
        if start:
            load_adapter(model, start, trainable=True)
            if self.cfg.train.objective in REFERENCE_OBJECTIVES:
                load_adapter(model, start, REFERENCE_ADAPTER, activate=False)
            return
        config = self.cfg.lora.replace(base_model=base_model_id)
        seed = self.cfg.train.seed  # LoRA-GA's randomised SVD
        data_init = {
            "eva": inject_eva,
            "corda": inject_corda,
            "lora_ga": lambda model, config, batches: inject_loraga(model, config, batches, seed=seed),
        }.get(config.init)
        if data_init is None:
            inject(model, config)
            return
        if self.batches is None:
            raise ValueError(f"lora.init {config.init} reads training batches: set method.batches before prepare")
        self.data_init = data_init(model, config, self.batches()).lean()  # the run keeps what it reports only
        _same_on_every_process(model, self.data_init.label)

    def before_step(self, model: nn.Module, step: int) -> None:
        """Called before the first micro-batch of optimizer step `step` (0-based)."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to each micro-batch's loss (before division by grad_accum), or None. Plain LoRA: KaSA's
        regulariser over the model's active KaSA adapters that train, each weighted by its own kasa_beta and
        kasa_gamma. The model decides, not `cfg.lora`: a model given to the loop with KaSA injected by hand gets it
        too."""
        names = trained_kasa(model)
        return kasa_loss(model, adapters=names) if names else None

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after optimizer.step() of step `step`, while the gradients are still present."""

    def finish(self, model: nn.Module) -> None:
        """Called once after the last step, before the final evaluation and saving."""

    def save(self, model: nn.Module, path: Path) -> Path:
        """Write the trained adapter folder."""
        return save_adapter(model, path)

    def state_dict(self) -> dict[str, Any]:
        """Extra state that a resumable checkpoint must carry (tensors or JSON-able values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


def param_groups(model: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: all trainable parameters at train.lr, or LoRA+'s groups."""
    params = [p for p in model.parameters() if p.requires_grad]
    _, plus = cfg.methods
    if not plus:
        return [{"params": params, "lr": cfg.train.lr}]
    return loraplus_groups(
        model, lr=cfg.train.lr, ratio=cfg.loraplus.ratio, lr_embedding=cfg.loraplus.lr_embedding
    )


def _same_on_every_process(model: nn.Module, what: str) -> None:
    """Under torchrun every process computed the init (EVA, CorDA) from the same batches: check they agree on the
    shapes (EVA's ranks), then give every process rank 0's adapter and the base weights the init changed (an SVD
    may differ in its last bits between processes)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    params = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    shapes = [(n, tuple(p.shape)) for n, p in params]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, shapes)
    if any(s != shapes for s in every):
        raise RuntimeError(f"{what} gave different ranks on different processes; run it with one process")
    for _, p in params:
        dist.broadcast(p.data, 0)
    for _, layer in lora_layers(model):  # CorDA moved s·B0·A0 out of W0
        for adapter in layer.adapters.values():
            if adapter.start is not None:
                dist.broadcast(layer.handler.weight(layer.base_layer).data, 0)
                for t in (*adapter.start, adapter.base_residual):
                    dist.broadcast(t, 0)
