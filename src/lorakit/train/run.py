"""`lorakit train` end to end: model, data, LoRA, eval before, the loop, eval after, files in one run folder."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.device import (
    dtype_name,
    model_device,
    peak_memory_gb,
    placement,
    upcast_trainable,
)
from lorakit.errors import ConfigError
from lorakit.formats import name_classes
from lorakit.quant import is_quantized, quantize
from lorakit.quant.load import load_quantized
from lorakit.report import parameter_report
from lorakit.task_types import task_type_for
from lorakit.train.best import Best
from lorakit.train.checkpoint import full_parameters
from lorakit.train.config import RunConfig, save_config
from lorakit.train.datasets import (
    RunData,
    encode_examples,
    encode_feedback_data,
    encode_head_data,
    encode_preferences,
    encode_text_pair_data,
    head_data,
    load_examples,
)
from lorakit.train.distributed import distribute, init_distributed
from lorakit.train.embed_objective import embedding_measures, measured_widths
from lorakit.train.evaluate import (
    classify_eval,
    eval_loss,
    exact_match,
    preference_eval,
    regression_eval,
    tagging_eval,
)
from lorakit.train.loop import train_loop
from lorakit.train.methods import Method, make_method
from lorakit.train.metrics import Callback, read_metrics
from lorakit.train.objectives import Objective, make_objective
from lorakit.train.schedule import init_batches

ROW_NAMES = {
    "examples": "examples",
    "pairs": "pairs",
    "feedback": "rated answers",
    "labelled": "examples",
    "tagged": "examples",
    "text_pairs": "pairs",
}
"""How a log line counts an objective's training rows."""

__all__ = ["evaluate", "load_examples", "run_training"]

log = logging.getLogger(__name__)


def evaluate(
    model,
    tokenizer,
    eval_rows,
    eval_examples,
    cfg: RunConfig,
    *,
    sharded: bool = False,
    can_merge: bool = True,
    objective: Objective | None = None,
) -> dict[str, float]:
    """Eval loss and exact-match accuracy; with a preference `objective` (DPO, SimPO, ORPO, CPO, KTO), its
    loss and the implicit rewards' accuracy and margin on the eval pairs (KTO: answers), and exact match of
    the chosen (desirable) answers; a reward model's loss and its rewards' accuracy and margin alone, a
    classifier's cross-entropy and accuracy alone. `sharded` (FSDP2): every rank calls this with the same data
    and gets the same numbers; adapters are not merged (the base weights are shards) and generation runs in
    lockstep."""
    out: dict[str, float] = {}
    if objective is not None and objective.rows == "text_pairs":
        pad = tokenizer.pad_token_id
        dims = objective.cut_dims
        out.update(embedding_measures(model, eval_rows, pad, objective.pooling, objective.scale, dims))
    elif objective is not None and objective.rows == "tagged":
        out.update(tagging_eval(model, eval_rows, tokenizer.pad_token_id, objective))
    elif objective is not None and objective.rows == "labelled":
        measure = regression_eval if objective.name == "regression" else classify_eval
        out.update(measure(model, eval_rows, tokenizer.pad_token_id, objective))
    elif objective is not None and objective.rows != "examples":
        out.update(preference_eval(model, eval_rows, tokenizer.pad_token_id, objective))
    else:
        loss = eval_loss(model, eval_rows, tokenizer.pad_token_id)
        if loss is not None:  # None: truncation left no eval token (warned at the start)
            out["loss"] = loss
    if objective is not None and not objective.generates:  # a reward model or a classifier
        return out
    acc, _ = exact_match(
        model,
        tokenizer,
        eval_examples[: cfg.eval.limit],
        max_new_tokens=cfg.eval.max_new_tokens,
        chat=cfg.data.chat,
        merge=can_merge and not sharded and _merges_back(model),
        synced=sharded,
    )
    if acc is not None:
        out["accuracy"] = acc
    return out


def _merges_back(model: nn.Module) -> bool:
    """Whether the evaluation may merge the adapters to decode faster: a float32 base, whose weights the unmerge
    gives back within a float32 rounding (2.4e-7 at most on SmolLM2). A 16-bit base is not given back bitwise
    (bf16 SmolLM2, a random adapter on every linear layer: 11.8% of those weights changed, by up to 0.016;
    benchmarks/merge_roundtrip.py), and training goes on from the evaluated model, so there the answers are
    decoded unmerged; a 4-bit base cannot take a merge."""
    if is_quantized(model):
        return False
    frozen = (p for p in model.parameters() if not p.requires_grad and p.is_floating_point())
    return next((p.dtype for p in frozen), torch.float32) == torch.float32


