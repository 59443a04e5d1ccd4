"""AdaLoRA (Zhang et al. 2023): ΔW = P·Λ·Q, with the rank budget moved between layers while training.

Each adapted layer holds PEFT's tensors: `lora_A` = Q (r, in), `lora_E` = Λ (r, 1), `lora_B` = P (out, r), with
E initialised to zero and A, B to N(0, 0.02), and the update scaled by alpha / (init_r + 1e-5) (PEFT's `ranknum`,
which stays at init_r when ranks shrink). The `AdaLoraAllocator` follows PEFT's `RankAllocator`:

- importance of every entry w of P, Λ, Q: I = |w·∂L/∂w|, smoothed Ī = β1·Ī + (1−β1)·I, uncertainty
  Ū = β2·Ū + (1−β2)·|I − Ī|, score Ī·Ū; a triplet's score is score(Λ_i) + mean(score(Q_i,:)) + mean(score(P_:,i));
- a cubic budget from init_r·n triplets to target_r·n between tinit and total_step − tfinal;
- every deltaT steps, the triplets at or below the global (init_bgt − budget)-th score get Λ_i = 0;
- at step total_step − tfinal the final mask is taken and re-applied every later step.

Call `update_and_allocate(model, global_step)` after `optimizer.step()` and before `zero_grad()`; `lorakit train
--method adalora` does so with global_step = the number of optimizer steps taken (1, 2, ..., train.steps), so that
tinit steps run unpruned and the last tfinal steps run at the final mask. Add `orth_loss(model)` times
orth_reg_weight to the loss (the method does). Files are in PEFT's ADALORA layout (see `adalora_io`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from lorakit.checks import is_int, is_number
from lorakit.config import LoraConfig
from lorakit.errors import AdapterError, ConfigError, TargetError
from lorakit.handlers import Handler, handler_for
from lorakit.inject import inject, lora_layers, set_trainable
from lorakit.layers import LoraAdapter, LoraLayer, Variant
from lorakit.targeting import select_modules


@dataclass
class AdaLoraConfig:
    """AdaLoRA's schedule (PEFT's names). Targets, alpha and dropout come from the `LoraConfig` given alongside."""

    init_r: int = 12
    """Starting rank of every adapted layer."""
    target_r: int = 8
    """Average rank per layer at the end of the budget schedule."""
    tinit: int = 0
    """Steps before any pruning."""
    tfinal: int = 0
    """Last steps trained at the final mask."""
    deltaT: int = 1
    """Steps between two budget allocations."""
    beta1: float = 0.85
    """EMA coefficient of the sensitivity |w·∂L/∂w|."""
    beta2: float = 0.85
    """EMA coefficient of the uncertainty."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality regulariser mean(‖PᵀP − I‖_F + ‖QQᵀ − I‖_F)."""
    total_step: int | None = None
    """Total optimizer steps of the schedule (required)."""
    rank_pattern: dict[str, list[bool]] | None = None
    """Kept triplets per layer ("<module>.lora_E" -> one bool per row), set by the allocator."""

    def __post_init__(self) -> None:
        pos_int = is_int
        checks = [
            (pos_int(self.init_r, 1), f"init_r must be a positive integer, got {self.init_r!r}"),
            (pos_int(self.target_r, 1), f"target_r must be a positive integer, got {self.target_r!r}"),
            (
                not pos_int(self.target_r, 1) or not pos_int(self.init_r, 1) or self.target_r <= self.init_r,
                f"target_r ({self.target_r}) must not exceed init_r ({self.init_r}): AdaLoRA only prunes ranks",
            ),
            (pos_int(self.tinit, 0), f"tinit must be an integer >= 0, got {self.tinit!r}"),
            (pos_int(self.tfinal, 0), f"tfinal must be an integer >= 0, got {self.tfinal!r}"),
            (pos_int(self.deltaT, 1), f"deltaT must be an integer >= 1, got {self.deltaT!r}"),
            (
                is_number(self.beta1) and 0 < self.beta1 < 1,
                f"beta1 must be in (0, 1), got {self.beta1!r}",
            ),
            (
                is_number(self.beta2) and 0 < self.beta2 < 1,
                f"beta2 must be in (0, 1), got {self.beta2!r}",
            ),
            (
                is_number(self.orth_reg_weight) and self.orth_reg_weight >= 0,
                f"orth_reg_weight must be a finite number >= 0, got {self.orth_reg_weight!r}",
            ),
            (
                self.total_step is not None,
                "total_step is required: AdaLoRA's budget schedule needs the total number of optimizer steps "
                "(lorakit train sets it to train.steps)",
            ),
            (pos_int(self.total_step, 1), f"total_step must be a positive integer, got {self.total_step!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                f"tinit ({self.tinit}) must be below total_step - tfinal ({self.total_step} - {self.tfinal}): "
                "the schedule leaves no steps to reallocate ranks"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ADALORA_KEYS = tuple(f.name for f in fields(AdaLoraConfig))
TENSORS = {"lora_A": "lora_A", "lora_E": "lora_E", "lora_B": "lora_B"}
"""An AdaLoRA adapter's tensors: attribute -> PEFT's ADALORA key suffix (no ".weight")."""


# ------------------------------------------------------------------------------------------------------------
# The layer variant
# ------------------------------------------------------------------------------------------------------------


class AdaLoraVariant(Variant):
    """Forward y = (dropout(x)·(Λ·Q)ᵀ·Pᵀ) · alpha / (init_r + 1e-5), in PEFT's operation order. One instance is
    shared by all layers of an adapter and carries its `AdaLoraConfig` (rank_pattern included)."""

    name = "adalora"
    label = "AdaLoRA"

    def __init__(self, config: AdaLoraConfig) -> None:
        self.config = config

    def tensor_names(self, handler: Handler) -> dict[str, str]:
        return dict(TENSORS)

    def factors(self, adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor, float]:
        return adapter.lora_A * adapter.lora_E, adapter.lora_B, adapter.scaling  # ΔW = s·P·(Λ⊙Q)

    def forward(
        self, layer: LoraLayer, adapter: LoraAdapter, x: torch.Tensor, base_out: torch.Tensor
    ) -> torch.Tensor:
        A, B, E = adapter.lora_A, adapter.lora_B, adapter.lora_E
        if x.is_floating_point() and x.dtype != A.dtype:
            x = x.to(A.dtype)
        y = (adapter.dropout(x) @ (A * E).T @ B.T) * adapter.alpha / (adapter.ranknum + 1e-5)
        return y if y.dtype == base_out.dtype else y.to(base_out.dtype)


def _convert(adapter: LoraAdapter, variant: AdaLoraVariant, r: int) -> None:
    """Turn a freshly injected plain adapter into an AdaLoRA triplet of rank r (PEFT's initialisation)."""
    dtype, device = adapter.lora_A.dtype, adapter.lora_A.device
    k, d = adapter.lora_A.shape[1], adapter.lora_B.shape[0]
    init_r = variant.config.init_r
    adapter.lora_A = nn.Parameter(torch.empty(r, k, dtype=dtype, device=device))
    adapter.lora_B = nn.Parameter(torch.empty(d, r, dtype=dtype, device=device))
    adapter.lora_E = nn.Parameter(torch.zeros(r, 1, dtype=dtype, device=device))
    nn.init.normal_(adapter.lora_A, mean=0.0, std=0.02)
    nn.init.normal_(adapter.lora_B, mean=0.0, std=0.02)
    adapter.register_buffer("ranknum", torch.tensor([float(init_r)], device=device), persistent=False)
    adapter.r = r
    adapter.scaling = adapter.alpha / (init_r + 1e-5)  # merge/export: ΔW = scaling · B·(Λ·A)
    adapter.variant = variant


def check_lora_for_adalora(lora: LoraConfig) -> None:
    """The LoraConfig settings AdaLoRA cannot honour are errors, not silently ignored."""
    unsupported = [
        (lora.use_dora, "use_dora"),
        (lora.use_rslora, "use_rslora"),
        (lora.init != "default", f"init={lora.init!r}"),
        (bool(lora.rank_pattern), "rank_pattern (AdaLoRA sets its own)"),
        (bool(lora.alpha_pattern), "alpha_pattern"),
        (lora.bias != "none", f"bias={lora.bias!r}"),
        (lora.lora_bias, "lora_bias"),
        (lora.use_kasa, "use_kasa"),
        (lora.use_bdlora is not None, "use_bdlora"),
    ]
    for bad, what in unsupported:
        if bad:
            raise ConfigError(f"AdaLoRA does not support {what} (as in PEFT); drop it from the LoRA settings")


def inject_adalora(
    model: nn.Module,
    lora: LoraConfig,
    config: AdaLoraConfig,
    name: str = "default",
    *,
    ranks: dict[str, int] | None = None,
    activate: bool = True,
    trainable: bool = True,
) -> nn.Module:
    """Add AdaLoRA adapter `name` (rank config.init_r, or `ranks[module]`) to the modules `lora` selects.

    `lora` gives targets, exclusions, layers, alpha and dropout; its r is ignored (init_r is used). Only linear
    layers (nn.Linear, GPT-2 Conv1D, 4-bit linears) take AdaLoRA, as in PEFT.
    """
    check_lora_for_adalora(lora)
    for m in select_modules(model, lora):
        module = model.get_submodule(m)
        h = handler_for(module)
        if h is None or not h.linear:
            raise TargetError(
                f"cannot add AdaLoRA to {m!r} ({type(module).__name__}): AdaLoRA adapts linear layers only"
            )
    inject(model, lora.replace(r=config.init_r), name, activate=activate, trainable=trainable)
    variant = AdaLoraVariant(config)
    for m, layer in lora_layers(model):
        if name in layer.adapters:
            _convert(layer.adapters[name], variant, (ranks or {}).get(m, config.init_r))
            layer.row_cache = None
    set_trainable(model, only=[name])  # the new tensors follow the adapter's trainable flag
    return model


def adalora_config(model: nn.Module, name: str = "default") -> AdaLoraConfig | None:
    """The AdaLoraConfig of adapter `name`, or None if it is not an AdaLoRA adapter."""
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            variant = layer.adapters[name].variant
            return variant.config if isinstance(variant, AdaLoraVariant) else None
    return None


def _triplets(model: nn.Module, name: str) -> list[tuple[str, LoraAdapter]]:
    return [
        (m, layer.adapters[name])
        for m, layer in lora_layers(model)
        if name in layer.adapters and isinstance(layer.adapters[name].variant, AdaLoraVariant)
    ]


def orth_loss(model: nn.Module, name: str = "default") -> torch.Tensor:
    """mean over P and Q of every layer of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F (PEFT's regulariser, unweighted).

    Factors of one shape are stacked and computed as one batch: a few operations per shape instead of per factor
    (on SmolLM2's 210 layers, forward and backward: 0.033 s against the loop's 0.051 s;
    benchmarks/bench_regularisers.py)."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for _, adapter in _triplets(model, name):
        for m in (adapter.lora_A, adapter.lora_B.T):  # P and Qᵀ: each times its transpose gives an r × r matrix
            by_shape.setdefault((m.shape, m.dtype, m.device), []).append(m)
    if not by_shape:
        raise AdapterError(f"no AdaLoRA adapter {name!r} on {type(model).__name__}")
    total: Any = 0
    n = 0
    for group in by_shape.values():
        m = torch.stack(group)  # (k, r, d)
        eye = torch.eye(m.shape[1], dtype=m.dtype, device=m.device)
        total = total + torch.linalg.matrix_norm(m @ m.mT - eye).sum()
        n += len(group)
    return total / n


# ------------------------------------------------------------------------------------------------------------
# The rank allocator
# ------------------------------------------------------------------------------------------------------------


class AdaLoraAllocator:
    """PEFT's RankAllocator and `AdaLoraModel.update_and_allocate`, for lorakit models."""

    def __init__(self, model: nn.Module, name: str = "default") -> None:
        config = adalora_config(model, name)
        if config is None:
            raise AdapterError(f"no AdaLoRA adapter {name!r} on {type(model).__name__} (use inject_adalora)")
        self.config, self.name = config, name
        layers = _triplets(model, name)
        self.init_bgt = sum(a.lora_A.shape[0] for _, a in layers)
        self.target_bgt = config.target_r * len(layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(number of triplets to keep, whether to mask at this step)."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self, model: nn.Module) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for m, adapter in _triplets(model, self.name):
            for pname in ("lora_A", "lora_B", "lora_E"):
                p, key = getattr(adapter, pname), f"{m}.{pname}"
                if key not in self.exp_avg_ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(p)
                    self.exp_avg_unc[key] = torch.zeros_like(p)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                ipt = (p * grad).abs().detach()
                self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * ipt
                self.exp_avg_unc[key] = (
                    b2 * self.exp_avg_unc[key] + (1 - b2) * (ipt - self.exp_avg_ipt[key]).abs()
                )

    def _score(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if key not in self.exp_avg_ipt:  # never scored (no update before the first mask): all zero
            return torch.zeros_like(like)
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero Λ_i of the least important triplets so that `budget` remain (ties at the threshold go too, as in
        PEFT); returns the rank pattern."""
        scores = {}
        for m, a in _triplets(model, self.name):
            s_a = torch.mean(self._score(f"{m}.lora_A", a.lora_A), dim=1, keepdim=True)
            s_b = torch.mean(self._score(f"{m}.lora_B", a.lora_B), dim=0, keepdim=False).view(-1, 1)
            s_ab = torch.cat([s_a, s_b], dim=1).sum(dim=1, keepdim=False)
            scores[m] = self._score(f"{m}.lora_E", a.lora_E).view(-1) + s_ab.view(-1)
        k = self.init_bgt - budget
        if k > 0:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
        else:  # nothing to prune (PEFT fails here)
            threshold = -float("inf")
        pattern = {}
        for m, a in _triplets(model, self.name):
            drop = scores[m] <= threshold
            a.lora_E.masked_fill_(drop.view(-1, 1), 0.0)
            pattern[f"{m}.lora_E"] = (~drop).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, model: nn.Module, pattern: dict[str, list[bool]]) -> None:
        for m, a in _triplets(model, self.name):
            keep = torch.tensor(pattern[f"{m}.lora_E"], dtype=torch.bool, device=a.lora_E.device)
            a.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def update_and_allocate(self, model: nn.Module, global_step: int) -> int:
        """Update the importance scores and mask to this step's budget; returns the budget (kept triplets).

        Call after optimizer.step() and before zero_grad(), with the gradients present."""
        c = self.config
        final = c.total_step - c.tfinal
        if global_step < final:
            self.update_ipt(model)
            budget, mask = self.budget_schedule(global_step)
            if mask:
                c.rank_pattern = self.mask_to_budget(model, budget)
        elif global_step == final or c.rank_pattern is None:
            budget, _ = self.budget_schedule(global_step)
            c.rank_pattern = self.mask_to_budget(model, budget)
            self.reset_ipt()
        else:
            budget = self.target_bgt
            self.mask_using_rank_pattern(model, c.rank_pattern)
        return budget

    def ranks(self) -> dict[str, int]:
        """Kept triplets per module after the last allocation (init_r everywhere before the first)."""
        if self.config.rank_pattern is None:
            return {}
        return {k.removesuffix(".lora_E"): sum(v) for k, v in self.config.rank_pattern.items()}

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"exp_avg_ipt.{k}": v for k, v in self.exp_avg_ipt.items()}
        out.update({f"exp_avg_unc.{k}": v for k, v in self.exp_avg_unc.items()})
        out["rank_pattern"] = self.config.rank_pattern
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset_ipt()
        for k, v in state.items():
            kind, _, key = k.partition(".")
            if kind in ("exp_avg_ipt", "exp_avg_unc"):
                getattr(self, kind)[key] = v
        self.config.rank_pattern = state.get("rank_pattern")
