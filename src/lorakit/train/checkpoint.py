"""Resumable checkpoints: trainable tensors (safetensors), optimizer and scheduler state, step, base model id.

Each checkpoint is a folder `checkpoints/step-000050/`, written atomically; the two newest are kept. Optimizer
state is saved with torch.save and read back with `weights_only=True` (tensors and numbers only, no code).

Under FSDP2 the parameters and optimizer state are sharded DTensors. Saving gathers full tensors on every rank
(a collective: all ranks must call `save_checkpoint`), then rank 0 writes the same files a single process
writes; loading cuts each rank's shard out of the full tensors. So a checkpoint resumes under 1 process, DDP or
FSDP with any number of processes alike.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lorakit.atomic import atomic_dir, remove_stale_temporaries
from lorakit.errors import LorakitError
from lorakit.readers import load_weights_only, read_json, read_safetensors

log = logging.getLogger(__name__)

KEEP = 2
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


class CheckpointError(LorakitError, RuntimeError):
    """A checkpoint cannot be used to resume this run, or cannot be written."""


def _dtensor() -> type:
    """The DTensor class, or a stand-in nothing is an instance of where torch has no distributed support."""
    if not torch.distributed.is_available():
        return type("NoDTensor", (), {})
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a DTensor (sharded by FSDP2)."""
    dtensor = _dtensor()
    return any(isinstance(p, dtensor) for p in model.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or the whole tensor of a DTensor (a collective: every rank must call it in the same order)."""
    return t.full_tensor() if isinstance(t, _dtensor()) else t


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached full copies of the trainable parameters by name (a collective under FSDP2)."""
    return {
        n: full_tensor(p.detach()).clone().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, the trainable DTensor parameters of an FSDP2 model are plain full tensors.

    A collective: every rank enters it. Meant for reading the model (saving an adapter), not for running it;
    the sharded parameters are put back on exit. Without DTensors this does nothing.
    """
    dtensor = _dtensor()
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for name, p in list(model.named_parameters()):
            if p.requires_grad and isinstance(p, dtensor):
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner)
                full = nn.Parameter(p.detach().full_tensor(), requires_grad=False)
                module._parameters[leaf] = full
                swapped.append((module, leaf, p))
        yield model
    finally:
        for module, leaf, p in reversed(swapped):
            module._parameters[leaf] = p


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    opt,
    sched,
    cfg,
    *,
    base_model_id: str | None,
    rank: int = 0,
    method=None,
    extra: Callable[[Path], dict[str, Any]] | None = None,
) -> Path | None:
    """Write `checkpoints/step-NNNNNN` (rank 0) and return its path; other ranks return None.

    Under FSDP2 every rank must call this (the tensors are gathered first). A full disk is a CheckpointError
    that names the folder; the previous checkpoints are left as they were. `extra(folder)` writes more files
    into the folder being written and returns more keys for its state.json (the run's best state,
    `lorakit.train.best`).
    """
    sharded = is_sharded(model)
    if rank != 0 and not sharded:
        return None
    root = Path(out_dir) / "checkpoints"
    path = root / f"step-{step:06d}"
    tensors = trainable_state(model)
    optimizer = _full_optimizer_state(opt) if sharded else opt.state_dict()
    if rank != 0:
        return None
    own = method.state_dict() if method is not None else {}  # e.g. AdaLoRA's importance EMAs
    extra_tensors = {k: v.detach().contiguous() for k, v in own.items() if isinstance(v, torch.Tensor)}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
        buf = io.BytesIO()  # serialised in memory, then written by Python: a full disk is a plain OSError
        torch.save({"optimizer": optimizer, "scheduler": sched.state_dict()}, buf)
        with (tmp / "optimizer.pt").open("wb") as f:
            f.write(buf.getbuffer())
        state: dict[str, Any] = {"step": step, "base_model": base_model_id, "config": cfg.to_dict()}
        if own:
            state["method"] = {k: v for k, v in own.items() if k not in extra_tensors}
        if extra_tensors:
            save_file(extra_tensors, str(tmp / "method.safetensors"), metadata={"format": "pt"})
        if extra is not None:
            state.update(extra(tmp))
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))

    remove_stale_temporaries(root, "step-*")  # a killed save of an earlier step left its temporary
    try:
        atomic_dir(path, write)
    except Exception as e:
        if not _disk_full(e):
            raise
        raise CheckpointError(
            f"{path}: cannot write the checkpoint: no space left on device (or quota exceeded); "
            "earlier checkpoints are intact, free some space and resume with --train.resume auto"
        ) from e
    for old in sorted(root.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _disk_full(e: BaseException) -> bool:
    """Whether `e` says the disk is full: an OSError ENOSPC/EDQUOT, or safetensors' wrapped form of one."""
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return True
    return any(s in str(e) for s in _DISK_FULL_TEXT)


def _full_optimizer_state(opt) -> dict[str, Any]:
    """`opt.state_dict()` with every DTensor gathered into a full tensor (collective, same order on all ranks)."""
    sd = opt.state_dict()
    state = {idx: {k: full_tensor(v) for k, v in sorted(s.items())} for idx, s in sorted(sd["state"].items())}
    return {**sd, "state": state}


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted((Path(out_dir) / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def resume_from(
    resume: str, out_dir: Path, model: nn.Module, opt, sched, *, base_model_id: str | None, method=None
) -> tuple[int, Path | None]:
    """Restore the checkpoint `resume` names (a folder, or "auto": the newest intact one in out_dir/checkpoints)
    and return (step to continue from, its folder); (0, None) for "auto" with no checkpoint yet.

    "auto" skips a checkpoint whose files are truncated or corrupt (a run killed mid-write by a failing disk),
    with a warning naming the bad file, and refuses in one line if none is intact. A checkpoint that is intact but
    belongs to another run (base model, parameters) is an error either way, not a reason to fall back."""
    if resume != "auto":
        files = read_checkpoint(Path(resume))
        return restore_checkpoint(files, model, opt, sched, base_model_id=base_model_id, method=method), Path(
            resume
        )
    found = sorted((Path(out_dir) / "checkpoints").glob("step-*"), reverse=True)
    problems: list[str] = []
    for path in found:
        try:
            files = read_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            log.warning("%s; resuming from %s instead", "; ".join(problems), path)
        return restore_checkpoint(files, model, opt, sched, base_model_id=base_model_id, method=method), path
    if found:
        raise CheckpointError(
            f"{Path(out_dir) / 'checkpoints'}: no intact checkpoint to resume from ({'; '.join(problems)})"
        )
    return 0, None


def load_checkpoint(
    path: Path, model: nn.Module, opt, sched, *, base_model_id: str | None, method=None
) -> int:
    """Restore trainable tensors, optimizer and scheduler from `path`; return the step to continue from.

    Every file is read and checked before anything changes. Every rank reads the files; under FSDP2 each keeps
    its own shard (no communication)."""
    files = read_checkpoint(Path(path))
    return restore_checkpoint(files, model, opt, sched, base_model_id=base_model_id, method=method)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The parsed files of checkpoint folder `path`; CheckpointError naming the file that is missing or corrupt."""
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path}: not a lorakit checkpoint (no state.json)")
    state = read_json(path / "state.json", CheckpointError)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / 'state.json'}: expected an object with an integer 'step'")
    blob = load_weights_only(path / "optimizer.pt", CheckpointError)
    if not isinstance(blob, dict) or not {"optimizer", "scheduler"} <= set(blob):
        raise CheckpointError(f"{path / 'optimizer.pt'}: expected the optimizer and scheduler state")
    extra = path / "method.safetensors"
    return {
        "path": path,
        "state": state,
        "tensors": read_safetensors(path / "trainable.safetensors", CheckpointError),
        "blob": blob,
        "method_tensors": read_safetensors(extra, CheckpointError) if extra.exists() else None,
    }


def restore_checkpoint(
    files: dict[str, Any], model: nn.Module, opt, sched, *, base_model_id: str | None, method=None
) -> int:
    """Put what `read_checkpoint` read into the model, optimizer, scheduler and method; return its step."""
    path, state, tensors = files["path"], files["state"], files["tensors"]
    if base_model_id is not None and state.get("base_model") not in (None, base_model_id):
        raise CheckpointError(
            f"{path}: made with base model {state['base_model']!r}, but this run uses {base_model_id!r}"
        )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing = sorted(set(params) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(params))[:3]
        raise CheckpointError(
            f"{path}: trainable parameters differ from this run's (missing {missing}, extra {extra})"
        )
    for n, p in params.items():
        if tensors[n].shape != p.shape:
            raise CheckpointError(
                f"{path}: {n} has shape {tuple(tensors[n].shape)}, this run has {tuple(p.shape)}"
            )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(_like(tensors[n].to(p.dtype), p))
    opt.load_state_dict(_shard_optimizer_state(files["blob"]["optimizer"], opt))
    sched.load_state_dict(files["blob"]["scheduler"])
    if method is not None and ("method" in state or files["method_tensors"] is not None):
        extra = dict(state.get("method", {}))
        extra.update(files["method_tensors"] or {})
        method.load_state_dict(extra)
    return int(state["step"])


def _like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`full` as `p` holds it: for a DTensor, this rank's shard of it (cut locally, no communication)."""
    if isinstance(p, _dtensor()):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    return full


def _shard_optimizer_state(sd: dict[str, Any], opt) -> dict[str, Any]:
    """A full optimizer state dict, with per-parameter tensors turned into shards where the parameter is one."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state = {}
    for idx, s in sd["state"].items():
        p = params[int(idx)] if int(idx) < len(params) else None
        state[idx] = {
            k: _like(v, p) if p is not None and isinstance(v, torch.Tensor) and v.shape == p.shape else v
            for k, v in s.items()
        }
    return {**sd, "state": state}
