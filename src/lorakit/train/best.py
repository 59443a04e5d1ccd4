"""The best evaluated state of a run (train.keep_best) and early stopping (train.early_stop).

Each periodic evaluation (train.eval_every) measures the train.best_metric: the eval loss by default (the
objective's own, as the run reports it; lower is better), or the exact-match accuracy, or a preference
objective's reward accuracy or margin (higher is better). The best value so far marks the best state; with
keep_best its trainable tensors (and the method's state, as a checkpoint holds them) are kept in memory, and at
the end of the run, when the last state evaluates worse, they are put back, so that the adapter saved and the
"after" evaluation are the best's. With early_stop N the run stops once N evaluations in a row have not bettered
the best. Checkpoints carry the tracker (best.safetensors, and its numbers
in state.json), so a resumed run keeps the best of the steps before it.

Rank 0 evaluates (under DDP the others do not); its decision to stop is broadcast so that every process leaves
the loop at the same step. FSDP2 is refused by the config (the snapshot would be shards).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.train.checkpoint import trainable_state

if TYPE_CHECKING:
    from lorakit.train.config import TrainSection

STATE_KEY = "best"
"""The key of the tracker's numbers in a checkpoint's state.json."""
FILE = "best.safetensors"
"""The tracker's tensors in a checkpoint folder: the best state's trainable tensors."""


BEST_METRICS = {
    "loss": False,
    "accuracy": True,
    "balanced_accuracy": True,
    "f1": True,
    "pearson": True,
    "reward_accuracy": True,
    "reward_margin": True,
}
"""The measures train.best_metric may name, and whether higher is better."""


class Best:
    """The best value of the metric seen, its step, the evaluations since it, and (keep_best) the state that
    gave it."""

    def __init__(self, t: TrainSection) -> None:
        self.keep, self.patience = t.keep_best, t.early_stop
        self.metric, self.higher = t.best_metric, BEST_METRICS.get(t.best_metric, False)
        self.value: float | None = None
        self.step: int | None = None
        self.since = 0
        self.tensors: dict[str, torch.Tensor] | None = None
        self.method_state: dict[str, Any] | None = None
        self.last: tuple[int, dict[str, float]] | None = None
        """The latest evaluation taken: (its step, what it measured)."""

    @property
    def active(self) -> bool:
        return self.keep or self.patience > 0

    def observe(self, step: int, measured: dict[str, float], model: nn.Module, method) -> bool:
        """Take the evaluation of step `step`; True when the run should stop (early_stop evaluations in a row
        without a better value). An evaluation without the metric (nothing left to evaluate) counts as no
        better."""
        self.last = (step, measured)
        if self._better(measured, strict=True):
            self.value, self.step, self.since = float(measured[self.metric]), step, 0
            if self.keep:
                self.tensors = trainable_state(model)
                self.method_state = _copied(method.state_dict()) if method is not None else None
        else:
            self.since += 1
        return self.patience > 0 and self.since >= self.patience

    def better_than(self, measured: dict[str, float]) -> bool:
        """Whether the kept state evaluated better than `measured` (the last state's evaluation)."""
        if self.tensors is None or self.value is None:
            return False
        return not self._better(measured, strict=False)

    def take_last(self, step: int, measured: dict[str, float]) -> None:
        """The last state's evaluation (the run's end, `step`): the best when it is as good as the kept one."""
        if self._better(measured, strict=False):
            self.value, self.step, self.since = float(measured[self.metric]), step, 0

    def _better(self, measured: dict[str, float], *, strict: bool) -> bool:
        """Whether `measured` has a finite value of the metric better than the best (`strict`) or as good."""
        value = measured.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        if self.value is None:
            return True
        if value == self.value:
            return not strict
        return value > self.value if self.higher else value < self.value

    def restore(self, model: nn.Module, method) -> None:
        """Put the kept state back into `model`'s trainable tensors (and the method's state)."""
        assert self.tensors is not None
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.tensors[n])
        if method is not None and self.method_state is not None:
            method.load_state_dict(_copied(self.method_state))

    def record(self) -> dict[str, Any]:
        """The numbers a checkpoint's state.json and the run's summary carry."""
        return {
            "metric": self.metric,
            "value": self.value,
            "step": self.step,
            "since": self.since,
            "kept": self.tensors is not None,
        }

    def checkpoint_files(self, folder: Path) -> dict[str, Any]:
        """Write the kept tensors into a checkpoint folder being written (`save_checkpoint`'s `extra`), and
        return what its state.json adds: the numbers, and the method state's plain values."""
        from safetensors.torch import save_file

        state = self.method_state or {}
        if self.tensors is not None:
            tensors = {n: t.contiguous() for n, t in self.tensors.items()}
            extra = {f"method.{k}": v.contiguous() for k, v in state.items() if _is_tensor(v)}
            save_file({**tensors, **extra}, str(folder / FILE), metadata={"format": "pt"})
        plain = {k: v for k, v in state.items() if not _is_tensor(v)}
        return {STATE_KEY: {**self.record(), "method": plain}}

    def load(self, folder: Path, state: dict[str, Any] | None, model: nn.Module) -> None:
        """Take the tracker back from a checkpoint (its state.json's numbers, and its best.safetensors)."""
        from lorakit.readers import read_safetensors
        from lorakit.train.checkpoint import CheckpointError

        if not isinstance(state, dict):
            return  # a checkpoint of a run without the tracker: start afresh from here
        if state.get("metric") != self.metric:  # a run resumed with another metric starts its count afresh
            return
        self.value, self.step, self.since = (
            state.get("value"),
            state.get("step"),
            int(state.get("since") or 0),
        )
        if not (state.get("kept") and self.keep):
            return
        tensors = read_safetensors(folder / FILE, CheckpointError)
        names = {n: p for n, p in model.named_parameters() if p.requires_grad}
        own = {n: t for n, t in tensors.items() if not n.startswith("method.")}
        if set(own) != set(names) or any(own[n].shape != p.shape for n, p in names.items()):
            raise CheckpointError(
                f"{folder / FILE}: the best state's tensors differ from this run's parameters"
            )
        self.tensors = {n: own[n].to(device=p.device, dtype=p.dtype) for n, p in names.items()}
        method = {k[len("method.") :]: t for k, t in tensors.items() if k.startswith("method.")}
        self.method_state = {**(state.get("method") or {}), **method}


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


def _copied(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a method's state that later steps do not change (its tensors cloned)."""
    return {k: v.detach().clone() if _is_tensor(v) else copy.deepcopy(v) for k, v in state.items()}
