"""Several processes under torchrun: the process group (gloo on the CPU, nccl on GPUs, one GPU per process),
and the model the loop trains: wrapped in DDP, or sharded with FSDP2 block by block (`train.fsdp`)."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from lorakit.device import model_device
from lorakit.layers import LoraLayer

log = logging.getLogger(__name__)


def init_distributed() -> tuple[int, int]:
    """(world size, rank); starts the process group under torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():  # one GPU per process: cuda:LOCAL_RANK
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        _STARTED.append(True)
    return world, dist.get_rank()


_STARTED: list[bool] = []  # whether init_distributed started the process group (and so ends it)


def finish_distributed() -> None:
    """End the process group `init_distributed` started, once every rank is here: what a process does before it
    exits (`lorakit train` does), after its last run. Without it, a process can exit while gloo's threads still
    run, and die with "terminate called without an active exception"."""
    if not _STARTED:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _STARTED.clear()


class _GatherRows(torch.autograd.Function):
    """All processes' equally many rows, in rank order; the backward sums every process's gradient of the whole
    and hands each process its own rows' part (an all-reduce: every backend has it, gloo included)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        ctx.mine = slice(dist.get_rank() * rows.shape[0], (dist.get_rank() + 1) * rows.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.mine]


def gather_rows(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's rows of `rows` (n, d; n may differ between processes) in rank order, and the index where
    this process's own start. Differentiable: each process's rows receive the gradients that every process's loss
    sends them, so a loss over the whole is trained exactly as on one process."""
    import torch.distributed as dist

    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    most = max(sizes)
    padded = torch.cat([rows, rows.new_zeros(most - rows.shape[0], *rows.shape[1:])])
    every = _GatherRows.apply(padded)
    keep = torch.cat([torch.arange(r * most, r * most + n, device=rows.device) for r, n in enumerate(sizes)])
    return every[keep], sum(sizes[: dist.get_rank()])


def shard_model(model: nn.Module) -> int:
    """Apply FSDP2 `fully_shard` to each transformer block, then to the whole model (in place); returns the
    number of blocks. Blocks: the items of every outermost nn.ModuleList that holds LoRA layers (for Hugging
    Face decoders, `model.model.layers`)."""
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model)
    if not blocks:
        log.warning(
            "FSDP2: no list of transformer blocks with LoRA layers found; sharding the model as one unit"
        )
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return len(blocks)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The items of every outermost nn.ModuleList whose items contain LoRA layers, in model order."""
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and any(isinstance(x, LoraLayer) for item in m for x in item.modules())
    ]
    outer = [(n, m) for n, m in lists if not any(n.startswith(o + ".") for o, _ in lists if o != n)]
    return [item for _, m in outer for item in m]


def distribute(model: nn.Module, world: int, fsdp: bool, *, broadcast_buffers: bool, say) -> nn.Module:
    """The model the loop trains: sharded in place with FSDP2, wrapped in DDP with several processes, or itself.
    `broadcast_buffers` is off for a 4-bit base, whose codes are constant."""
    if fsdp:
        blocks = shard_model(model)
        say(f"FSDP2: {blocks} blocks and the rest of the model sharded across {world} processes")
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel

        device = model_device(model)
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=broadcast_buffers)
    return model
