"""Benchmark: the library path, lorakit against PEFT in the user's own training loop (issue 19).

A PEFT user who switches to lorakit replaces ``peft.get_peft_model(model, cfg)`` with ``lorakit.inject(model,
cfg)`` and keeps the rest. This measures that, in three loops, each (loop, library) pair in its own process:

* ``loop``: a plain loop: ``model(input_ids=ids, labels=ids).loss.backward()``, AdamW, ``zero_grad``;
* ``trainer``: transformers' ``Trainer`` (``use_cpu``, no logging, no saving), timed per optimizer step by a
  callback;
* ``sft``: TRL's ``SFTTrainer`` on the same token rows (needs ``pip install trl``; TRL computes its own chunked
  log-probabilities with ``fused_lm_head=True``, for PEFT and lorakit alike).

The model is the default SmolLM2-135M (or ``--model``) in ``--dtype``; LoRA r=16, alpha=16 on the seven
projections; random token rows, labels = inputs. Each worker warms up one step, then times ``--steps`` steps and
reports the median step time and its peak RSS. Rounds interleave the workers in rotating order
(`lorakit.bench.round_order`); ratios are lorakit/PEFT per round, reported as median [min–max].

    .venv/bin/python benchmarks/bench_library.py --loops loop trainer sft --seq 128 256 --rounds 3 --write-docs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from lorakit.bench import (  # noqa: E402
    cpu_name,
    display_command,
    round_order,
    spawn_worker,
    spread,
    torch_capability,
    write_docs,
)
from lorakit.bench_worker import TARGETS, hwm_gb, peak_rss_gb, reset_peak_rss  # noqa: E402

LOOPS = ("loop", "trainer", "sft")
LIBS = ("lorakit", "peft")
DOC = ROOT / "docs" / "performance.md"


# --------------------------------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------------------------------


def _model(args):
    import torch

    import lorakit
    from lorakit.device import placement, upcast_trainable

    device, dtype = placement("cpu", args.dtype)
    model, tok = lorakit.load_model(args.model, dtype=dtype, device=device)
    if args.lib == "lorakit":
        lorakit.inject(model, lorakit.LoraConfig(r=args.r, alpha=args.r, targets=TARGETS))
        upcast_trainable(model)
    else:
        import peft

        cfg = peft.LoraConfig(r=args.r, lora_alpha=args.r, target_modules=TARGETS, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg)
    torch.manual_seed(0)
    return model, tok, dtype


def _rows(args, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(1234)
    n = args.batch * (args.steps + 1)
    return torch.randint(0, vocab, (n, args.seq), generator=g).tolist()


class _Timer:
    """A TrainerCallback (duck-typed: Trainer calls whichever hooks exist) timing each optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.t0 = 0.0
        self.reset = False

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1 and not self.reset:  # after the warm-up step
            self.reset = reset_peak_rss()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.t0)


def _hf_args(args, out: str, cls):
    return cls(
        output_dir=out,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + 1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=args.dtype == "bfloat16",
        **({"max_length": args.seq, "packing": False} if cls.__name__ == "SFTConfig" else {}),
    )


def worker(args) -> dict:
    import tempfile

    import torch
    from transformers import TrainerCallback

    from lorakit.device import autocast

    torch.set_num_threads(args.threads)
    model, tok, dtype = _model(args)
    model.train()
    rows = _rows(args, model.config.vocab_size)
    timer = type("Timer", (_Timer, TrainerCallback), {})()
    load_peak = peak_rss_gb()
    loss0 = None
    with tempfile.TemporaryDirectory() as out:
        if args.loop == "loop":
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            for i in range(args.steps + 1):
                if i == 1:
                    timer.reset = reset_peak_rss()
                ids = torch.tensor(rows[i * args.batch : (i + 1) * args.batch])
                t0 = time.perf_counter()
                with autocast(
                    torch.device("cpu"), dtype
                ):  # bf16: both under autocast, as Trainer's bf16=True
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                timer.times.append(time.perf_counter() - t0)
                loss0 = loss.item() if loss0 is None else loss0
        elif args.loop == "trainer":
            from transformers import Trainer, TrainingArguments

            data = [{"input_ids": torch.tensor(r), "labels": torch.tensor(r)} for r in rows]
            trainer = Trainer(
                model=model,
                args=_hf_args(args, out, TrainingArguments),
                train_dataset=data,
                callbacks=[timer],
            )
            trainer.train()
        else:
            from datasets import Dataset
            from trl import SFTConfig, SFTTrainer

            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            data = Dataset.from_list([{"input_ids": r} for r in rows])
            trainer = SFTTrainer(
                model=model,
                args=_hf_args(args, out, SFTConfig),
                train_dataset=data,
                processing_class=tok,
                callbacks=[timer],
            )
            trainer.train()
    timed = timer.times[1:]
    return {
        "loop": args.loop,
        "lib": args.lib,
        "step_s": statistics.median(timed),
        "steps_s": timed,
        "peak_rss_gb": max(load_peak, peak_rss_gb()),
        "train_peak_gb": hwm_gb() if timer.reset else None,
        "dtype": str(dtype).removeprefix("torch."),
    }


