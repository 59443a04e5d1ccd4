"""The chunked LM head: the token cross-entropy and the per-row log-probabilities of ``hidden·Wᵀ``, without
ever holding the N×V logits.

`lm_head_loss` computes the mean token cross-entropy of ``h·Wᵀ`` against labels: it walks the rows in chunks and,
since the loss is the last op, computes ∂h in the same pass, so backward only scales a stored N×d tensor. Only rows
whose label is not ignored are computed at all. `head_sequence_logprobs` does the same for each row's summed
log-probability of its labels (the preference objectives' input). `causal_lm_loss` and `sequence_logprobs` apply
them to a Hugging Face model whose head allows it (`lean_head`), and otherwise use the model's own logits
(`fused=False` too).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from lorakit.data.tokenize import IGNORE


def _chunk_rows(vocab: int, budget_bytes: int = 64 << 20, min_rows: int = 256) -> int:
    """Rows per chunk: one float32 logits chunk near `budget_bytes`, and never fewer than `min_rows`, because the
    two head GEMMs of a chunk (rows×d by d×V, rows×V by V×d) run well below the cores' rate on short row
    counts. `benchmarks/bench_head.py` on SmolLM2's head (V=49,152, d=576, 1,020 rows, fp32, 2 AVX2 cores): the
    loss with its ∂h took 1.24× transformers' full-logits loss in chunks of 85 rows (16 MB, the old budget), 0.91×
    at this default (341 rows) and 0.87× in one chunk of all 1,020. The buffer is allocated once a step, so the
    page faults of a chunk above glibc's mmap threshold are paid once, not per chunk."""
    return max(min_rows, budget_bytes // (4 * vocab))


def _head_chunks(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(first row, row indices, labels, logits, logsumexp) of each chunk of `chunk` rows of hidden·Wᵀ. The logits
    live in one buffer, allocated once (float32 or wider) and overwritten chunk by chunk: a caller may change them
    in place (into the softmax) before asking for the next chunk."""
    n = hidden.shape[0]
    acc = torch.promote_types(hidden.dtype, torch.float32)
    buf = torch.empty((min(chunk, n), weight.shape[0]), dtype=acc, device=hidden.device)
    for i in range(0, n, chunk):
        y = labels[i : i + chunk]
        logits = _head_logits(buf[: len(y)], hidden[i : i + chunk], weight)
        yield i, torch.arange(len(y), device=y.device), y, logits, torch.logsumexp(logits, dim=-1)


def _head_logits(buf: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A chunk's logits h·Wᵀ written into `buf` (float32 or wider: 16-bit logits are upcast, as HF does)."""
    if buf.dtype == h.dtype:
        return torch.mm(h, weight.t(), out=buf)
    return buf.copy_(h @ weight.t())


def _head_grad(out: torch.Tensor, probs: torch.Tensor, weight: torch.Tensor) -> None:
    """A chunk's ∂hidden, probs·W, written into `out` (in the hidden states' dtype)."""
    if out.dtype == probs.dtype:
        torch.mm(probs, weight, out=out)
    else:
        out.copy_(probs.to(out.dtype) @ weight)


class _HeadCrossEntropy(torch.autograd.Function):
    """The summed token cross-entropy of ``hidden·weightᵀ`` against labels, chunk by chunk; ∂hidden is computed
    in the forward pass, so the backward only scales it."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):
        need_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(hidden) if need_grad else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 logits are upcast, as HF does
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for i, rows, y, logits, lse in _head_chunks(hidden, weight, labels, chunk):
            total += (lse - logits[rows, y]).sum(dtype=torch.float64)
            if need_grad:
                probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
                probs[rows, y] -= 1.0
                _head_grad(grad_h[i : i + chunk], probs, weight)
        ctx.save_for_backward(grad_h) if need_grad else None
        return total.to(acc)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), None, None, None


class _LoraHeadCrossEntropy(torch.autograd.Function):
    """`_HeadCrossEntropy` for a head with one LoRA adapter: logits ``h·Wᵀ + s·(h·Aᵀ)·Bᵀ``, chunk by chunk, with
    ∂h, ∂A and ∂B computed in the forward pass (P = softmax − one-hot of a chunk): ∂h = P·W + s·(P·B)·A,
    ∂A = s·(P·B)ᵀ·h, ∂B = Pᵀ·(s·h·Aᵀ). The adapter computes in its own dtype (fp32 beside a 16-bit base)."""

    @staticmethod
    def forward(ctx, hidden, weight, A, B, labels, chunk: int, s: float):
        n = hidden.shape[0]
        need = ctx.needs_input_grad
        grad_h = torch.empty_like(hidden) if need[0] else None
        grad_a = torch.zeros_like(A) if need[2] else None
        grad_b = torch.zeros_like(B) if need[3] else None
        acc = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for i in range(0, n, chunk):
            h = hidden[i : i + chunk]
            y = labels[i : i + chunk]
            rows = torch.arange(len(y), device=y.device)
            ha = (h.to(A.dtype) @ A.t()) * s  # (rows, r)
            logits = (h @ weight.t()).to(acc) + (ha @ B.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits[rows, y]).sum(dtype=torch.float64)
            if not (need[0] or need[2] or need[3]):
                continue
            probs = logits.sub_(lse.unsqueeze(1)).exp_()
            probs[rows, y] -= 1.0
            pb = probs.to(B.dtype) @ B  # (rows, r)
            if grad_h is not None:
                grad_h[i : i + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype) + (
                    (pb * s) @ A
                ).to(hidden.dtype)
            if grad_a is not None:
                grad_a += (pb * s).t() @ h.to(A.dtype)
            if grad_b is not None:
                grad_b += probs.to(B.dtype).t() @ ha
        ctx.save_for_backward(grad_h, grad_a, grad_b)
        return total.to(acc)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_a, grad_b = ctx.saved_tensors
        scale = [None if g is None else g * grad_loss.to(g.dtype) for g in (grad_h, grad_a, grad_b)]
        return scale[0], None, scale[1], scale[2], None, None, None


class _HeadTokenLogprobs(torch.autograd.Function):
    """log p(label) of each row of ``hidden·weightᵀ``, chunk by chunk: a vector of n, not a sum. ∂hidden of a row,
    (one-hot − softmax)·W, is computed in the forward pass, so the backward only scales each row by its incoming
    gradient (a DPO loss weighs every sequence differently)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):
        need_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(hidden) if need_grad else None
        out = torch.empty(
            hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device
        )
        for i, rows, y, logits, lse in _head_chunks(hidden, weight, labels, chunk):
            out[i : i + chunk] = logits[rows, y] - lse
            if need_grad:
                probs = logits.sub_(lse.unsqueeze(1)).exp_().neg_()  # −softmax, in place
                probs[rows, y] += 1.0
                _head_grad(grad_h[i : i + chunk], probs, weight)
        ctx.save_for_backward(grad_h) if need_grad else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype).unsqueeze(1), None, None, None


