"""Fused training kernels: a LoRA linear layer and a chunked LM-head cross-entropy, as autograd functions.

Plain autograd runs ``base(x) + s·B(A(dropout(x)))`` as five or six ops, each allocating its output and saving
its inputs; with dropout it also keeps the dropped copy of x for every adapted layer. `lora_linear` does the same
math in one function:

* forward: ``out = x·W0ᵀ + b`` then ``out += s·(x̃·Aᵀ)·Bᵀ`` in place (one output buffer, no separate ΔW output);
* saved for backward: x (a reference: layers that read the same input, e.g. q/k/v, share it), the rank-r
  product x̃·Aᵀ, and, with dropout, the keep mask at one byte an entry (not the dropped copy of x, which PEFT
  keeps at four); the mask comes from a counter-based generator (`dropout_keep`), 4× cheaper than bernoulli_;
* backward, rank first: ``gB = g·B`` (N×r) once, then ``∂x = g·W0 + s·gB·A`` accumulated in one buffer,
  ``∂A = s·gBᵀ·x̃`` and ``∂B = s·gᵀ·(x̃·Aᵀ)``. W0 gets no gradient: it is frozen.

`lm_head_loss` computes the mean token cross-entropy of ``h·Wᵀ`` against labels without ever holding the
N×V logits: it walks the rows in chunks and, since the loss is the last op, computes ∂h in the same pass, so
backward only scales a stored N×d tensor. Only rows whose label is not ignored are computed at all.

Both have a plain-autograd fallback: `set_fused(False)` (or LORAKIT_FUSED=0) switches the LoRA layers back, and
`causal_lm_loss(..., fused=False)` calls the model's own loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from lorakit.data.tokenize import IGNORE
from lorakit.dropout import dropout_keep, dropout_scale, dropped, scratch
from lorakit.envflags import env_flag

_FUSED = env_flag("LORAKIT_FUSED", True)


# Off by default: measured no gain on SmolLM2 at r=16 (lorakit / lorakit-ungrouped 1.015× [0.868–1.077]).
_GROUPS = env_flag("LORAKIT_GROUPS", False)


def set_groups(enabled: bool) -> bool:
    """Turn the shared x·Aᵀ of sibling projections (q/k/v, gate/up) on or off; returns the old value."""
    global _GROUPS
    old, _GROUPS = _GROUPS, bool(enabled)
    return old


def groups_enabled() -> bool:
    return _GROUPS


def set_fused(enabled: bool) -> bool:
    """Turn the fused LoRA path on or off for all layers (off: plain autograd, for debugging); returns the old value."""
    global _FUSED
    old, _FUSED = _FUSED, bool(enabled)
    return old


def fused_enabled() -> bool:
    return _FUSED


# --------------------------------------------------------------------------------------------------------------
# LoRA linear
# --------------------------------------------------------------------------------------------------------------


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, p: float, seed: int, weight_of=None):
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        w = weight if weight_of is None else weight_of(x.dtype)  # a 4-bit base: dense for this use only
        out = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
        keep = None
        if p == 0.0:
            xa = x2 @ A.t()  # (N, r)
        else:
            keep = dropout_keep(seed, x2.shape, p, x2.device)  # saved: 1 byte an entry
            xa = dropped(x2, keep) @ A.t()
            xa.mul_(dropout_scale(p))  # the dropout scale, applied on the rank side
        out.addmm_(xa, B.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, A, B, xa, keep)
        ctx.scaling, ctx.p, ctx.weight_of = scaling, p, weight_of
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, A, B, xa, keep = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        g = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        gb = g @ B  # (N, r): the rank-first product every gradient below reuses
        scale = dropout_scale(p) if keep is not None else 1.0
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ (weight if ctx.weight_of is None else ctx.weight_of(g.dtype))  # dequantized again
            if keep is None:
                grad_x.addmm_(gb, A, alpha=s)
            else:
                tmp = scratch(x2)
                torch.mm(gb, A, out=tmp).mul_(keep)
                grad_x.add_(tmp, alpha=s * scale)
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[3]:
            xd = x2 if keep is None else dropped(x2, keep)
            grad_a = (gb.t() @ xd).mul_(s * scale)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ xa).mul_(s)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    base: nn.Linear,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """``base(x) + scaling·B·A·dropout(x)`` for a frozen nn.Linear, in one autograd node.

    Mixed precision follows autocast: under `torch.autocast` every operand is cast to the autocast dtype, and
    without it a 16-bit base takes float32 adapters (the optimizer's master weights) cast to its dtype. Either
    way the casts are autograd ops, so the adapters' gradients come back in float32."""
    return _lora(x, base.weight, None, base.bias, A, B, scaling, dropout, training)


def lora_linear_dense(
    x: torch.Tensor,
    weight_of: Callable[[torch.dtype], torch.Tensor],
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """`lora_linear` for a frozen base that stores its weight in another form (a 4-bit NF4 layer):
    ``weight_of(dtype)`` gives the dense weight for one use, in the forward and again in the backward, so no
    dense copy lives between the passes (what the base's own training forward does, lorakit.quant.nf4)."""
    return _lora(x, None, weight_of, bias, A, B, scaling, dropout, training)


def _lora(x, weight, weight_of, bias, A, B, scaling, dropout, training) -> torch.Tensor:
    p = dropout if training else 0.0
    seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        dt = torch.get_autocast_dtype(kind)
        with torch.autocast(kind, enabled=False):
            w = None if weight is None else weight.to(dt)
            b = None if bias is None else bias.to(dt)
            return _LoraLinear.apply(
                x.to(dt), w, b, A.to(dt), B.to(dt), float(scaling), float(p), seed, weight_of
            )
    if A.dtype != x.dtype:
        A, B = A.to(x.dtype), B.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return _LoraLinear.apply(x, weight, bias, A, B, float(scaling), float(p), seed, weight_of)


def can_fuse_dense(base: nn.Module, x: torch.Tensor, A: torch.Tensor) -> bool:
    """Whether `lora_linear_dense` computes what the plain path would for a base whose handler gives a dense
    weight: in training only (inference keeps the base's own forward, which for a 4-bit base multiplies a few
    rows straight from the codes), and a call both fused paths take (`_fusable_call`)."""
    return torch.is_grad_enabled() and _fusable_call(base, x, A, mixed=True)


def can_fuse(base: nn.Module, x: torch.Tensor, A: torch.Tensor, *, mixed: bool = True) -> bool:
    """Whether `lora_linear` computes what the plain path would for this call. `mixed`: also under autocast,
    and with float32 adapters on a 16-bit base (cast to its dtype, as autocast would)."""
    if type(base) is not nn.Linear:
        return False
    w = base.weight
    # a frozen weight, a plain tensor (no DTensor / quantized / meta subclass), in x's dtype unless autocast picks
    if w.requires_grad or type(w.data) is not torch.Tensor or not w.is_floating_point():
        return False
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != w.dtype:
        return False
    return _fusable_call(base, x, A, mixed=mixed)


def _fusable_call(base: nn.Module, x: torch.Tensor, A: torch.Tensor, *, mixed: bool) -> bool:
    """What both fused paths need of a call: no hooks on the base, a frozen bias, plain floating-point x and
    adapters, and adapters in x's dtype (with `mixed`: also under autocast, or float32 adapters on a 16-bit x,
    cast as autocast would)."""
    if base._forward_hooks or base._forward_pre_hooks:
        return False
    bias = getattr(base, "bias", None)
    if bias is not None and bias.requires_grad:
        return False
    if type(A.data) is not torch.Tensor or type(x) is not torch.Tensor:
        return False
    if not (x.is_floating_point() and A.is_floating_point()):
        return False
    if torch.is_autocast_enabled(x.device.type):  # autocast picks each op's dtype
        return mixed
    return A.dtype == x.dtype or (mixed and A.dtype == torch.float32 and x.element_size() == 2)


# --------------------------------------------------------------------------------------------------------------
# Chunked LM-head cross-entropy
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# LoRA linear from a precomputed x·Aᵀ (lorakit.siblings: one stacked product for q/k/v or gate/up)
# --------------------------------------------------------------------------------------------------------------


class _LoraFromXA(torch.autograd.Function):
    """``x·W0ᵀ + b + s·xa·Bᵀ`` where xa = x·Aᵀ was computed outside (as a slice of a stacked product)."""

    @staticmethod
    def forward(ctx, x, weight, bias, xa, B, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        out.addmm_(xa, B.t(), alpha=scaling)
        ctx.save_for_backward(weight, B, xa)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        weight, B, xa = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = (g @ weight).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_xa = (g @ B).mul_(ctx.scaling) if ctx.needs_input_grad[3] else None
        grad_b = (g.t() @ xa).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_xa, grad_b, None


def lora_from_xa(x, weight, bias, xa, B, scaling: float) -> torch.Tensor:
    """``x·W0ᵀ + b + scaling·xa·Bᵀ`` for a frozen W0, where xa = x·Aᵀ was computed outside, in one autograd node."""
    return _LoraFromXA.apply(x, weight, bias, xa, B, scaling)
