"""A run's metrics: metrics.jsonl (written by rank 0, one JSON record per line) and the callbacks that receive
every record, so any tracker can plug in."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.train.config import TrainSection

Callback = Callable[[dict[str, Any]], None]


class Metrics:
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
