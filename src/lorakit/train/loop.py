"""The training loop: one plain function, top to bottom.

AdamW, warmup then cosine/linear/constant, gradient accumulation and clipping, optional non-reentrant gradient
checkpointing, determinism from a seed, periodic eval and checkpoints with exact resume, a stop on a non-finite
loss, metrics.jsonl. Callbacks receive every metrics record, so any tracker can plug in. What each step reads
and its learning rate are `lorakit.train.schedule`; the metrics, `lorakit.train.metrics`; Ctrl-C and the run's
checkpoints, `lorakit.train.interrupt`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.data.tokenize import Encoded
from lorakit.device import autocast, model_device, to_device
from lorakit.errors import TrainingError
from lorakit.fused import groups_enabled, set_fused
from lorakit.memory import enable_checkpointing, trim_between_layers
from lorakit.siblings import probe_groups
from lorakit.train.best import Best
from lorakit.train.checkpoint import full_tensor, is_sharded
from lorakit.train.config import RunConfig, TrainSection
from lorakit.train.interrupt import RunCheckpoints
from lorakit.train.methods import Method, param_groups
from lorakit.train.metrics import Callback, Metrics
from lorakit.train.objectives import Objective
from lorakit.train.schedule import batch_order, collate, lr_factor

log = logging.getLogger(__name__)


def _grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The total L2 norm of the gradients, clipped to `max_norm` when it is > 0."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


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
    objective: Objective | None = None,
    best: Best | None = None,
) -> dict[str, Any]:
    """Train the model's trainable parameters on `train_rows`. Returns a summary dict.

    Under DDP pass the wrapped model; under FSDP2 the sharded one, and `evaluate` on every rank (its forward
    passes are collectives); rank 0 alone writes metrics and checkpoint files. `method` (default: plain LoRA)
    gets its hooks called around each step (see lorakit.train.methods). `objective` (default: supervised
    fine-tuning on `Encoded` rows) computes each micro-batch's loss: the preference objectives (DPO, SimPO,
    ORPO) take `Pair` rows (lorakit.train.objectives). `best` (train.keep_best, train.early_stop) takes each
    periodic evaluation, and stops the run early (lorakit.train.best).
    """
    t, method, objective = cfg.train, method or Method(cfg), objective or Objective()
    inner = getattr(model, "module", model)  # under DDP, the wrapped model
    params, opt, sched = _optimizer(inner, cfg)
    sharded = is_sharded(inner)  # FSDP2: saving is a collective, every rank takes part
    checkpoints = RunCheckpoints(out_dir, inner, opt, sched, cfg, method, base_model_id, rank, best)
    start = checkpoints.resume()
    done, stopped = start, False
    metrics = Metrics(out_dir, rank, callbacks, t)
    device, compute = model_device(inner), _base_dtype(inner)
    probe = objective.encoded(train_rows[:1])
    with _training(model, probe, pad_id, t, sharded), checkpoints.on_interrupt(start, sharded) as guard:
        if objective.precompute:  # DPO's reference, once for all pairs
            train_rows = _with_reference(inner, train_rows, objective, pad_id, compute, t, rank)
        for step in range(start, t.steps):
            torch.manual_seed(t.seed * 7919 + step)  # dropout masks depend on the step only: exact resume
            loss_sum, n_tok, stats = 0.0, 0, {}
            guard.enter()  # from here to `guard.leave`, Ctrl-C waits for the step's end
            method.before_step(inner, step)
            for micro in range(t.grad_accum):
                order = batch_order(len(train_rows), step, micro, cfg, world, rank)
                rows = [train_rows[i] for i in order]
                batch = to_device(
                    {**collate(objective.encoded(rows), pad_id), **objective.extras(rows)}, device
                )
                # FSDP2: the model's own forward, so that the root module's hooks run (not the chunked head loss)
                with autocast(device, compute):
                    loss, measured = objective.loss(model, batch, fused=t.fused and not sharded)
                for k, v in measured.items():  # the step's means over its micro-batches
                    stats[k] = stats.get(k, 0.0) + v / t.grad_accum
                extra = method.extra_loss(inner)
                loss = (loss if extra is None else loss + extra) / t.grad_accum
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss became {loss.item()} at step {step + 1}; {_ADVICE % t.lr}")
                loss.backward()
                loss_sum += loss.item()
                n_tok += int(batch["attention_mask"].sum())
            grad_norm = float(full_tensor(_grad_norm(params, t.max_grad_norm)))  # FSDP2: a replicated DTensor
            if not math.isfinite(grad_norm):  # a finite loss can have non-finite gradients (NaN weights)
                raise TrainingError(
                    f"gradient norm became {grad_norm} at step {step + 1} (loss {loss_sum:.4g}); the step was not "
                    f"applied; {_ADVICE % t.lr} and the adapter's weights"
                )
            opt.step()
            method.after_step(inner, step)  # gradients still present (AdaLoRA's importance scores)
            sched.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            guard.complete(done)  # weights, optimizer, scheduler and hooks agree: an interrupt now saves `done`
            metrics.step(done, loss_sum, sched.get_last_lr()[0], n_tok * world, grad_norm, stats)  # on record...
            guard.leave(done)  # ... a Ctrl-C held since the step began is raised here
            stopped = _periodic(done, t, model, evaluate, metrics, checkpoints, best, method, world)
            if stopped:
                break
    method.finish(inner)
    model.eval()
    early = {"stopped_early": True} if stopped else {}
    return {"steps": done, "resumed_from": start, **early, **metrics.summary()}


_ADVICE = "lower train.lr (now %s) or check the data"


def _with_reference(
    model: nn.Module,
    rows: list,
    objective: Any,
    pad_id: int,
    compute: torch.dtype,
    t: TrainSection,
    rank: int,
) -> list:
    """`rows` (pairs) with their reference log-probabilities (`Pair.reference`), computed in micro-batches of
    train.batch_size under the steps' autocast, so that they are the values a step's own reference pass gives."""
    import dataclasses

    from tqdm import tqdm

    device, out = model_device(model), []
    with tqdm(total=len(rows), desc="reference", unit="pair", disable=rank != 0, leave=False) as bar:
        for i in range(0, len(rows), t.batch_size):
            part = rows[i : i + t.batch_size]
            batch = to_device(collate(objective.encoded(part), pad_id), device)
            with autocast(device, compute):
                ref = objective.reference_logprobs(model, batch, fused=t.fused).tolist()
            n = len(part)
            out += [dataclasses.replace(p, reference=(ref[j], ref[n + j])) for j, p in enumerate(part)]
            bar.update(n)
    return out


def _base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the frozen base (its first frozen floating-point parameter): what autocast computes in."""
    frozen = (p for p in model.parameters() if not p.requires_grad and p.is_floating_point())
    return next((p.dtype for p in frozen), torch.float32)