def run_training(
    cfg: RunConfig, *, callbacks: list[Callback] | None = None, model=None, tokenizer=None, say=None
) -> dict[str, Any]:
    """Train a LoRA adapter as `cfg` says; returns the summary also written to summary.json."""
    world, rank = init_distributed()
    say = (say or log.info) if rank == 0 else log.debug
    fsdp = _process_settings(cfg, world)
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_id = cfg.model.path or "SmolLM2-135M-Instruct"
    objective = make_objective(cfg)
    regression = objective.name == "regression"
    classes = head_data(cfg, objective)  # a classifier's data, read before its model: the head's size
    per_token = objective.rows == "tagged"
    model, tokenizer, quant = _base_model(
        cfg, model, tokenizer, say, objective.num_labels, per_token=per_token, bare=objective.name == "embed"
    )
    if objective.name == "embed":
        objective.attach(model, cfg.embed.pooling, say)
    if regression:
        model.config.problem_type = (
            "regression"  # transformers' own loss is then the squared error; and saved
        )
    elif classes is not None:
        name_classes(model, classes.names)
        if classes.multi_label:  # transformers' own loss is then the binary cross-entropy; and saved
            model.config.problem_type = "multi_label_classification"
    if cfg.data.add_tokens:
        cfg = _add_tokens(cfg, model, tokenizer, say)
    if cfg.data.alora_invocation is not None:
        ids = tokenizer.encode(cfg.data.alora_invocation, add_special_tokens=False)
        cfg = dataclasses.replace(cfg, lora=cfg.lora.replace(alora_invocation_tokens=ids))
        objective = make_objective(cfg)
    encode = {
        "examples": encode_examples,
        "pairs": encode_preferences,
        "feedback": encode_feedback_data,
        "text_pairs": encode_text_pair_data,
    }
    if classes is not None:
        data = encode_head_data(cfg, tokenizer, say, objective, classes)
    else:
        data = encode[objective.rows](cfg, tokenizer, say)
    method = make_method(cfg)
    init_rows = objective.token_rows(data.train_rows)  # a data-driven init (EVA, CorDA) reads token rows
    method.batches = lambda: init_batches(init_rows, cfg, tokenizer.pad_token_id)
    report = _prepare(method, model, base_id, cfg, world, say)
    if rank == 0:
        save_config(cfg, out_dir / "config.yaml")

    def evaluate_now(sharded: bool = fsdp) -> dict[str, float]:
        return evaluate(
            model,
            tokenizer,
            data.eval_rows,
            data.eval_examples,
            cfg,
            sharded=sharded,
            can_merge=method.can_merge,
            objective=objective,
        )

    before = evaluate_now(sharded=False) if rank == 0 else {}  # unsharded yet
    say(f"before: {_fmt(before)}" if before else "before: (rank 0 evaluates)")
    if rank == 0:
        _record_before(out_dir, before)
    trained = distribute(model, world, fsdp, broadcast_buffers=quant is None, say=say)
    best = Best(cfg.train)
    result = train_loop(
        trained,
        data.train_rows,
        cfg,
        pad_id=tokenizer.pad_token_id,
        out_dir=out_dir,
        evaluate=evaluate_now if rank == 0 or fsdp else None,  # sharded: forward passes need every rank
        callbacks=callbacks,
        base_model_id=base_id,
        world=world,
        rank=rank,
        method=method,
        objective=objective,
        best=best,
    )
    # a run stopped early at an evaluation ends with the state just evaluated: not evaluated twice
    measured_last = best.last is not None and best.last[0] == result["steps"]
    after = best.last[1] if measured_last else (evaluate_now() if rank == 0 or fsdp else {})
    last = after
    if result.get("stopped_early") and rank == 0:
        say(
            f"stopped early after step {result['steps']}: {cfg.train.early_stop} evaluation(s) in a row "
            f"without a better eval {best.metric} than {best.value:.4f} (step {best.step})"
        )
    if rank == 0 and best.keep and best.better_than(after):  # keep_best: end with the best evaluated state
        best.restore(model, method)
        after = evaluate_now()
        kept = f"step {best.step} (eval {best.metric} {best.value:.4f})"
        say(f"best:   {kept}; the last state's was {_fmt(last)}")
    elif rank == 0 and best.active:
        best.take_last(result["steps"], after)
    if best.active:
        result["best"] = {**best.record(), "restored": after is not last}
    with full_parameters(model):  # FSDP2: every rank gathers the adapter, rank 0 writes it
        adapter_dir = method.save(model, out_dir / "adapter") if rank == 0 else None
    if adapter_dir is not None and cfg.data.add_tokens:  # the new tokens' ids live in this tokenizer
        tokenizer.save_pretrained(str(adapter_dir))
    if rank != 0:
        return {"rank": rank, **result}
    say(f"after:  {_fmt(after)}")
    return _write_summary(out_dir, cfg, result, before, after, data, report, adapter_dir, last, measured_last)


