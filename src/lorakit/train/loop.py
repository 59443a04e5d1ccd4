"""The training loop: one plain function, top to bottom.

AdamW, warmup then cosine/linear/constant, gradient accumulation and clipping, optional non-reentrant gradient
checkpointing, determinism from a seed, periodic eval and checkpoints with exact resume, a stop on a non-finite
loss, metrics.jsonl. Callbacks receive every metrics record, so any tracker can plug in.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.data.tokenize import IGNORE, Encoded
from lorakit.errors import LorakitError
from lorakit.fused import causal_lm_loss, groups_enabled, set_fused
from lorakit.siblings import probe_groups
from lorakit.train.checkpoint import (
    full_tensor,
    is_sharded,
    latest_checkpoint,
    resume_from,
    save_checkpoint,
)
from lorakit.train.config import RunConfig
from lorakit.train.methods import Method, param_groups

log = logging.getLogger(__name__)
Callback = Callable[[dict[str, Any]], None]


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (non-finite loss, bad resume)."""


def _grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The total L2 norm of the gradients, clipped to `max_norm` when it is > 0."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def collate(rows: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into input_ids, attention_mask and labels tensors (batch, seq)."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then the schedule."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / (t.warmup_steps + 1)
    if t.schedule == "constant":
        return 1.0
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    if t.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_order(n: int, step: int, micro: int, cfg: RunConfig, world: int = 1, rank: int = 0) -> list[int]:
    """Example indices of micro-batch `micro` of optimizer step `step` on `rank`: a pure function of the seed, so
    a resumed run sees exactly the batches the uninterrupted one would have."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    start = step * per_step + (micro * world + rank) * cfg.train.batch_size
    out = []
    for pos in range(start, start + cfg.train.batch_size):
        epoch, i = divmod(pos, n)
        out.append(_epoch_order(n, cfg.train.seed, epoch)[i])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The shuffled order of the n training rows in `epoch`."""
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def train_loop(
    model: nn.Module,
    train_rows: list[Encoded],
    cfg: RunConfig,
    *,
    pad_id: int,
    out_dir: Path,
    evaluate: Callable[[], dict[str, float]] | None = None,
    callbacks: list[Callback] | None = None,
    world: int = 1,
    rank: int = 0,
    base_model_id: str | None = None,
    method: Method | None = None,
) -> dict[str, Any]:
    """Train the model's trainable parameters on `train_rows`. Returns a summary dict.

    Under DDP pass the wrapped model; under FSDP2 the sharded one, and `evaluate` on every rank (its forward
    passes are collectives); rank 0 alone writes metrics and checkpoint files. `method` (default: plain LoRA)
    gets its hooks called around each step (see lorakit.train.methods).
    """
    t = cfg.train
    method = method or Method(cfg)
    callbacks = list(callbacks or [])
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters (inject an adapter first)")
    inner = getattr(model, "module", model)  # under DDP, the wrapped model
    opt = torch.optim.AdamW(param_groups(inner, cfg), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    sharded = is_sharded(inner)  # FSDP2: saving is a collective, every rank takes part
    if t.grad_checkpointing and hasattr(inner, "gradient_checkpointing_enable"):
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(inner, "enable_input_require_grads"):
            inner.enable_input_require_grads()
    start = 0
    if t.resume:  # "auto": the newest intact checkpoint (a truncated one is skipped, with a warning)
        start, resumed = resume_from(
            t.resume, out_dir, inner, opt, sched, base_model_id=base_model_id, method=method
        )
        if resumed is not None:
            log.info("resumed from %s at step %d", resumed, start)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = out_dir / "metrics.jsonl"
    emit = _emitter(metrics_file if rank == 0 else None, callbacks)
    model.train()
    tokens_seen, t0, last = 0, time.perf_counter(), None
    step = done = start  # done: optimizer steps the weights have taken
    prev_fused = set_fused(t.fused)
    if (
        t.fused and groups_enabled() and not sharded and train_rows
    ):  # which projections share an input (q/k/v, gate/up)
        probe_groups(inner, collate([train_rows[0]], pad_id)["input_ids"])
    interrupts = StepGuard()
    try:
        for step in range(start, t.steps):
            torch.manual_seed(t.seed * 7919 + step)  # dropout masks depend on the step only: exact resume
            loss_sum, n_tok = 0.0, 0
            interrupts.enter()  # from here to `done = step + 1`, Ctrl-C waits for the step's end
            method.before_step(inner, step)
            for micro in range(t.grad_accum):
                batch = collate(
                    [train_rows[i] for i in batch_order(len(train_rows), step, micro, cfg, world, rank)],
                    pad_id,
                )
                # FSDP2: the model's own forward, so that the root module's hooks run (the chunked head loss
                # would call the backbone directly, around them)
                loss = causal_lm_loss(model, batch, fused=t.fused and not sharded)
                extra = method.extra_loss(inner)
                if extra is not None:
                    loss = loss + extra
                loss = loss / t.grad_accum
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss.item()} at step {step + 1}; lower train.lr (now {t.lr}) or check the data"
                    )
                loss.backward()
                loss_sum += loss.item()
                n_tok += int(batch["attention_mask"].sum())
            grad_norm = float(full_tensor(_grad_norm(params, t.max_grad_norm)))  # FSDP2: a replicated DTensor
            if not math.isfinite(grad_norm):  # a finite loss can have non-finite gradients (NaN weights)
                raise TrainingError(
                    f"gradient norm became {grad_norm} at step {step + 1} (loss {loss_sum:.4g}); the step was not "
                    f"applied; lower train.lr (now {t.lr}) or check the data and the adapter's weights"
                )
            opt.step()
            method.after_step(inner, step)  # gradients still present (AdaLoRA's importance scores)
            sched.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            interrupts.leave()  # a Ctrl-C held since the step began is raised here, with `done` up to date
            tokens_seen += n_tok * world
            last = {
                "step": step + 1,
                "loss": loss_sum,
                "lr": sched.get_last_lr()[0],
                "tokens_per_s": tokens_seen / (time.perf_counter() - t0),
                "elapsed_s": time.perf_counter() - t0,
            }
            if t.max_grad_norm > 0:
                last["grad_norm"] = grad_norm
            if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
                emit(last)
            if evaluate and t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.steps:
                measured = evaluate()
                if rank == 0:
                    emit({"step": step + 1, **{f"eval_{k}": v for k, v in measured.items()}})
                model.train()
            if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < t.steps:
                save_checkpoint(
                    out_dir,
                    step + 1,
                    inner,
                    opt,
                    sched,
                    cfg,
                    base_model_id=base_model_id,
                    rank=rank,
                    method=method,
                )
    except KeyboardInterrupt:
        if interrupts.forced and rank == 0:  # a second Ctrl-C stopped a step half-way: nothing to save
            newest = latest_checkpoint(out_dir)
            where = f"resume from {newest} with --train.resume auto" if newest else "no checkpoint yet"
            raise TrainingError(
                f"interrupted again during step {done + 1}: no checkpoint written (the step was half done); {where}"
            ) from None
        if sharded:  # gathering the shards needs every rank in step, and an interrupt stops them anywhere
            if rank == 0:
                newest = latest_checkpoint(out_dir)
                where = f"resume from {newest} with --train.resume auto" if newest else "no checkpoint yet"
                raise TrainingError(
                    f"interrupted after step {done} (FSDP writes no checkpoint on interrupt); {where}"
                ) from None
            raise
        if rank == 0 and done > start:
            path = save_checkpoint(
                out_dir, done, inner, opt, sched, cfg, base_model_id=base_model_id, method=method
            )
            log.warning("interrupted: saved a resumable checkpoint to %s", path)
            raise TrainingError(f"interrupted at step {done}; resume with --train.resume {path}") from None
        raise
    finally:
        interrupts.restore()
        set_fused(prev_fused)
    method.finish(inner)
    model.eval()
    return {
        "steps": t.steps,
        "resumed_from": start,
        "tokens": tokens_seen,
        "train_seconds": time.perf_counter() - t0,
        "last": last,
    }


