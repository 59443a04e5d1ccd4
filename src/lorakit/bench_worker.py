"""The worker side of `lorakit bench`: one variant, one process (`python -m lorakit.bench --worker VARIANT`).

`VARIANT_BUILDERS` maps each variant's name to the function that loads the model and sets the variant up on
it; adding a variant is one entry there (`lorakit.bench` documents the variants and runs the workers).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from lorakit.device import upcast_trainable
from lorakit.memory import enable_checkpointing

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------


def rss_now_gb() -> float:
    """Current resident set size in GB (Linux ``/proc``; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return peak_rss_gb()


def peak_rss_gb() -> float:
    """Peak resident set size of this process in GB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (``VmHWM``) to the current RSS; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_gb() -> float | None:
    """``VmHWM`` (peak RSS since start or since the last reset) in GB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------------------------------
# Variants: load the model, set the variant up on it
# --------------------------------------------------------------------------------------------------------------


class Setup(NamedTuple):
    model: Any
    loss: Callable[[Any], Any]
    """The training loss of a batch of ids (labels = the ids)."""
    probe: bool = False
    """Probe the sibling groups before the first step, as `lorakit train` does (lorakit's adapters)."""


def _placement(args: argparse.Namespace):
    """(device, base dtype) of this worker: `--device` and `--dtype`, resolved as `lorakit train` does."""
    from lorakit.device import placement

    return placement(getattr(args, "device", "cpu"), getattr(args, "dtype", "auto"))


def _load_fp32(args: argparse.Namespace):
    """The full-precision (or 16-bit, with --dtype) base on --device."""
    import lorakit

    device, dtype = _placement(args)
    return lorakit.load_model(args.model, dtype=dtype, device=device)[0]


def _load_nf4(args: argparse.Namespace):
    """Our NF4 base, loaded straight into 4 bits (QLoRA)."""
    import lorakit

    device, dtype = _placement(args)
    return lorakit.load_quantized(args.model, dtype=dtype, device=device)[0]


def _load_bnb(args: argparse.Namespace):
    """A 4-bit base as transformers + bitsandbytes load it for PEFT's QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorakit.models import resolve_model_dir

    device, dtype = _placement(args)
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    non_linear = (
        {} if dtype == torch.float32 else {"dtype": dtype}
    )  # norms and embeddings in the base dtype too
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_dir(args.model),
        quantization_config=bnb_config,
        device_map={"": str(device)},
        **non_linear,
    )


def _lorakit(load=_load_fp32, *, fused: bool = True, groups: bool = False):
    """``lorakit.inject`` on TARGETS; the fused kernels and chunked loss unless ``fused`` is off."""

    def build(args: argparse.Namespace) -> Setup:
        import lorakit
        from lorakit.fused import set_fused, set_groups
        from lorakit.head import causal_lm_loss
        from lorakit.memory import trim_between_layers

        model = load(args)
        set_fused(fused)
        set_groups(groups)
        config = lorakit.LoraConfig(r=args.r, alpha=args.r, dropout=args.dropout, targets=TARGETS)
        lorakit.inject(model, config)
        upcast_trainable(model)  # fp32 adapters on a 16-bit base, as lorakit train (and PEFT) keep them
        trim_between_layers(model)  # as lorakit train does: on for a quantized base (lorakit.memory)
        return Setup(model, lambda ids: causal_lm_loss(model, _batch(ids), fused=fused), probe=True)

    return build


def _library(load=_load_fp32, *, blocks: bool = True):
    """``lorakit.inject`` as a library user calls it, then the model's own ``forward(input_ids, labels=...)``:
    the lean loss and block rewrites that `inject` installs (lorakit.lean, lorakit.blocks) and the fused LoRA
    layers, in a plain loop; ``blocks=False``: without the block rewrites."""

    def build(args: argparse.Namespace) -> Setup:
        import lorakit

        model = load(args)
        config = lorakit.LoraConfig(r=args.r, alpha=args.r, dropout=args.dropout, targets=TARGETS)
        lorakit.inject(model, config)
        lorakit.set_lean_blocks(model, blocks)
        upcast_trainable(model)
        return Setup(model, lambda ids: model(**_batch(ids)).loss)

    return build


def _peft(load=_load_fp32):
    """``peft.get_peft_model`` with the same config; the model's own loss."""

    def build(args: argparse.Namespace) -> Setup:
        import peft

        from lorakit.head import causal_lm_loss

        model = load(args)
        config = peft.LoraConfig(
            r=args.r,
            lora_alpha=args.r,
            lora_dropout=args.dropout,
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, config)
        return Setup(model, lambda ids: causal_lm_loss(model, _batch(ids), fused=True))

    return build


def _bound(*, chunked: bool):
    """Every weight frozen, detached input embeddings that require grad: the cost of the frozen base alone;
    ``chunked``: with lorakit's chunked LM-head loss instead of the model's own."""

    def build(args: argparse.Namespace) -> Setup:
        import torch

        from lorakit.head import lm_head_loss

        model = _load_fp32(args)
        model.requires_grad_(False)
        embed = model.get_input_embeddings()

        def loss(ids):
            with torch.no_grad():
                inputs_embeds = embed(ids)
            inputs_embeds.requires_grad_(True)
            if not chunked:
                return model(inputs_embeds=inputs_embeds, labels=ids).loss
            hidden = model.base_model(inputs_embeds=inputs_embeds).last_hidden_state
            return lm_head_loss(hidden, model.get_output_embeddings().weight, ids)

        return Setup(model, loss)

    return build


def _batch(ids) -> dict[str, Any]:
    return {"input_ids": ids, "labels": ids}


VARIANT_BUILDERS: dict[str, Callable[[argparse.Namespace], Setup]] = {
    "lorakit": _lorakit(),
    "lorakit-grouped": _lorakit(groups=True),
    "lorakit-plain": _lorakit(fused=False),
    "lorakit-lib": _library(),
    "lorakit-lib-noblocks": _library(blocks=False),
    "peft": _peft(),
    "bound": _bound(chunked=False),
    "bound-ours": _bound(chunked=True),
    "lorakit-nf4": _lorakit(_load_nf4),
    "peft-bnb": _peft(_load_bnb),
}

LABELS = {  # how the benchmarks' tables name the step variants
    "lorakit": "`lorakit train`'s step",
    "lorakit-lib": "`inject` + the model's own loss",
    "lorakit-lib-noblocks": "`inject`, no block rewrites",
    "peft": "PEFT",
    "bound": "frozen-base bound",
    "bound-ours": "frozen base, chunked loss",
}


# --------------------------------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------------------------------


def bench_batch(args: argparse.Namespace, model, device):
    """The benchmark's batch: ``args.batch`` × ``args.seq`` random token ids (a fixed seed), on `device`."""
    import torch

    shape, gen = (args.batch, args.seq), torch.Generator().manual_seed(1234)
    return torch.randint(0, model.config.vocab_size, shape, generator=gen).to(device)


def make_step(model, loss_of, probe: bool, ids, device, dtype) -> tuple[Callable[[], float], list]:
    """The timed training step of one variant: (step, its trainable parameters). A step is the variant's loss on
    `ids` under autocast to `dtype`, its backward, and an AdamW step (none for the bounds, which train nothing);
    it returns the loss. With `probe`, sibling groups are probed first, as `lorakit train` does."""
    import torch

    from lorakit.device import autocast
    from lorakit.siblings import probe_groups

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None  # none for the bounds
    if probe:
        probe_groups(model, ids)  # as lorakit train does before its first step

    def step() -> float:
        with autocast(device, dtype):  # both lorakit and PEFT compute in the base dtype on a GPU
            loss = loss_of(ids)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()  # waits for the GPU

    return step, params


def in_process_steps(args: argparse.Namespace) -> dict[str, Callable[[], float]]:
    """{variant: its training step} for every name in ``args.variants``, all built in this process with the
    bench's setups and `make_step`, each warmed up once: for benchmarks that alternate the variants step by step
    (benchmarks/bench_interleaved.py, benchmarks/profile_step.py)."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = _placement(args)
    steps = {}
    for name in args.variants:
        model, loss_of, probe = VARIANT_BUILDERS[name](args)
        model.train()
        steps[name], _ = make_step(model, loss_of, probe, bench_batch(args, model, device), device, dtype)
        steps[name]()  # warm-up, not timed
    return steps


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build one variant, warm up, time ``args.steps`` steps; return the measurements."""
    import torch

    from lorakit.device import peak_memory_gb

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = _placement(args)
    model, loss_of, probe = VARIANT_BUILDERS[args.worker](args)
    model.train()
    if getattr(
        args, "grad_checkpointing", False
    ):  # non-reentrant, as lorakit train's --train.grad_checkpointing
        enable_checkpointing(model)
    load_rss = rss_now_gb()
    load_gpu = peak_memory_gb(device)

    ids = bench_batch(args, model, device)
    step, params = make_step(model, loss_of, probe, ids, device, dtype)

    # Resetting VmHWM can also lower ru_maxrss, so keep the load-time peak and take the max at the end.
    load_peak = peak_rss_gb()
    can_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    first_loss = step()  # warm-up, not timed; B = 0 at init, so every variant sees the base model's loss
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)

    return {
        "variant": args.worker,
        "step_s": statistics.median(times),
        "steps_s": times,
        "peak_rss_gb": max(load_peak, peak_rss_gb()),
        "train_peak_gb": hwm_gb() if can_reset else None,
        "load_rss_gb": load_rss,
        "peak_gpu_gb": peak_memory_gb(device),
        "load_gpu_gb": load_gpu,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "load_peak_gb": load_peak,
        "first_loss": first_loss,
        "trainable": sum(p.numel() for p in params),
        "threads": torch.get_num_threads(),
    }