# --------------------------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------------------------


def spawn(args, loop: str, lib: str, seq: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--loop", loop, "--lib", lib, "--seq", str(seq)]
    cmd += ["--batch", str(args.batch), "--steps", str(args.steps), "--r", str(args.r), "--dtype", args.dtype]
    cmd += ["--threads", str(args.threads)] + (["--model", args.model] if args.model else [])
    return spawn_worker(cmd, f"{loop}/{lib} at seq {seq}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS))
    p.add_argument("--seq", nargs="+", type=int, default=[128, 256])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument(
        "--dtype", default="float32", help="the base's dtype: float32 or bfloat16 (autocast, both)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--model", default=None)
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loop", choices=LOOPS, help=argparse.SUPPRESS)
    p.add_argument("--lib", choices=LIBS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.seq = args.seq[0]
        print(json.dumps(worker(args)))
        return
    if "sft" in args.loops:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit(
                "the sft loop needs TRL: pip install trl (or leave sft out of --loops)"
            ) from None
    results: dict[tuple[str, int], list[dict]] = {}
    for seq in args.seq:
        for loop in args.loops:
            rounds = []
            for i in range(args.rounds):
                res = {}
                for lib in round_order(list(LIBS), i):
                    res[lib] = r = spawn(args, loop, lib, seq)
                    print(
                        f"{loop} 4x{seq} round {i + 1} {lib:8s} step {r['step_s']:.3f} s, "
                        f"peak {r['peak_rss_gb']:.3f} GB",
                        file=sys.stderr,
                        flush=True,
                    )
                rounds.append(res)
            results[(loop, seq)] = rounds
    table = _table(args, results)
    print(table)
    if args.write_docs:
        write_docs(
            DOC,
            table,
            f"<!-- bench_library:{args.dtype}:begin -->",
            f"<!-- bench_library:{args.dtype}:end -->",
        )


def _table(args, results) -> str:
    head = (
        f"CPU: {cpu_name()} (torch capability {torch_capability()}), {args.threads} threads; base dtype "
        f"{args.dtype}; batch {args.batch}, r={args.r} on the seven projections; {args.rounds} rounds x "
        f"{args.steps} steps.\n\n"
        "| loop | batch | PEFT step, s | lorakit step, s | time lorakit/PEFT | PEFT peak RSS, GB | lorakit peak RSS, "
        "GB | memory lorakit/PEFT |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for (loop, seq), rounds in results.items():
        pt = [r["peft"]["step_s"] for r in rounds]
        lt = [r["lorakit"]["step_s"] for r in rounds]
        pm = [r["peft"]["peak_rss_gb"] for r in rounds]
        lm = [r["lorakit"]["peak_rss_gb"] for r in rounds]
        tr = [a / b for a, b in zip(lt, pt, strict=True)]
        mr = [a / b for a, b in zip(lm, pm, strict=True)]
        lines.append(
            f"| {loop} | {args.batch}x{seq} | {spread(pt, '.2f')} | {spread(lt, '.2f')} | {spread(tr, '.3f', '×')} "
            f"| {spread(pm, '.2f')} | {spread(lm, '.2f')} | {spread(mr, '.3f', '×')} |"
        )
    return "\n".join(lines) + f"\n\nCommand: `{display_command()}`"


if __name__ == "__main__":
    main()
