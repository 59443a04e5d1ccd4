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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.data.tokenize import IGNORE, Encoded
from lorakit.device import autocast, model_device, to_device
from lorakit.errors import LorakitError
from lorakit.fused import groups_enabled, set_fused
from lorakit.memory import enable_checkpointing, trim_between_layers
from lorakit.siblings import probe_groups
from lorakit.train.checkpoint import (
    full_tensor,
    is_sharded,
    latest_checkpoint,
    resume_from,
    save_checkpoint,
)
from lorakit.train.config import RunConfig, TrainSection
from lorakit.train.methods import Method, param_groups
from lorakit.train.objectives import Objective

log = logging.getLogger(__name__)
Callback = Callable[[dict[str, Any]], None]


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (non-finite loss, bad resume)."""


def _grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The total L2 norm of the gradients, clipped to `max_norm` when it is > 0."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def init_batches(train_rows: list[Encoded], cfg: RunConfig, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """The first micro-batches in the order training reads them (those of process 0, so that every process
    computes the init from the same data), for a data-driven init: lora.eva_batches of them for EVA,
    lora.corda_batches for CorDA, lora.lora_ga_batches for LoRA-GA."""
    lora = cfg.lora
    count = {"corda": lora.corda_batches, "lora_ga": lora.lora_ga_batches}.get(lora.init, lora.eva_batches)
    for k in range(count):
        step, micro = divmod(k, cfg.train.grad_accum)
        yield collate([train_rows[i] for i in batch_order(len(train_rows), step, micro, cfg)], pad_id)


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
    objective: Objective | None = None,
) -> dict[str, Any]:
    """Train the model's trainable parameters on `train_rows`. Returns a summary dict.

    Under DDP pass the wrapped model; under FSDP2 the sharded one, and `evaluate` on every rank (its forward
    passes are collectives); rank 0 alone writes metrics and checkpoint files. `method` (default: plain LoRA)
    gets its hooks called around each step (see lorakit.train.methods). `objective` (default: supervised
    fine-tuning on `Encoded` rows) computes each micro-batch's loss: the preference objectives (DPO, SimPO,
    ORPO) take `Pair` rows (lorakit.train.objectives).
    """
    t, method, objective = cfg.train, method or Method(cfg), objective or Objective()
    inner = getattr(model, "module", model)  # under DDP, the wrapped model
    params, opt, sched = _optimizer(inner, cfg)
    sharded = is_sharded(inner)  # FSDP2: saving is a collective, every rank takes part
    checkpoints = _Checkpoints(out_dir, inner, opt, sched, cfg, method, base_model_id, rank)
    start = checkpoints.resume()
    metrics = _Metrics(out_dir, rank, callbacks, t)
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
            _periodic(done, t, model, evaluate, metrics, checkpoints)
    method.finish(inner)
    model.eval()
    return {"steps": t.steps, "resumed_from": start, **metrics.summary()}


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
    metrics: _Metrics,
    checkpoints: _Checkpoints,
) -> None:
    """After step `done`: the evaluation every train.eval_every steps and the checkpoint every train.save_every
    steps (none after the last step: the run's end evaluates, and saves the adapter)."""
    if evaluate and _due(t.eval_every, done, t.steps):
        metrics.eval(done, evaluate())
        model.train()
    if _due(t.save_every, done, t.steps):
        checkpoints.save(done)


def _due(every: int, done: int, steps: int) -> bool:
    return bool(every) and done % every == 0 and done < steps


class _Metrics:
    """metrics.jsonl (rank 0) and the callbacks: a record every train.log_every steps and after the last, and
    one per periodic evaluation; the token count and clock of the summary."""

    def __init__(self, out_dir: Path, rank: int, callbacks: list[Callback] | None, t: TrainSection) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.t, self.tokens, self.last = rank, t, 0, None
        self.emit = _emitter(out_dir / "metrics.jsonl" if rank == 0 else None, list(callbacks or []))
        self.t0 = time.perf_counter()

    def step(
        self, done: int, loss: float, lr: float, tokens: int, grad_norm: float, stats: dict[str, float]
    ) -> None:
        self.tokens += tokens
        elapsed = time.perf_counter() - self.t0
        self.last = {
            "step": done,
            "loss": loss,
            "lr": lr,
            "tokens_per_s": self.tokens / elapsed,
            "elapsed_s": elapsed,
        }
        if self.t.max_grad_norm > 0:
            self.last["grad_norm"] = grad_norm
        self.last.update(stats)
        if done % self.t.log_every == 0 or done == self.t.steps:
            self.emit(self.last)

    def eval(self, done: int, measured: dict[str, float]) -> None:
        if self.rank == 0:
            self.emit({"step": done, **{f"eval_{k}": v for k, v in measured.items()}})

    def summary(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "train_seconds": time.perf_counter() - self.t0, "last": self.last}


class _Checkpoints:
    """A run's resumable checkpoints: resuming at the start, saving on the cadence, and what a Ctrl-C leaves."""

    def __init__(self, out_dir, model, opt, sched, cfg, method, base_model_id, rank) -> None:
        self.out_dir, self.model, self.opt, self.sched, self.cfg = out_dir, model, opt, sched, cfg
        self.method, self.base_model_id, self.rank = method, base_model_id, rank

    def resume(self) -> int:
        """The step to start from: 0, or that of the checkpoint train.resume names ("auto": the newest intact
        one; a truncated one is skipped, with a warning)."""
        if not self.cfg.train.resume:
            return 0
        start, resumed = resume_from(
            self.cfg.train.resume,
            self.out_dir,
            self.model,
            self.opt,
            self.sched,
            base_model_id=self.base_model_id,
            method=self.method,
        )
        if resumed is not None:
            log.info("resumed from %s at step %d", resumed, start)
        return start

    def save(self, step: int) -> Path | None:
        """Write the checkpoint of step `step` (under FSDP2 every rank calls this; rank 0 writes)."""
        return save_checkpoint(
            self.out_dir,
            step,
            self.model,
            self.opt,
            self.sched,
            self.cfg,
            base_model_id=self.base_model_id,
            rank=self.rank,
            method=self.method,
        )

    @contextmanager
    def on_interrupt(self, start: int, sharded: bool) -> Iterator[StepGuard]:
        """Inside the block, Ctrl-C waits for the end of a step (`StepGuard`). Then rank 0 saves the checkpoint
        of the last complete step and raises a one-line TrainingError saying how to resume; under FSDP2 nothing
        is saved (gathering the shards needs every rank in step, and an interrupt stops them anywhere)."""
        guard = StepGuard(start)
        try:
            yield guard
        except KeyboardInterrupt:
            done = guard.done
            if guard.forced and self.rank == 0:  # a second Ctrl-C stopped a step half-way: nothing to save
                raise TrainingError(
                    f"interrupted again during step {done + 1}: no checkpoint written (the step was half done); "
                    f"{self._newest()}"
                ) from None
            if sharded and self.rank == 0:
                raise TrainingError(
                    f"interrupted after step {done} (FSDP writes no checkpoint on interrupt); {self._newest()}"
                ) from None
            if not sharded and self.rank == 0 and done > start:
                path = self.save(done)
                log.warning("interrupted: saved a resumable checkpoint to %s", path)
                raise TrainingError(
                    f"interrupted at step {done}; resume with --train.resume {path}"
                ) from None
            raise
        finally:
            guard.restore()

    def _newest(self) -> str:
        newest = latest_checkpoint(self.out_dir)
        return f"resume from {newest} with --train.resume auto" if newest else "no checkpoint yet"


class StepGuard:
    """Ctrl-C (SIGINT) during an optimizer step is held until the step is complete, then raised.

    Between `enter()` (a step begins) and `leave()` (weights, optimizer, scheduler, method hooks and the step
    counter all agree), a SIGINT only sets a flag; `leave()` raises it. So an interrupt never finds updated
    weights under the previous step number, which a checkpoint would repeat on resume. A second Ctrl-C inside a
    step stops at once (`forced`: the step is half done, no checkpoint can be trusted). Only the main thread
    handles signals; elsewhere, or when SIGINT is not Python's to handle, this does nothing."""

    def __init__(self, done: int = 0) -> None:
        self.done = done
        """Optimizer steps complete (as of the last `leave`)."""
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

    def complete(self, done: int) -> None:
        """Step `done` is complete; a Ctrl-C is still held (until `leave`), but anything raised from here on (a
        callback's KeyboardInterrupt) finds `done` up to date."""
        self.done = done

    def leave(self, done: int) -> None:
        """Step `done` is complete (weights, optimizer, scheduler, method hooks); a held Ctrl-C is raised here."""
        self.inside, self.done = False, done
        if self.held:
            self.held = False
            self.previous(signal.SIGINT, None)

    def restore(self) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (none if it does not exist yet). A line that does not parse is left out: the
    last one while its run is writing it, or one cut short by a killed run."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _emitter(path: Path | None, callbacks: list[Callback]) -> Callback:
    def emit(record: dict[str, Any]) -> None:
        if path is not None:
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        for cb in callbacks:
            cb(record)

    return emit
