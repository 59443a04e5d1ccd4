"""Benchmark: a preference step, lorakit (`lorakit train --objective dpo`'s loop) against TRL's DPOTrainer with PEFT;
with ``--objective simpo``, ``cpo``, ``orpo`` or ``kto``, against TRL's CPOTrainer (loss_type simpo; or
sigmoid with cpo_alpha 1, CPO's defaults on both sides), ORPOTrainer or KTOTrainer; with ``--objective reward``,
a reward model's step against TRL's RewardTrainer (the model with a one-output head on both sides, PEFT's
task_type SEQ_CLS, which trains the head whole as lorakit does).

Both train a LoRA (r=16, alpha=16, the seven projections, no dropout) on the default SmolLM2-135M (or
``--model``), AdamW, a constant learning rate, no gradient checkpointing. DPO's reference is the base model,
adapters off, for both (TRL's choice for a PEFT model with ``ref_model=None``); SimPO, CPO and ORPO have none.
TRL's CPO and ORPO trainers tokenize their older way (a BOS where the tokenizer has one, an EOS after each
answer): a token more or less per row than lorakit, out of about 130. The data: ``--batch`` pairs of
random words, a prompt of about ``--prompt`` tokens and two answers of about ``--answer`` tokens each, as text
(no chat template), the same for both. KTO trains on both sides of each pair as rated answers (TRL's unpairing,
lorakit's `lorakit.data.feedback.unpaired`): a step holds 2 x ``--batch`` answers, the tokens of ``--batch``
pairs, each with its KL row. Each worker warms up one step, then times ``--steps`` steps and reports the
median step time and the peak RSS of the whole process (model, data, both libraries' imports included) and of
the timed steps (the high-water mark after a reset). Rounds interleave the two in rotating order
(`lorakit.bench.round_order`); ratios are lorakit/TRL per round, reported as median [min–max].

    .venv/bin/python benchmarks/bench_dpo.py --rounds 3 --write-docs
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
from lorakit.train.objectives import NAMES  # noqa: E402

LIBS = ("lorakit", "trl")
TRAINERS = {
    "dpo": "DPOTrainer",
    "simpo": "CPOTrainer",
    "cpo": "CPOTrainer",
    "orpo": "ORPOTrainer",
    "kto": "KTOTrainer",
    "reward": "RewardTrainer",
}
DOC = ROOT / "docs" / "dpo.md"
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


def _pairs(args) -> list[dict]:
    rng = random.Random(1234)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    n = args.batch * (args.steps + 1)
    return [
        {"prompt": text(args.prompt), "chosen": " " + text(args.answer), "rejected": " " + text(args.answer)}
        for _ in range(n)
    ]


def _lorakit(args, pairs, tmp: str) -> tuple[list[float], bool]:
    import torch

    import lorakit
    from lorakit.data.feedback import encode_feedback, unpaired
    from lorakit.data.preference import as_pair, encode_pairs
    from lorakit.device import placement, upcast_trainable
    from lorakit.train.config import RunConfig, TrainSection
    from lorakit.train.loop import train_loop
    from lorakit.train.objectives import make_objective

    device, dtype = placement("cpu", args.dtype)
    model, tok = lorakit.load_model(args.model, dtype=dtype, device=device, num_labels=_labels(args))
    lorakit.inject(model, lorakit.LoraConfig(r=args.r, alpha=args.r, targets=TARGETS))
    upcast_trainable(model)
    given = [as_pair(p, "explicit", "pair") for p in pairs]
    if args.objective == "kto":
        rows, _ = encode_feedback(tok, unpaired(given), max_len=4096, chat=False)
    else:
        rows, _ = encode_pairs(tok, given, max_len=4096, chat=False)
    cfg = RunConfig(
        train=TrainSection(
            out_dir=tmp,
            steps=args.steps + 1,
            batch_size=_rows_per_step(args),
            lr=1e-5,
            schedule="constant",
            warmup_steps=0,
            save_every=0,
            objective=args.objective,
        )
    )
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
        objective=make_objective(cfg),
        callbacks=[on_record],
    )
    marks = [t0, *ends]
    return [b - a for a, b in zip(marks, marks[1:], strict=False)], state["reset"]


def _trl(args, pairs, tmp: str) -> tuple[list[float], bool]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    import lorakit
    from lorakit.device import placement

    device, dtype = placement("cpu", args.dtype)
    model, tok = lorakit.load_model(args.model, dtype=dtype, device=device, num_labels=_labels(args))
    times: list[float] = []
    state = {"t0": 0.0, "reset": False}

    class Timer(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            if s.global_step == 1 and not state["reset"]:
                state["reset"] = reset_peak_rss()
            state["t0"] = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            times.append(time.perf_counter() - state["t0"])

    common = dict(
        output_dir=tmp,
        per_device_train_batch_size=_rows_per_step(args),
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
    )
    if args.objective == "dpo":
        config, trainer_class = (
            DPOConfig(**common, max_length=None, precompute_ref_log_probs=False),
            DPOTrainer,
        )
    elif args.objective == "kto":  # TRL unpairs the pairs itself, chosen answers first as lorakit
        config = KTOConfig(**common, max_length=None, precompute_ref_log_probs=False, loss_type="kto")
        trainer_class = KTOTrainer
    elif args.objective == "reward":  # TRL adds an EOS to each text answer: a token more per row
        config, trainer_class = RewardConfig(**common, max_length=None), RewardTrainer
    elif args.objective == "orpo":
        config, trainer_class = ORPOConfig(**common, max_length=4096), ORPOTrainer
    elif args.objective == "cpo":  # lorakit's CPO defaults: sigmoid, beta 0.1, the token loss at weight 1
        config = CPOConfig(**common, max_length=4096, loss_type="sigmoid", beta=0.1, cpo_alpha=1.0)
        trainer_class = CPOTrainer
    else:  # lorakit's SimPO defaults: beta 2, gamma 1, no token loss
        config = CPOConfig(
            **common, max_length=4096, loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0
        )
        trainer_class = CPOTrainer
    peft_config = LoraConfig(
        r=args.r,
        lora_alpha=args.r,
        target_modules=TARGETS,
        lora_dropout=0.0,
        task_type="SEQ_CLS" if _labels(args) else None,  # the head trained whole (modules_to_save)
    )
    torch.manual_seed(0)
    trainer = trainer_class(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return times, state["reset"]


def _labels(args) -> int | None:
    """A reward model's one output, or None: a causal LM."""
    return 1 if args.objective == "reward" else None