class StepGuard:
    """Ctrl-C (SIGINT) during an optimizer step is held until the step is complete, then raised.

    Between `enter()` (a step begins) and `leave()` (weights, optimizer, scheduler, method hooks and the step
    counter all agree), a SIGINT only sets a flag; `leave()` raises it. So an interrupt never finds updated
    weights under the previous step number, which a checkpoint would repeat on resume. A second Ctrl-C inside a
    step stops at once (`forced`: the step is half done, no checkpoint can be trusted). Only the main thread
    handles signals; elsewhere, or when SIGINT is not Python's to handle, this does nothing."""

    def __init__(self) -> None:
        self.inside = self.held = self.forced = False
        self.previous = signal.getsignal(signal.SIGINT)
        self.active = threading.current_thread() is threading.main_thread() and callable(self.previous)
        if self.active:
            signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.inside and not self.held:
            self.held = True
            log.warning("Ctrl-C: stopping when this step is complete (Ctrl-C again to stop at once, unsaved)")
            return
        self.forced = self.inside
        self.previous(signum, frame)  # Python's default handler: raises KeyboardInterrupt

    def enter(self) -> None:
        self.inside = True

    def leave(self) -> None:
        self.inside = False
        if self.held:
            self.held = False
            self.previous(signal.SIGINT, None)

    def restore(self) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)


def _emitter(path: Path | None, callbacks: list[Callback]) -> Callback:
    def emit(record: dict[str, Any]) -> None:
        if path is not None:
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        for cb in callbacks:
            cb(record)

    return emit