def _optimizer(model: nn.Module, cfg: RunConfig) -> tuple[list[torch.Tensor], torch.optim.Optimizer, Any]:
    """(the trainable parameters, AdamW over them, its warmup-then-schedule learning rate)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters (inject an adapter first)")
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))


@contextmanager
def _training(
    model: nn.Module, train_rows: list[Encoded], pad_id: int, t: TrainSection, sharded: bool
) -> Iterator[None]:
    """The model in training mode, with gradient checkpointing if asked, and the fused path as train.fused says
    until the block ends; fused, a probe first of which projections share an input (q/k/v, gate/up). A quantized
    base has the heap trimmed after each decoder layer (lorakit.memory)."""
    inner = getattr(model, "module", model)
    if t.grad_checkpointing:
        enable_checkpointing(inner)
    model.train()
    prev_fused = set_fused(t.fused)
    trimming = trim_between_layers(inner)  # a quantized base: free heap back to the OS layer by layer
    try:
        if t.fused and groups_enabled() and not sharded and train_rows:
            probe_groups(inner, collate([train_rows[0]], pad_id)["input_ids"].to(model_device(inner)))
        yield
    finally:
        trimming.remove()
        set_fused(prev_fused)


def _periodic(
    done: int,
    t: TrainSection,
    model: nn.Module,
    evaluate: Callable[[], dict[str, float]] | None,
    metrics: Metrics,
    checkpoints: RunCheckpoints,
    best: Best | None,
    method: Method,
    world: int,
) -> bool:
    """After step `done`: the evaluation every train.eval_every steps (taken by `best`) and the checkpoint
    every train.save_every steps (none after the last step: the run's end evaluates, and saves the adapter).
    True when the run stops here (train.early_stop; every process gets rank 0's decision)."""
    stop = False
    if _due(t.eval_every, done, t.steps):
        if evaluate:
            measured = evaluate()
            metrics.eval(done, measured)
            model.train()
            if best is not None and best.active:
                stop = best.observe(done, measured, getattr(model, "module", model), method)
        if best is not None and best.patience and world > 1:
            stop = _from_rank_0(stop)
    if _due(t.save_every, done, t.steps):
        checkpoints.save(done)
    return stop


def _from_rank_0(flag: bool) -> bool:
    """Rank 0's `flag`, on every process (only rank 0 evaluates under DDP)."""
    import torch.distributed as dist

    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def _due(every: int, done: int, steps: int) -> bool:
    return bool(every) and done % every == 0 and done < steps


