"""What a training step minimises: supervised fine-tuning's token loss, or DPO's preference loss.

The loop asks the objective for a micro-batch's tensors and its loss; everything else (the optimizer, the methods'
hooks, checkpoints, resume) is the same for both.

DPO (Rafailov et al., 2023) learns from pairs of answers to one prompt, one preferred ("chosen") and one not
("rejected"). With πθ the model being trained and πref the model it started from, and the log-probabilities of
each answer's tokens summed:

    m = β·[(log πθ(chosen) − log πref(chosen)) − (log πθ(rejected) − log πref(rejected))]
    sigmoid: loss = −(1 − ε)·log σ(m) − ε·log σ(−m)     (ε: dpo.label_smoothing, the conservative DPO of cDPO)
    ipo:     loss = (m/β − 1/(2β))²                      (IPO, Azar et al., 2023; log-probabilities averaged
                                                         over each answer's tokens, as TRL computes it)
    hinge:   loss = max(0, 1 − m)                        (SLiC)

β·(log πθ − log πref) of an answer is its implicit reward. The reference costs no memory: a LoRA starts as an
update of zero, so πref is the base model, and its log-probabilities are one more forward pass with the adapters
off (`lorakit.control.disabled`), without gradients. `dpo.sft_weight` adds the chosen answers' token loss (RPO's
α, TRL's `rpo_alpha`). The log-probabilities come from the chunked LM head (`lorakit.fused.sequence_logprobs`):
the batch × seq × vocab logits are never held.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.control import active_adapters, disabled, set_active
from lorakit.data.preference import Pair
from lorakit.data.tokenize import Encoded
from lorakit.fused import causal_lm_loss, sequence_logprobs

if TYPE_CHECKING:
    from lorakit.train.config import RunConfig

OBJECTIVES = ("sft", "dpo")
REFERENCE_ADAPTER = "reference"
"""With train.init_adapter, the name of its frozen copy: DPO's reference (`DpoObjective.reference`)."""
DPO_LOSSES = ("sigmoid", "ipo", "hinge")


class Objective:
    """Supervised fine-tuning: the mean cross-entropy of the learned tokens (chunked LM head where it can)."""

    name = "sft"

    def __init__(self, cfg: RunConfig | None = None) -> None:
        self.cfg = cfg

    def encoded(self, rows: list[Any]) -> list[Encoded]:
        """The token rows a micro-batch of training rows collates into."""
        return rows

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool
    ) -> tuple[torch.Tensor, dict]:
        """(the micro-batch's loss, its statistics to log: floats)."""
        return causal_lm_loss(model, batch, fused=fused), {}


class DpoObjective(Objective):
    """DPO on `Pair` rows: chosen and rejected sides in one batch (the chosen first), the reference with the
    adapters off (see the module docstring)."""

    name = "dpo"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        d = cfg.dpo
        self.beta, self.kind = d.beta, d.loss
        self.smoothing, self.sft_weight = d.label_smoothing, d.sft_weight
        self.reference_adapter = REFERENCE_ADAPTER if cfg.train.init_adapter else None

    @contextmanager
    def reference(self, model: nn.Module) -> Iterator[None]:
        """Inside the block `model` is the reference: the base with the adapters off, or, when training started
        from an adapter (train.init_adapter), that adapter as it was (its frozen copy, switched to and back)."""
        if self.reference_adapter is None:
            with disabled(model):
                yield
            return
        before = active_adapters(model)
        set_active(model, {self.reference_adapter: 1.0})
        try:
            yield
        finally:
            set_active(model, before)

    def encoded(self, rows: list[Pair]) -> list[Encoded]:
        return [p.chosen for p in rows] + [p.rejected for p in rows]

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool
    ) -> tuple[torch.Tensor, dict]:
        inner = getattr(model, "module", model)  # under DDP the reference needs no gradient sync
        with torch.no_grad(), self.reference(inner):
            ref, _ = sequence_logprobs(inner, batch, fused=fused)
        policy, count = sequence_logprobs(model, batch, fused=fused)
        losses, chosen, rejected = self.losses(policy, ref, count)
        loss = losses.mean()
        if self.sft_weight:
            n = len(policy) // 2
            loss = loss - self.sft_weight * (policy[:n] / count[:n].clamp(min=1)).mean()
        return loss, pair_stats(chosen, rejected)

    def losses(
        self, policy: torch.Tensor, ref: torch.Tensor, count: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(each pair's loss, the chosen answers' rewards, the rejected ones'), from the summed log-probabilities
        of a batch's rows (chosen rows first) under the policy and the reference, and each row's token count."""
        return dpo_losses(policy, ref, count, beta=self.beta, kind=self.kind, label_smoothing=self.smoothing)


def dpo_losses(
    policy: torch.Tensor,
    ref: torch.Tensor,
    count: torch.Tensor,
    *,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each pair's DPO loss, the chosen answers' rewards, the rejected ones', both detached) from the summed
    log-probabilities of 2·n rows, the n chosen first: `policy` under the model, `ref` under the reference, and
    `count`, each row's number of answer tokens (IPO averages over them). See the module docstring."""
    n = len(policy) // 2
    policy, ref = policy.float(), ref.float().to(policy.device)
    diff = policy - ref
    if kind == "ipo":
        per_token = diff / count.to(policy.device).clamp(min=1)
        logits = per_token[:n] - per_token[n:]
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        logits = beta * (diff[:n] - diff[n:])
        if kind == "hinge":
            losses = torch.relu(1 - logits)
        else:
            losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    rewards = beta * diff.detach()
    return losses, rewards[:n], rewards[n:]


def pair_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """The means of a batch's implicit rewards: how often the chosen answer's is the higher, their margin, and
    each side's."""
    return {
        "reward_accuracy": float((chosen > rejected).float().mean()),
        "reward_margin": float((chosen - rejected).mean()),
        "reward_chosen": float(chosen.mean()),
        "reward_rejected": float(rejected.mean()),
    }


def make_objective(cfg: RunConfig) -> Objective:
    """The objective `cfg.train.objective` names."""
    return DpoObjective(cfg) if cfg.train.objective == "dpo" else Objective(cfg)
