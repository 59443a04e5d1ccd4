"""What optimizer step k reads, and at what learning rate: pure functions of the run config and k.

A step's examples depend on the seed and the step number alone (not on what ran before), so a resumed run reads
exactly the batches the uninterrupted one would have, and a data-driven init (EVA, CorDA, LoRA-GA) sees the
batches training will start with.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch

from lorakit.data.tokenize import IGNORE, Encoded
from lorakit.train.config import RunConfig


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