def _add_tokens(cfg: RunConfig, model: nn.Module, tokenizer, say) -> RunConfig:
    """Add data.add_tokens to the tokenizer (as special tokens: never split), resize the model's embeddings to
    it, and return the config whose lora.trainable_token_indices also names the new tokens' rows."""
    known = [t for t in cfg.data.add_tokens if t in tokenizer.get_vocab()]
    added = tokenizer.add_tokens(list(cfg.data.add_tokens), special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # never shrink a padded vocabulary
        model.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(list(cfg.data.add_tokens))
    spec = cfg.lora.trainable_token_indices
    if isinstance(spec, dict):
        raise ConfigError(
            "data.add_tokens takes lora.trainable_token_indices as a list of ids, not a mapping"
        )
    merged = list(dict.fromkeys([*(spec or []), *ids]))
    say(
        f"tokens: added {added} new token(s) to the tokenizer ({len(known)} already known), "
        f"{model.get_input_embeddings().weight.shape[0]} embedding rows; training rows {ids}"
    )
    return dataclasses.replace(cfg, lora=cfg.lora.replace(trainable_token_indices=merged))


def _prepare(
    method: Method, model: nn.Module, base_id: str, cfg: RunConfig, world: int, say
) -> dict[str, Any]:
    """Put the method's trainable adapter on `model`, say how much it trains and how large a step's batch is;
    returns the parameter report."""
    method.prepare(model, base_id)
    found = method.data_init
    if found is not None:
        say(f"{found.label}: {found.describe()}")
    if cfg.model.adapter_dtype == "float32":  # the optimizer's master weights (autocast computes in 16 bits)
        upcast_trainable(model)
    report = parameter_report(model)
    if found is not None:
        report[found.key] = found.record()
    t = cfg.train
    say(
        f"{method.label}: {report['trainable']:,} trainable of {report['total']:,} parameters "
        f"({report['trainable_percent']:.2f}%)"
    )
    say(
        f"global batch: {t.batch_size} per process x {t.grad_accum} accumulation x {world} process(es) = "
        f"{t.batch_size * t.grad_accum * world} {ROW_NAMES[make_objective(cfg).rows]} per step"
    )
    return report


def _process_settings(cfg: RunConfig, world: int) -> bool:
    """Threads and seed of this process; returns whether to shard with FSDP2 (train.fsdp with several processes)."""
    if cfg.train.fsdp and world == 1:
        log.warning(
            "train.fsdp is on but this is a single process: training unsharded "
            "(start several with torchrun --nproc_per_node N)"
        )
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    return cfg.train.fsdp and world > 1


def _base_model(
    cfg: RunConfig,
    model,
    tokenizer,
    say,
    num_labels: int | None = None,
    *,
    per_token: bool = False,
    bare: bool = False,
) -> tuple[nn.Module, Any, Any]:
    """(model, tokenizer, quantization report or None): the model passed in, or the one model.path names; QLoRA
    (model.quantize) quantizes it, loading a model straight into 4 bits, never whole in full precision.
    `num_labels`: a sequence classifier with that many outputs (a reward model's 1, a classifier's classes);
    with `per_token`, a token classifier with that many tags; `bare`: the model without a head (an embedding
    model's)."""
    q = cfg.model
    if model is None:
        device, dtype = placement(q.device, q.dtype)
    else:  # a model passed in runs where and as it is
        device = model_device(model)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    q.device, q.dtype = str(device), dtype_name(dtype)  # config.yaml records what was chosen
    quant = None
    if model is None and q.quantize:
        model, tokenizer, quant = load_quantized(
            q.path,
            method=q.quantize,
            double_quant=q.double_quant,
            skip=q.quantize_skip,
            dtype=dtype,
            device=device,
            num_labels=num_labels,
            per_token=per_token,
            bare=bare,
        )
    elif model is None:
        from lorakit.models import load_model

        model, tokenizer = load_model(
            q.path, dtype=dtype, device=device, num_labels=num_labels, per_token=per_token, bare=bare
        )
    if bare and task_type_for(model) not in (None, "FEATURE_EXTRACTION"):
        raise ConfigError(
            f"train.objective embed trains a model without a head (transformers' AutoModel), not a "
            f"{type(model).__name__}: load it with lorakit.load_model(..., bare=True)"
        )
    task = "TOKEN_CLS" if per_token else "SEQ_CLS"
    if num_labels is not None and not (  # a model passed in is refused before it is quantized
        task_type_for(model) == task and model.config.num_labels == num_labels
    ):
        how = f"num_labels={num_labels}, per_token=True" if per_token else f"num_labels={num_labels}"
        raise ConfigError(
            f"train.objective {cfg.train.objective} trains a model with a {num_labels}-output head, not a "
            f"{type(model).__name__}: load it with lorakit.load_model(..., {how})"
        )
    if quant is None and q.quantize:  # a model passed in: quantize it in place
        quant = quantize(model, q.quantize, q.double_quant, q.quantize_skip)
    if device.type != "cpu":
        say(f"device: {device} ({torch.cuda.get_device_name(device)}), base in {q.dtype}")
    if quant is not None:
        say(f"quantized the base: {quant.summary()}")
    return model, tokenizer, quant


def _write_summary(
    out_dir: Path,
    cfg: RunConfig,
    result: dict[str, Any],
    before: dict[str, float],
    after: dict[str, float],
    data: RunData,
    report: dict[str, Any],
    adapter_dir: Path | None,
    last: dict[str, float],
    on_curve: bool,
) -> dict[str, Any]:
    """Rank 0's end of a run: the last state's eval on the curve of metrics.jsonl (at the step the run ended,
    unless it is there already, `on_curve`: a run stopped early at a periodic evaluation), loss.png,
    summary.json ("after": the adapter saved, the best state's with train.keep_best)."""
    if not on_curve:
        _append_eval(out_dir, result["steps"], last)
    plot = plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
    summary = {
        "before": before,
        "after": after,
        "data": data.stats,
        **result,
        "trainable": report["trainable"],
        "total": report["total"],
        "adapter": str(adapter_dir),
        "run_dir": str(out_dir),
        "loss_plot": str(plot) if plot else None,
        "peak_rss_gb": _peak_rss_gb(),
        "peak_gpu_gb": peak_memory_gb(torch.device(cfg.model.device)),
        "quantization": report.get("quantization"),
        "eva": report.get("eva"),
        "corda": report.get("corda"),
        "lora_ga": report.get("lora_ga"),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _record_before(out_dir: Path, before: dict[str, float]) -> None:
    """The eval before training as step 0 of metrics.jsonl's curve, written at once, so that a run stopped early
    keeps it. It measures the adapter as initialised (a resumed run restores its checkpoint later), so a resumed
    run whose folder already has it adds nothing."""
    metrics = out_dir / "metrics.jsonl"
    recorded = any(
        r.get("step") == 0 and any(k.startswith("eval_") for k in r) for r in read_metrics(metrics)
    )
    if before and not recorded:
        _append_eval(out_dir, 0, before)


def _append_eval(out_dir: Path, step: int, measured: dict[str, float]) -> None:
    with (out_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, **{f"eval_{k}": v for k, v in measured.items()}}) + "\n")


def _fmt(m: dict[str, float]) -> str:
    acc = f"accuracy {100 * m['accuracy']:.1f}%, " if "accuracy" in m else ""
    if "reward_accuracy" in m:
        acc += f"reward accuracy {100 * m['reward_accuracy']:.1f}% (margin {m['reward_margin']:.3f}), "
    if "f1" in m:
        acc += f"F1 {m['f1']:.4f}, "
    if "mrr_at_10" in m:
        acc += f"recall@10 {100 * m['recall_at_10']:.1f}%, MRR@10 {m['mrr_at_10']:.4f}, "
        for d in measured_widths(m):
            acc += f"{d} dims {100 * m[f'dim{d}_accuracy']:.1f}% (MRR@10 {m[f'dim{d}_mrr_at_10']:.4f}), "
    if "pearson" in m:
        acc += f"Pearson {m['pearson']:.4f}, Spearman {m['spearman']:.4f}, "
        for d in measured_widths(m):  # an embedding model's scored pairs, its vectors cut short
            acc += f"{d} dims Spearman {m[f'dim{d}_spearman']:.4f}, "
    return f"{acc}eval loss {m['loss']:.4f}" if "loss" in m else f"{acc}no eval loss (nothing to evaluate)"


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