def _rows_per_step(args) -> int:
    """A step's rows: --batch pairs, or for KTO both answers of each as rows of their own."""
    return args.batch * (2 if args.objective == "kto" else 1)


def worker(args) -> dict:
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    pairs = _pairs(args)
    with tempfile.TemporaryDirectory() as tmp:
        times, reset = (_lorakit if args.lib == "lorakit" else _trl)(args, pairs, tmp)
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
        "--objective",
        args.objective,
    ]
    cmd += [
        "--prompt",
        str(args.prompt),
        "--answer",
        str(args.answer),
        "--r",
        str(args.r),
        "--dtype",
        args.dtype,
    ]
    cmd += ["--threads", str(args.threads)] + (["--model", args.model] if args.model else [])
    return spawn_worker(cmd, lib)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objective", choices=("dpo", "simpo", "cpo", "orpo", "kto", "reward"), default="dpo")
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--prompt", type=int, default=64, help="words per prompt (about one token each)")
    p.add_argument("--answer", type=int, default=64, help="words per answer")
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
        key = args.dtype if args.objective == "dpo" else f"{args.objective}:{args.dtype}"
        write_docs(DOC, table, f"<!-- bench_dpo:{key}:begin -->", f"<!-- bench_dpo:{key}:end -->")


def _per_step(args) -> str:
    if args.objective == "kto":
        return f"{2 * args.batch} rated answers per step (both sides of {args.batch} pairs)"
    return f"{args.batch} pairs per step"


def _table(args, rounds) -> str:
    head = (
        f"{NAMES[args.objective]}. CPU: {cpu_name()} (torch capability {torch_capability()}), {args.threads} "
        "threads; base dtype "
        f"{args.dtype}; {_per_step(args)}, prompts of {args.prompt} words and answers of {args.answer}; "
        f"r={args.r} on the seven projections; {args.rounds} rounds x {args.steps} steps.\n\n"
        f"| | TRL {TRAINERS[args.objective]} + PEFT | lorakit | lorakit/TRL |\n|---|---:|---:|---:|"
    )
    lines = [head, *ratio_rows(rounds, "lorakit", "trl", time_format=".2f")]
    return "\n".join(lines) + f"\n\nCommand: `{display_command()}`"


if __name__ == "__main__":
    main()