def head_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk: int | None = None,
    ignore_index: int = IGNORE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the summed log-probability of each row's learned labels, their count), both of shape (batch,), under
    ``hidden·weightᵀ`` with labels shifted by one as for a causal LM: what DPO compares. Only the learned positions
    are projected, in chunks, so the batch × seq × vocab logits are never held. The weight must be frozen."""
    batch = hidden.shape[0]
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    keep = (y != ignore_index).nonzero().squeeze(1)
    row = keep // max(1, labels.shape[1] - 1)
    count = torch.zeros(batch, dtype=torch.long, device=h.device).index_add_(0, row, torch.ones_like(row))
    acc = torch.promote_types(hidden.dtype, torch.float32)
    if keep.numel() == 0:
        return (hidden.sum() * 0.0).to(acc).expand(batch), count
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    if h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    token = _HeadTokenLogprobs.apply(h, weight, y, chunk or _chunk_rows(weight.shape[0]))
    return torch.zeros(batch, dtype=token.dtype, device=h.device).index_add(0, row, token), count


def sequence_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's learned labels, their count) under a causal LM, for `batch`'s
    input_ids, attention_mask and labels (-100: not counted). With a frozen plain head on a Hugging Face backbone
    (and `fused`), the chunked head above; else from the model's own logits, in float32."""
    head = lean_head(model) if fused else None
    if head is not None and head[1] is None:
        out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return head_sequence_logprobs(out.last_hidden_state, head[0], batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1]
    labels = batch["labels"][:, 1:].to(logits.device)
    learned = labels != IGNORE
    token = (
        torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    )
    return (token * learned).sum(-1), learned.sum(-1)


