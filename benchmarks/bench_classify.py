"""Benchmark: a text classifier's training step, lorakit (`lorakit train --objective classify`'s loop) against PEFT
with transformers' Trainer (the classification recipe of PEFT's and transformers' guides).

Both train a LoRA (r=16, alpha=16, the seven projections, no dropout) and a new head with ``--classes`` outputs,
trained whole (PEFT's task_type SEQ_CLS, modules_to_save), on the default SmolLM2-135M (or ``--model``) loaded as
transformers' ``...ForSequenceClassification``; AdamW, a constant learning rate, no gradient checkpointing, the
model's own cross-entropy on the last token that is not padding. The data: ``--batch`` texts per step of random
words, ``--words`` words each give or take a quarter (so rows are padded), their labels cycling through the
classes, tokenized the same way for both (the tokenizer's classification input); the Trainer pads each batch
with `DataCollatorWithPadding`, lorakit with its own collate. Each worker warms up one step, then times
``--steps`` steps and reports the median step time and the peak RSS of the whole process and of the timed steps
(the high-water mark after a reset). Rounds interleave the two in rotating order (`lorakit.bench.round_order`);
ratios are lorakit/PEFT per round, reported as median [min–max].

With ``--tokens`` it is a token classifier's step instead (`lorakit train --objective token_classify` against
PEFT's task_type TOKEN_CLS with the Trainer and `DataCollatorForTokenClassification`, the recipe of transformers'
token-classification guide): ``--classes`` entity types (4, as CoNLL-2003: 9 tags with O), every fourth word an
entity, the same tagged token rows for both (`lorakit.data.tagging.encode_tagged`), each token's tag's
cross-entropy.

    .venv/bin/python benchmarks/bench_classify.py --rounds 3 --write-docs
    .venv/bin/python benchmarks/bench_classify.py --rounds 3 --tokens --write-docs
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

LIBS = ("lorakit", "peft")
DOC = ROOT / "docs" / "classify.md"
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


def _items(args) -> list[dict]:
    rng = random.Random(1234)
    n = args.batch * (args.steps + 1)
    items = []
    for i in range(n):
        k = rng.randint(args.words * 3 // 4, args.words * 5 // 4)
        words = [rng.choice(WORDS) for _ in range(k)]
        if args.tokens:  # every fourth word an entity, its type cycling
            text, spans, at = " ".join(words), [], 0
            for j, w in enumerate(words):
                if j % 4 == 3:
                    spans.append((at, at + len(w), f"T{j % args.classes}"))
                at += len(w) + 1
            items.append({"text": text, "spans": spans})
            continue
        items.append({"text": " ".join(words), "text_pair": None, "label": i % args.classes})
    return items


def _tag_names(args) -> list[str]:
    return ["O"] + [f"{p}-T{c}" for c in range(args.classes) for p in ("B", "I")]


def _outputs(args) -> int:
    return len(_tag_names(args)) if args.tokens else args.classes


def _model(args):
    import lorakit
    from lorakit.device import placement

    device, dtype = placement("cpu", args.dtype)
    return lorakit.load_model(
        args.model, dtype=dtype, device=device, num_labels=_outputs(args), per_token=args.tokens
    )


def _rows(args, items, tok) -> list:
    """lorakit's rows of `items`: labelled texts, or with --tokens tagged ones (each token's tag)."""
    if args.tokens:
        from lorakit.data.tagging import encode_tagged

        return encode_tagged(tok, items, _tag_names(args), max_len=4096)[0]
    from lorakit.data.labels import encode_labelled

    names = [str(c) for c in range(args.classes)]
    return encode_labelled(tok, [{**it, "label": names[it["label"]]} for it in items], names, max_len=4096)[0]


def _lorakit(args, items, tmp: str) -> tuple[list[float], bool]:
    import torch

    import lorakit
    from lorakit.device import upcast_trainable
    from lorakit.train.config import RunConfig, TrainSection
    from lorakit.train.loop import train_loop
    from lorakit.train.objectives import make_objective

    model, tok = _model(args)
    config = lorakit.LoraConfig(r=args.r, alpha=args.r, targets=TARGETS, modules_to_save=["score"])
    lorakit.inject(model, config)
    upcast_trainable(model)
    rows = _rows(args, items, tok)
    cfg = RunConfig(
        train=TrainSection(
            out_dir=tmp,
            steps=args.steps + 1,
            batch_size=args.batch,
            lr=1e-5,
            schedule="constant",
            warmup_steps=0,
            save_every=0,
            objective="token_classify" if args.tokens else "classify",
        )
    )
    objective = make_objective(cfg)
    if args.tokens:
        objective.names, objective.num_labels = _tag_names(args), _outputs(args)
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


def _peft(args, items, tmp: str) -> tuple[list[float], bool]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    model, tok = _model(args)
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.r,
            lora_alpha=args.r,
            target_modules=TARGETS,
            lora_dropout=0.0,
            task_type="TOKEN_CLS" if args.tokens else "SEQ_CLS",
        ),
    )
    if args.tokens:  # the same tagged token rows as lorakit's
        encoded = [
            {
                "input_ids": r.row.input_ids,
                "attention_mask": [1] * len(r.row.input_ids),
                "labels": r.row.labels,
            }
            for r in _rows(args, items, tok)
        ]
    else:
        encoded = [{**tok(it["text"]), "labels": it["label"]} for it in items]
    times: list[float] = []
    state = {"t0": 0.0, "reset": False}

    class Timer(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            if s.global_step == 1 and not state["reset"]:
                state["reset"] = reset_peak_rss()
            state["t0"] = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            times.append(time.perf_counter() - state["t0"])

    config = TrainingArguments(
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
        gradient_checkpointing=False,
        seed=0,
        remove_unused_columns=False,
    )
    torch.manual_seed(0)
    trainer = Trainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(encoded),
        data_collator=DataCollatorForTokenClassification(tok)
        if args.tokens
        else DataCollatorWithPadding(tok),
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
        times, reset = (_lorakit if args.lib == "lorakit" else _peft)(args, items, tmp)
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
        "--classes",
        str(args.classes),
        "--r",
        str(args.r),
        "--dtype",
        args.dtype,
    ]
    cmd += ["--threads", str(args.threads)] + (["--model", args.model] if args.model else [])
    cmd += ["--tokens"] if args.tokens else []
    return spawn_worker(cmd, lib)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="texts per step")
    p.add_argument("--words", type=int, default=128, help="words per text, about (about one token each)")
    p.add_argument("--classes", type=int, default=4, help="classes; with --tokens, entity types")
    p.add_argument("--tokens", action="store_true", help="a token classifier's step (TOKEN_CLS)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dtype", default="float32", help="the base's dtype: float32 or bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--model", default=None)
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
        write_docs(
            ROOT / "docs" / "token_classify.md" if args.tokens else DOC,
            table,
            f"<!-- bench_classify:{'tokens:' if args.tokens else ''}{args.dtype}:begin -->",
            f"<!-- bench_classify:{'tokens:' if args.tokens else ''}{args.dtype}:end -->",
        )


def _table(args, rounds) -> str:
    what = (
        f"a token classifier, {args.classes} entity types ({_outputs(args)} tags), every fourth word an entity"
        if args.tokens
        else f"{args.classes} classes"
    )
    head = (
        f"CPU: {cpu_name()} (torch capability {torch_capability()}), {args.threads} threads; base dtype {args.dtype}; "
        f"{args.batch} texts of about {args.words} words per step, {what}; r={args.r} on the seven "
        f"projections and the head trained whole; {args.rounds} rounds x {args.steps} steps.\n\n"
        "| | PEFT + transformers Trainer | lorakit | lorakit/PEFT |\n|---|---:|---:|---:|"
    )
    lines = [head, *ratio_rows(rounds, "lorakit", "peft", time_format=".2f")]
    return "\n".join(lines) + f"\n\nCommand: `{display_command()}`"


if __name__ == "__main__":
    main()
