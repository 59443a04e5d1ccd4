"""What a training step minimises: supervised fine-tuning's token loss, a preference loss on pairs (DPO, SimPO,
ORPO, CPO), KTO's on answers marked desirable or not, or a reward model's on pairs. Supervised fine-tuning's is
`lorakit.train.objective_base.Objective`, which all build on; the classifiers' (classify, regression, token_classify:
a head of one output per class) are `lorakit.train.classifier_objectives`. `make_objective` gives each by name.

The loop asks the objective for a micro-batch's tensors and its loss; everything else (the optimizer, the methods'
hooks, checkpoints, resume) is the same for all.

The preference objectives learn from pairs of answers to one prompt, one preferred ("chosen") and one not
("rejected"). DPO (Rafailov et al., 2023), with πθ the model being trained and πref the model it started from,
and the log-probabilities of each answer's tokens summed:

    m = β·[(log πθ(chosen) − log πref(chosen)) − (log πθ(rejected) − log πref(rejected))]
    sigmoid: loss = −(1 − ε)·log σ(m) − ε·log σ(−m)     (ε: dpo.label_smoothing, the conservative DPO of cDPO)
    ipo:     loss = (m/β − 1/(2β))²                      (IPO, Azar et al., 2023; log-probabilities averaged
                                                         over each answer's tokens, as TRL computes it)
    hinge:   loss = max(0, 1 − m)                        (SLiC)

β·(log πθ − log πref) of an answer is its implicit reward. The reference costs no memory: a LoRA starts as an
update of zero, so πref is the base model, and its log-probabilities are one more forward pass with the adapters
off (`lorakit.control.disabled`), without gradients. `dpo.sft_weight` adds the chosen answers' token loss (RPO's
α, TRL's `rpo_alpha`).

Three objectives need no reference at all, so no second forward and no condition on where the adapter starts.
With ℓ(y) = the mean log-probability of answer y's tokens under πθ, and L(y) their sum:

    simpo: loss = −log σ(β·ℓ(chosen) − β·ℓ(rejected) − γ)      (SimPO, Meng et al., 2024; reward β·ℓ)
    orpo:  loss = −ℓ(chosen) − λ·log σ(log odds(chosen) − log odds(rejected)),  odds(y) = e^ℓ / (1 − e^ℓ)
                                                              (ORPO, Hong et al., 2024; λ: orpo.beta; reward λ·ℓ)
    cpo:   loss = −log σ(β·L(chosen) − β·L(rejected)) − α·ℓ(chosen)
                                                              (CPO, Xu et al., 2024; α: cpo.sft_weight)

CPO's first term is DPO's loss with no reference: cpo.loss ipo (on ℓ) or hinge, and label smoothing, as DPO's;
its reward is β·L (IPO: β·ℓ).

KTO (Ethayarajh et al., 2024) learns from single answers marked desirable or not (`lorakit.data.feedback`),
not pairs. With r(y) = log πθ(y) − log πref(y) (summed) and z the batch's KL estimate, the mean of r over each
prompt paired with another row's answer (the micro-batch's answers rotated by one, as TRL builds them; no
gradient, clamped at 0):

    kto:   loss = λD·(1 − σ(β·(r − z)))  for a desirable answer,  λU·(1 − σ(β·(z − r)))  for an undesirable one,
           averaged over the rows (λD, λU: kto.desirable_weight, kto.undesirable_weight; reward β·r)

A reward model (`reward`, as in InstructGPT, Ouyang et al., 2022) is the model with a one-output head on its last
token instead of the LM head (`lorakit.load_model(num_labels=1)`, transformers' ...ForSequenceClassification):
its output r(y) is the answer's reward, trained on pairs to rank the chosen answer above the rejected one:

    reward: loss = −log σ(r(chosen) − r(rejected) − m) + w·mean((r(chosen) + r(rejected))²)
                                  (m: the pair's margin, 0 without; w: reward.center_weight, 0 by default)

The head is new and trained whole with the LoRA (saved as PEFT's modules_to_save); the rewards are the head's
outputs, so they need no β.

The log-probabilities come from the chunked LM head (`lorakit.head.sequence_logprobs`): the batch × seq × vocab
logits are never held. The losses themselves, on those log-probabilities, are `lorakit.train.losses`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.control import active_adapters, disabled, set_active
from lorakit.data.feedback import Feedback, mismatched
from lorakit.data.preference import Pair
from lorakit.data.tokenize import Encoded
from lorakit.head import sequence_logprobs
from lorakit.train.losses import (
    chosen_nll,
    cpo_losses,
    dpo_losses,
    feedback_stats,
    kto_losses,
    mean_logprobs,
    orpo_losses,
    pair_stats,
    reward_losses,
    simpo_losses,
)
from lorakit.train.objective_base import Objective

if TYPE_CHECKING:
    from lorakit.train.config import RunConfig

OBJECTIVES = (
    "sft",
    "dpo",
    "simpo",
    "orpo",
    "cpo",
    "kto",
    "reward",
    "classify",
    "regression",
    "token_classify",
    "embed",
)
PREFERENCE_OBJECTIVES = ("dpo", "simpo", "orpo", "cpo", "kto", "reward")
"""The objectives that learn from preferences (each has a config section of its own name): pairs, or KTO's
feedback."""
REFERENCE_OBJECTIVES = ("dpo", "kto")
"""The objectives that compare the model with a reference: the model training starts from."""
NAMES = {
    "sft": "SFT",
    "dpo": "DPO",
    "simpo": "SimPO",
    "orpo": "ORPO",
    "cpo": "CPO",
    "kto": "KTO",
    "reward": "reward model",
    "classify": "classifier",
    "regression": "regression",
    "token_classify": "token classifier",
    "embed": "embedding model",
}
"""How each objective is written in reports."""
REFERENCE_ADAPTER = "reference"
"""With train.init_adapter, the name of its frozen copy: DPO's reference (`DpoObjective.reference`)."""
DPO_LOSSES = ("sigmoid", "ipo", "hinge")


