"""The preference losses on sequence log-probabilities, and the statistics logged beside them: DPO's (sigmoid,
IPO, hinge), SimPO's, ORPO's, CPO's and KTO's, as `lorakit.train.objectives` defines them. Plain tensor
functions, no model: tests/test_dpo.py, test_ref_free.py and test_kto.py test them, test_dpo_trl.py and
test_kto_trl.py train against TRL."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kto_losses(
    policy: torch.Tensor,
    ref: torch.Tensor,
    kl_policy: torch.Tensor,
    kl_ref: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float,
    weights: tuple[float, float] = (1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each row's KTO loss, its reward β·r (detached), the KL estimate z) from the summed log-probabilities of
    n rows' answers under the policy and the reference, the same of the n mismatched rows of the KL estimate, and
    whether each answer is desirable; `weights` = (λD, λU). See the module docstring."""
    diff = policy.float() - ref.float().to(policy.device)
    kl = (kl_policy.float() - kl_ref.float().to(policy.device)).mean().detach().clamp(min=0)
    good = desirable.to(policy.device).bool()
    losses = torch.where(
        good,
        weights[0] * (1 - torch.sigmoid(beta * (diff - kl))),
        weights[1] * (1 - torch.sigmoid(beta * (kl - diff))),
    )
    return losses, beta * diff.detach(), kl


def feedback_stats(
    rewards: torch.Tensor, kl: torch.Tensor, desirable: torch.Tensor, beta: float
) -> dict[str, float]:
    """KTO's statistics of a batch: how often a row's reward lies on its label's side of the reference point β·z
    (above it for a desirable answer, below for an undesirable one), the mean distance on that side (negative:
    the wrong side), and the KL estimate z (`kl`: one for the batch, or each row's)."""
    sign = desirable.to(rewards.device).float() * 2 - 1
    side = sign * (rewards - beta * kl)
    return {
        "reward_accuracy": float((side > 0).float().mean()),
        "reward_margin": float(side.mean()),
        "kl": float(kl.float().mean()),
    }


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


def reward_losses(
    rewards: torch.Tensor, *, center_weight: float = 0.0, margin: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the batch's reward-model loss, the chosen answers' rewards, the rejected ones', both detached) from the
    rewards of 2·n rows (the n chosen first): the Bradley-Terry loss −log σ(r_chosen − r_rejected − m) averaged
    over the pairs (m: each pair's `margin`, Llama 2's margin loss; 0 without), plus `center_weight` times the mean
    of (r_chosen + r_rejected)², as TRL's RewardTrainer computes them."""
    n = len(rewards) // 2
    chosen, rejected = rewards[:n], rewards[n:]
    gap = chosen - rejected if margin is None else chosen - rejected - margin.to(rewards)
    loss = -F.logsigmoid(gap).mean()
    if center_weight:
        loss = loss + center_weight * ((chosen + rejected) ** 2).mean()
    return loss, chosen.detach(), rejected.detach()


def class_loss(
    logits: torch.Tensor, target: torch.Tensor, weights: list[float] | None = None
) -> torch.Tensor:
    """A classifier's loss: the cross-entropy of each row's class logits against its class, averaged over the rows;
    with class `weights`, each row's cross-entropy times its class's weight, averaged over the rows (Keras'
    class_weight; not torch's weighted mean, which divides by the weights' sum, so that micro-batches of equal size
    average to the large batch's loss)."""
    if weights is None:
        return F.cross_entropy(logits, target)
    w = torch.tensor(weights, dtype=logits.dtype, device=logits.device)
    return (F.cross_entropy(logits, target, reduction="none") * w[target]).mean()


def multi_label_loss(
    logits: torch.Tensor, hot: torch.Tensor, weights: list[float] | None = None
) -> torch.Tensor:
    """A multi-label classifier's loss: each class's binary cross-entropy against whether the row has it (`hot`:
    0 or 1 per class), averaged over rows and classes (transformers' loss); with `weights`, each class's positive
    terms times its weight (BCEWithLogitsLoss's pos_weight), still averaged over rows and classes, so that
    micro-batches of equal size average to the large batch's loss."""
    pos = None if weights is None else torch.tensor(weights, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, hot.to(logits), pos_weight=pos)


def simpo_losses(
    policy: torch.Tensor, count: torch.Tensor, *, beta: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each pair's SimPO loss, the chosen answers' rewards, the rejected ones', both detached) from the summed
    log-probabilities of 2·n rows (the n chosen first) and their answer-token counts."""
    n = len(policy) // 2
    rewards = beta * mean_logprobs(policy, count)
    losses = -F.logsigmoid(rewards[:n] - rewards[n:] - gamma)
    return losses, rewards[:n].detach(), rewards[n:].detach()


def cpo_losses(
    policy: torch.Tensor,
    count: torch.Tensor,
    *,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each pair's CPO loss, the chosen answers' rewards, the rejected ones', both detached) from the summed
    log-probabilities of 2·n rows (the n chosen first) and their answer-token counts. CPO's preference loss is
    DPO's with no reference (its log-probabilities taken as 0): the same `kind`s and label smoothing, IPO's on
    the mean log-probabilities. The rewards are β times the log-probabilities the loss compares (summed, or
    IPO's means), as TRL's CPOTrainer logs them."""
    losses, chosen, rejected = dpo_losses(
        policy, torch.zeros_like(policy), count, beta=beta, kind=kind, label_smoothing=label_smoothing
    )
    if kind == "ipo":
        n = len(policy) // 2
        rewards = beta * mean_logprobs(policy, count).detach()
        chosen, rejected = rewards[:n], rewards[n:]
    return losses, chosen, rejected


def orpo_losses(
    policy: torch.Tensor, count: torch.Tensor, *, weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each pair's ORPO loss: the chosen answer's mean token loss plus `weight` times the odds-ratio loss; the
    chosen answers' rewards, the rejected ones', both `weight` times the mean log-probability, detached), from
    the summed log-probabilities of 2·n rows (the n chosen first) and their answer-token counts."""
    n = len(policy) // 2
    mean = mean_logprobs(policy, count)
    # log(p / (1 - p)) with p = exp(mean); an answer certain to float32 (mean 0: every token's log-softmax rounds to
    # 0) would give infinite odds and a NaN gradient, so the odds stop at p = 1 - 1e-6 (log odds 13.8)
    capped = mean.clamp(max=-1e-6)
    log_odds = capped - _log1mexp(capped)
    losses = -mean[:n] - weight * F.logsigmoid(log_odds[:n] - log_odds[n:])
    rewards = weight * mean.detach()
    return losses, rewards[:n], rewards[n:]


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, without cancellation on either side of −log 2 (Mächler, 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def mean_logprobs(policy: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Each row's mean log-probability per answer token (float32), from its sum and its token count."""
    return policy.float() / count.to(policy.device).clamp(min=1)


def chosen_nll(policy: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The chosen answers' token loss (the first half of the rows): each one's mean over its tokens, averaged."""
    n = len(policy) // 2
    return -mean_logprobs(policy[:n], count[:n]).mean()