def lm_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk: int | None = None,
    ignore_index: int = IGNORE,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Token cross-entropy of ``hidden·weightᵀ`` at the positions whose label is not `ignore_index`, for causal
    LMs, as transformers' `ForCausalLMLoss` computes it: hidden (batch, seq, d) predicts `labels` shifted by one,
    or `shift_labels` (already shifted) as given; the mean over learned tokens, or their sum divided by
    `num_items_in_batch`. The weight must be frozen (no gradient). `lora`: the head's one LoRA adapter (A, B, s),
    whose logits s·(h·Aᵀ)·Bᵀ are added (A and B get their gradients). No learned token: 0, connected to the
    graph."""
    if shift_labels is None:
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = labels[:, 1:].reshape(-1)
    else:
        h, y = hidden.reshape(-1, hidden.shape[-1]), shift_labels.reshape(-1)
    y = y.to(h.device)
    keep = (y != ignore_index).nonzero().squeeze(1)
    if keep.numel() == 0:
        return (hidden.sum() * 0.0).float()  # no token to learn: a zero loss still connected to the graph
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    if (
        h.dtype != weight.dtype
    ):  # e.g. a float32 norm output before a bf16 head: the head's precision, as autocast
        h = h.to(weight.dtype)
    rows = chunk or _chunk_rows(weight.shape[0])
    if lora is None:
        total = _HeadCrossEntropy.apply(h, weight, y, rows)
    else:
        total = _LoraHeadCrossEntropy.apply(h, weight, lora[0], lora[1], y, rows, float(lora[2]))
    if num_items_in_batch is None:
        return total / keep.numel()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _head(model: nn.Module) -> nn.Module | None:
    """The output head of a Hugging Face model whose logits are the head's output on
    `base_model(...).last_hidden_state`, with no scaling or softcap after it; else None."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):  # e.g. PEFT's or DDP's wrappers: their own forward must run
        return None
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter else None
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        return None
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return None
    return head


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The model's LM head if its logits are exactly `base_model(...).last_hidden_state @ head.weight.T`: a plain
    `nn.Linear` without bias (not adapted, not quantized) on a Hugging Face backbone, and no scaling or softcap of
    the logits after it. Else None."""
    head = _head(model)
    if type(head) is not nn.Linear or head.bias is not None or type(head.weight.data) is not torch.Tensor:
        return None
    return head


def lean_head(model: nn.Module) -> tuple[torch.Tensor, tuple | None] | None:
    """(the LM head's frozen weight, its one LoRA adapter as (A, B, s) or None) when the chunked loss computes
    exactly the model's own loss: a plain frozen head, or a LoRA layer on one that says so (`lean_factors`: one
    plain adapter running, no dropout in training); else None."""
    head = _head(model)
    if head is None:
        return None
    if type(head) is nn.Linear:
        plain = plain_head(model)
        return None if plain is None or plain.weight.requires_grad else (plain.weight, None)
    factors = getattr(head, "lean_factors", None)
    return factors() if callable(factors) else None


def fusable_head(model: nn.Module) -> nn.Linear | None:
    """The model's LM head if the chunked loss computes exactly the model's own loss (a plain head, frozen),
    else None."""
    head = plain_head(model)
    return None if head is None or head.weight.requires_grad else head


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool = True) -> torch.Tensor:
    """The causal-LM training loss of `batch` (input_ids, attention_mask, labels): the chunked head loss when the
    model allows it (a frozen, plain LM head on a Hugging Face backbone), else the model's own loss."""
    head = lean_head(model) if fused else None
    if head is None:
        return model(**batch).loss
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return lm_head_loss(out.last_hidden_state, head[0], batch["labels"], lora=head[1])