class PreferenceObjective(Objective):
    """Training on `Pair` rows: each micro-batch holds the chosen sides, then the rejected ones. Subclasses say
    how a pair's loss and its answers' rewards follow from the batch (`scores`); `sft_weight` adds the chosen
    answers' token loss, each answer's mean over its tokens, averaged over the pairs (RPO's length-normalised
    NLL)."""

    rows = "pairs"
    sft_weight = 0.0

    def encoded(self, rows: list[Pair]) -> list[Encoded]:
        return [p.chosen for p in rows] + [p.rejected for p in rows]

    def scores(
        self, model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(each pair's loss, the chosen answers' rewards, the rejected ones' (detached), and the policy's summed
        log-probability and answer-token count of each row)."""
        raise NotImplementedError

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool
    ) -> tuple[torch.Tensor, dict]:
        losses, chosen, rejected, policy, count = self.scores(model, batch, fused=fused)
        loss = losses.mean()
        if self.sft_weight:
            loss = loss + self.sft_weight * chosen_nll(policy, count)
        return loss, pair_stats(chosen, rejected)


class Reference:
    """The reference of DPO and KTO: the model training starts from. That is the base with the adapters off, or,
    when training started from an adapter (train.init_adapter), that adapter's frozen copy."""

    reference_adapter: str | None = None

    @contextmanager
    def reference(self, model: nn.Module) -> Iterator[None]:
        """Inside the block `model` is the reference: the base with the adapters off, or, when training started
        from an adapter (train.init_adapter), that adapter as it was (its frozen copy, switched to and back). It
        is in eval mode there, so that dropout (the base's own, as GPT-2's, or the copied adapter's) leaves the
        reference's log-probabilities fixed; the training mode of every module is restored after."""
        modes = {m: m.training for m in model.modules()}
        model.eval()
        before = active_adapters(model) if self.reference_adapter is not None else None
        try:
            if before is None:
                with disabled(model):
                    yield
            else:
                set_active(model, {self.reference_adapter: 1.0})
                yield
        finally:
            if before is not None:
                set_active(model, before)
            for m, mode in modes.items():
                m.training = mode

    def reference_logprobs(self, model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool = True):
        """The summed log-probability of each row's answer under the reference (no gradients)."""
        inner = getattr(model, "module", model)  # under DDP the reference needs no gradient sync
        with torch.no_grad(), self.reference(inner):
            return sequence_logprobs(inner, batch, fused=fused)[0]


class DpoObjective(Reference, PreferenceObjective):
    """DPO on `Pair` rows, the reference with the adapters off (see the module docstring)."""

    name = "dpo"

    def __init__(self, cfg: RunConfig) -> None:
        d = cfg.dpo
        self.beta, self.kind = d.beta, d.loss
        self.smoothing, self.sft_weight = d.label_smoothing, d.sft_weight
        self.reference_adapter = REFERENCE_ADAPTER if cfg.train.init_adapter else None
        self.precompute = d.precompute_reference

    def extras(self, rows: list[Pair]) -> dict[str, torch.Tensor]:
        """The rows' precomputed reference log-probabilities (dpo.precompute_reference), chosen sides first."""
        if not rows or rows[0].reference is None:
            return {}
        return {
            "reference_logprobs": torch.tensor(
                [p.reference[0] for p in rows] + [p.reference[1] for p in rows]
            )
        }

    def scores(self, model, batch, *, fused=True):
        ref = batch.get("reference_logprobs")
        if ref is None:
            ref = self.reference_logprobs(model, batch, fused=fused)
        policy, count = sequence_logprobs(model, batch, fused=fused)
        return (*self.losses(policy, ref, count), policy, count)

    def losses(
        self, policy: torch.Tensor, ref: torch.Tensor, count: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(each pair's loss, the chosen answers' rewards, the rejected ones'), from the summed log-probabilities
        of a batch's rows (chosen rows first) under the policy and the reference, and each row's token count."""
        return dpo_losses(policy, ref, count, beta=self.beta, kind=self.kind, label_smoothing=self.smoothing)


class SimpoObjective(PreferenceObjective):
    """SimPO: no reference; each answer's reward is β times its mean token log-probability, and the chosen one's
    must beat the rejected one's by the margin γ (see the module docstring)."""

    name = "simpo"

    def __init__(self, cfg: RunConfig) -> None:
        self.beta, self.gamma, self.sft_weight = cfg.simpo.beta, cfg.simpo.gamma, cfg.simpo.sft_weight

    def scores(self, model, batch, *, fused=True):
        policy, count = sequence_logprobs(model, batch, fused=fused)
        return (*simpo_losses(policy, count, beta=self.beta, gamma=self.gamma), policy, count)


class OrpoObjective(PreferenceObjective):
    """ORPO: no reference; the chosen answer's token loss plus λ times the log odds ratio's loss (see the module
    docstring). The token loss is part of each pair's loss, so sft_weight stays 0."""

    name = "orpo"

    def __init__(self, cfg: RunConfig) -> None:
        self.weight = cfg.orpo.beta

    def scores(self, model, batch, *, fused=True):
        policy, count = sequence_logprobs(model, batch, fused=fused)
        return (*orpo_losses(policy, count, weight=self.weight), policy, count)


class CpoObjective(PreferenceObjective):
    """CPO: no reference; DPO's loss on the policy's summed log-probabilities alone, plus the chosen answers'
    token loss (cpo.sft_weight, 1 by default as in the paper; see the module docstring)."""

    name = "cpo"

    def __init__(self, cfg: RunConfig) -> None:
        c = cfg.cpo
        self.beta, self.kind = c.beta, c.loss
        self.smoothing, self.sft_weight = c.label_smoothing, c.sft_weight

    def scores(self, model, batch, *, fused=True):
        policy, count = sequence_logprobs(model, batch, fused=fused)
        losses = cpo_losses(policy, count, beta=self.beta, kind=self.kind, label_smoothing=self.smoothing)
        return (*losses, policy, count)


class KtoObjective(Reference, Objective):
    """KTO on `Feedback` rows (see the module docstring). A micro-batch holds its rows, then as many rows of the KL
    estimate: row i's prompt with row i−1's answer. `kto.sft_weight` adds the desirable answers' token loss (each
    one's mean over its tokens, averaged over them; nothing in a micro-batch without one)."""

    name = "kto"
    rows = "feedback"

    def __init__(self, cfg: RunConfig) -> None:
        k = cfg.kto
        self.beta, self.sft_weight = k.beta, k.sft_weight
        self.weights = (k.desirable_weight, k.undesirable_weight)
        self.reference_adapter = REFERENCE_ADAPTER if cfg.train.init_adapter else None
        self.max_len = cfg.data.max_len

    def encoded(self, rows: list[Feedback]) -> list[Encoded]:
        kl = [mismatched(rows[i], rows[i - 1], self.max_len) for i in range(len(rows))]
        return [r.row for r in rows] + kl

    def token_rows(self, rows: list[Feedback]) -> list[Encoded]:
        return [r.row for r in rows]

    def extras(self, rows: list[Feedback]) -> dict[str, torch.Tensor]:
        return {"desirable": torch.tensor([r.desirable for r in rows])}

    def scores(
        self, model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(each row's loss, its reward (detached), the batch's KL estimate z, and the policy's summed
        log-probability and answer-token count of each row)."""
        desirable = batch["desirable"]
        n = len(desirable)
        rows, kl_rows = _half(batch, slice(0, n)), _half(batch, slice(n, 2 * n))
        ref = self.reference_logprobs(model, batch, fused=fused)
        inner = getattr(model, "module", model)
        with torch.no_grad():
            kl_policy = sequence_logprobs(inner, kl_rows, fused=fused)[0]
        policy, count = sequence_logprobs(model, rows, fused=fused)
        losses, rewards, kl = kto_losses(
            policy, ref[:n], kl_policy, ref[n:], desirable, beta=self.beta, weights=self.weights
        )
        return losses, rewards, kl, policy, count

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool
    ) -> tuple[torch.Tensor, dict]:
        losses, rewards, kl, policy, count = self.scores(model, batch, fused=fused)
        loss = losses.mean()
        desirable = batch["desirable"].to(policy.device).bool()
        if self.sft_weight and desirable.any():
            loss = loss - self.sft_weight * mean_logprobs(policy[desirable], count[desirable]).mean()
        return loss, feedback_stats(rewards, kl, batch["desirable"], self.beta)


class RewardObjective(PreferenceObjective):
    """A reward model on `Pair` rows: the model's one output on each row's last token is the answer's reward, and
    the chosen answer's must beat the rejected one's (see the module docstring)."""

    name = "reward"
    num_labels = 1
    generates = False

    def __init__(self, cfg: RunConfig) -> None:
        self.center_weight = cfg.reward.center_weight

    def rewards(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each row's reward, in float32: the model's output at its last token that is not padding (the head's
        own pooling, as transformers and PEFT compute it at inference)."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits
        if logits.dim() != 2 or logits.shape[-1] != 1:
            raise ValueError(
                f"train.objective reward needs a model with one output per row (num_labels=1), got logits of "
                f"shape {tuple(logits.shape)}"
            )
        return logits[:, 0].float()

    def extras(self, rows: list[Pair]) -> dict[str, torch.Tensor]:
        """The pairs' margins (a pair without one: 0), where any pair has one."""
        if not any(p.margin is not None for p in rows):
            return {}
        return {"margin": torch.tensor([p.margin or 0.0 for p in rows])}

    def scores(self, model, batch, *, fused=True):
        n = len(batch["input_ids"]) // 2
        chosen, rejected = self.rewards(model, batch).detach().split(n)
        margin = batch.get("margin")
        gap = chosen - rejected if margin is None else chosen - rejected - margin.to(chosen)
        return -F.logsigmoid(gap), chosen, rejected, None, None

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool
    ) -> tuple[torch.Tensor, dict]:
        loss, chosen, rejected = reward_losses(
            self.rewards(model, batch), center_weight=self.center_weight, margin=batch.get("margin")
        )
        return loss, pair_stats(chosen, rejected)


def _half(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """The token tensors of `batch`'s rows `rows`, cut to their longest row (the batch is right-padded)."""
    mask = batch["attention_mask"][rows]
    width = int(mask.sum(-1).max())
    return {k: batch[k][rows, :width] for k in ("input_ids", "attention_mask", "labels")}


def make_objective(cfg: RunConfig) -> Objective:
    """The objective `cfg.train.objective` names."""
    from lorakit.train.classifier_objectives import (
        ClassifyObjective,
        RegressionObjective,
        TokenClassifyObjective,
    )
    from lorakit.train.embed_objective import EmbedObjective

    kinds = {
        "dpo": DpoObjective,
        "simpo": SimpoObjective,
        "orpo": OrpoObjective,
        "cpo": CpoObjective,
        "kto": KtoObjective,
        "reward": RewardObjective,
        "classify": ClassifyObjective,
        "regression": RegressionObjective,
        "token_classify": TokenClassifyObjective,
        "embed": EmbedObjective,
    }
    kind = kinds.get(cfg.train.objective)
    return kind(cfg) if kind else Objective()
