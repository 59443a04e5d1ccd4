"""`lorakit train` end to end: model, data, LoRA, eval before, the loop, eval after, files in one run folder."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import torch

from lorakit.data.jsonl import DataError, read_jsonl
from lorakit.data.tasks import make_task
from lorakit.data.tokenize import encode_dataset, pack
from lorakit.inject import inject
from lorakit.io import save_adapter
from lorakit.report import parameter_report
from lorakit.train.config import RunConfig, save_config
from lorakit.train.evaluate import eval_loss, exact_match
from lorakit.train.loop import Callback, train_loop

log = logging.getLogger(__name__)


def load_examples(cfg: RunConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(train, eval, description) from the data section: a built-in task, or JSONL files."""
    d = cfg.data
    if not d.train_file:
        train, ev = make_task(d.task, n_train=d.n_train, n_eval=d.n_eval, seed=cfg.train.seed)
        return train, ev, f"built-in task {d.task!r}"
    train = read_jsonl(d.train_file)
    if d.eval_file:
        return train, read_jsonl(d.eval_file), f"{d.train_file} (eval: {d.eval_file})"
    rng = random.Random(cfg.train.seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    n_eval = max(1, int(len(train) * d.eval_split))
    if n_eval >= len(train):
        raise DataError(f"{d.train_file}: {len(train)} example(s) are too few to hold out an eval split")
    ev = [train[i] for i in order[:n_eval]]
    return [train[i] for i in order[n_eval:]], ev, f"{d.train_file} ({n_eval} held out for eval)"


def evaluate(model, tokenizer, eval_rows, eval_examples, cfg: RunConfig) -> dict[str, float]:
    out: dict[str, float] = {"loss": eval_loss(model, eval_rows, tokenizer.pad_token_id)}
    acc, _ = exact_match(
        model,
        tokenizer,
        eval_examples[: cfg.eval.limit],
        max_new_tokens=cfg.eval.max_new_tokens,
        chat=cfg.data.chat,
    )
    if acc is not None:
        out["accuracy"] = acc
    return out


def run_training(
    cfg: RunConfig, *, callbacks: list[Callback] | None = None, model=None, tokenizer=None, say=None
) -> dict[str, Any]:
    """Train a LoRA adapter as `cfg` says; returns the summary also written to summary.json."""
    say = say or log.info
    world, rank = init_distributed()
    if rank != 0:
        say = log.debug
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        from lorakit.models import load_model

        model, tokenizer = load_model(cfg.model.path, dtype=getattr(torch, cfg.model.dtype))
    base_id = cfg.model.path or "SmolLM2-135M-Instruct"
    train_ex, eval_ex, source = load_examples(cfg)
    enc = dict(max_len=cfg.data.max_len, chat=cfg.data.chat, train_on_all=cfg.data.train_on_all)
    train_rows, stats = encode_dataset(tokenizer, train_ex, **enc)
    eval_rows, eval_stats = encode_dataset(tokenizer, eval_ex, **enc)
    if not train_rows:
        raise DataError(
            f"{source}: no example has anything to learn after truncation to {cfg.data.max_len} tokens"
        )
    if cfg.data.pack:
        train_rows = pack(train_rows, cfg.data.max_len)
    say(
        f"data: {source}: {len(train_rows)} train rows, {len(eval_rows)} eval; "
        f"{stats['truncated']} train / {eval_stats['truncated']} eval examples truncated to {cfg.data.max_len} tokens"
    )
    inject(model, cfg.lora.replace(base_model=base_id))
    report = parameter_report(model)
    say(
        f"LoRA: {report['trainable']:,} trainable of {report['total']:,} parameters "
        f"({report['trainable_percent']:.2f}%)"
    )
    t = cfg.train
    say(
        f"global batch: {t.batch_size} per process x {t.grad_accum} accumulation x {world} process(es) = "
        f"{t.batch_size * t.grad_accum * world} examples per step"
    )
    if rank == 0:
        save_config(cfg, out_dir / "config.yaml")
    before = evaluate(model, tokenizer, eval_rows, eval_ex, cfg) if rank == 0 else {}
    say(f"before: {_fmt(before)}" if before else "before: (rank 0 evaluates)")
    trained = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model)
    result = train_loop(
        trained,
        train_rows,
        cfg,
        pad_id=tokenizer.pad_token_id,
        out_dir=out_dir,
        evaluate=(lambda: evaluate(model, tokenizer, eval_rows, eval_ex, cfg)) if rank == 0 else None,
        callbacks=callbacks,
        base_model_id=base_id,
        world=world,
        rank=rank,
    )
    if rank != 0:
        return {"rank": rank, **result}
    after = evaluate(model, tokenizer, eval_rows, eval_ex, cfg)
    say(f"after:  {_fmt(after)}")
    with (out_dir / "metrics.jsonl").open("a") as f:  # before/after evals on the same curve as training
        for step, m in ((result["resumed_from"], before), (cfg.train.steps, after)):
            f.write(json.dumps({"step": step, **{f"eval_{k}": v for k, v in m.items()}}) + "\n")
    adapter_dir = save_adapter(model, out_dir / "adapter")
    plot = plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
    summary = {
        "before": before,
        "after": after,
        "data": {"train": stats, "eval": eval_stats},
        **result,
        "trainable": report["trainable"],
        "total": report["total"],
        "adapter": str(adapter_dir),
        "run_dir": str(out_dir),
        "loss_plot": str(plot) if plot else None,
        "peak_rss_gb": _peak_rss_gb(),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def init_distributed() -> tuple[int, int]:
    """(world size, rank); starts the process group under torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world, dist.get_rank()


def _fmt(m: dict[str, float]) -> str:
    acc = f"accuracy {100 * m['accuracy']:.1f}%, " if "accuracy" in m else ""
    return f"{acc}eval loss {m['loss']:.4f}"


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def plot_losses(metrics: Path, out: Path) -> Path | None:
    """loss.png from metrics.jsonl: train loss per step, and eval loss where measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss plot (pip install matplotlib)")
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = sorted((r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r)
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
