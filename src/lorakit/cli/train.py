"""`lorakit demo`, `lorakit train` and `lorakit bench`: the commands that train (or time training steps)."""

from __future__ import annotations

import argparse
import os

from lorakit.cli.common import MODEL_HELP, load
from lorakit.cliargs import positive_int


def configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--steps", type=positive_int, default=30, help="training steps (default: 30)")


def cmd_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lorakit.demo import ANSWER, QUESTION, run_demo
    from lorakit.report import format_report

    model, tok = load(args.model)
    bar = tqdm(total=args.steps, desc="LoRA demo training", unit="step")

    def on_step(step: int, loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(1)

    result = run_demo(
        model, tok, args.out, steps=args.steps, on_step=on_step, reload=lambda: load(args.model)
    )  # the reload in the same dtype (`auto`: bf16 on a CPU with native bf16)
    bar.close()
    print(format_report(result["report"], max_rows=7))
    print(f"\nQ: {QUESTION}")
    print(f"base model          : {result['before']}")
    print(f"with LoRA adapter   : {result['after']}")
    print(f"adapter disabled    : {result['base_while_disabled']}")
    print(f"fresh base + adapter: {result.get('after_reload')}")
    print(
        f"\nloss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f} in {len(result['losses'])} steps "
        f"({result['train_seconds']:.1f} s); adapter written to {result['adapter_dir']}"
    )
    ok = ANSWER.lower() in result["after"].lower() and result["after"] == result.get("after_reload")
    print("demo OK" if ok else "demo did not learn the answer")
    return 0 if ok else 1


def configure_train(p: argparse.ArgumentParser) -> None:
    """No options of its own: `[CONFIG.yaml] [--section.key value ...]` reach `cmd_train` as `args.extra`."""
    from lorakit.train.fields import help_text

    p.usage = "lorakit train [CONFIG.yaml] [--section.key value ...] [--model PATH] [--method NAME] [--objective NAME]"
    p.epilog = (
        "settings (YAML sections; override any with --section.key value; --model PATH is short for\n"
        "--model.path PATH, --method NAME for --train.method NAME, --objective NAME for --train.objective NAME):\n"
        + help_text()
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lorakit.train.config import load_config
    from lorakit.train.distributed import finish_distributed
    from lorakit.train.run import run_training

    rest = args.extra  # lorakit train [CONFIG.yaml] [--section.key value ...]
    has_config = bool(rest) and not rest[0].startswith("--")
    config, overrides = (rest[0], rest[1:]) if has_config else (None, rest)
    cfg = load_config(config, overrides)
    bars: list = []  # created at the first step, so the clock and ETA start there and errors leave no bar

    def on_record(rec: dict) -> None:
        if "loss" in rec:
            if not bars:
                quiet = os.environ.get("RANK", "0") != "0"
                bars.append(
                    tqdm(
                        total=cfg.train.steps,
                        initial=rec["step"] - 1,
                        desc="train",
                        unit="step",
                        disable=quiet,
                    )
                )
            bars[0].n = rec["step"]
            shown = {"loss": f"{rec['loss']:.4f}", "tok_s": f"{rec['tokens_per_s']:.0f}"}
            # DPO, SimPO, ORPO, CPO: how often the chosen answer's reward is the higher
            if "reward_accuracy" in rec:
                shown["reward_acc"] = f"{100 * rec['reward_accuracy']:.0f}%"
            if "accuracy" in rec:  # a classifier: the micro-batches' accuracy
                shown["acc"] = f"{100 * rec['accuracy']:.0f}%"
            if "kl" in rec:  # KTO: the micro-batches' KL estimate
                shown["kl"] = f"{rec['kl']:.3f}"
            bars[0].set_postfix(shown)
            bars[0].refresh()
        elif "eval_loss" in rec:
            tqdm.write(
                f"step {rec['step']}: eval loss {rec['eval_loss']:.4f}"
                + (f", accuracy {100 * rec['eval_accuracy']:.1f}%" if "eval_accuracy" in rec else "")
                + (
                    f", reward accuracy {100 * rec['eval_reward_accuracy']:.1f}%"
                    if "eval_reward_accuracy" in rec
                    else ""
                )
            )

    try:
        summary = run_training(cfg, callbacks=[on_record], say=tqdm.write)
    finally:
        for bar in bars:
            bar.close()
    finish_distributed()  # under torchrun: every rank here, then the process group ends
    if "rank" not in summary:  # under torchrun only rank 0 reports
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    b, a = summary["before"], summary["after"]
    print("\n               before      after")
    if "accuracy" in a:
        print(f"accuracy     {100 * b['accuracy']:7.1f}%   {100 * a['accuracy']:7.1f}%")
    if "balanced_accuracy" in a:  # a classifier
        print(f"balanced acc.{100 * b['balanced_accuracy']:7.1f}%   {100 * a['balanced_accuracy']:7.1f}%")
    if "reward_accuracy" in a:  # a preference objective
        print(f"reward acc.  {100 * b['reward_accuracy']:7.1f}%   {100 * a['reward_accuracy']:7.1f}%")
        print(f"reward margin{b['reward_margin']:8.3f}   {a['reward_margin']:8.3f}")
    if "f1" in a:  # a multi-label classifier
        print(f"F1 (micro)   {b['f1']:8.4f}   {a['f1']:8.4f}")
    if "pearson" in a:  # a regression
        print(f"Pearson      {b['pearson']:8.4f}   {a['pearson']:8.4f}")
        print(f"Spearman     {b['spearman']:8.4f}   {a['spearman']:8.4f}")
        from lorakit.train.embed_objective import measured_widths

        for d in measured_widths(a):  # an embedding model's scored pairs, its vectors cut short
            label = f"Sp. {d} dims"
            print(f"{label:13}{b[f'dim{d}_spearman']:8.4f}   {a[f'dim{d}_spearman']:8.4f}")
    if "mrr_at_10" in a:  # an embedding model, and its vectors cut short (embed.matryoshka_dims)
        print(f"MRR@10       {b['mrr_at_10']:8.4f}   {a['mrr_at_10']:8.4f}")
        from lorakit.train.embed_objective import measured_widths

        for d in measured_widths(a):
            label = f"acc. {d} dims"
            print(f"{label:13}{100 * b[f'dim{d}_accuracy']:7.1f}%   {100 * a[f'dim{d}_accuracy']:7.1f}%")
    if "kl" in a:  # KTO
        print(f"KL estimate  {b['kl']:8.4f}   {a['kl']:8.4f}")
    if "loss" in a:
        print(f"eval loss    {b['loss']:8.4f}   {a['loss']:8.4f}")
    else:
        print("eval loss         n/a        n/a   (no eval token left after truncation: raise data.max_len)")
    print(
        f"\n{summary['tokens'] / summary['train_seconds']:.0f} tokens/s over {summary['train_seconds']:.0f} s, "
        f"peak memory {summary['peak_rss_gb']:.2f} GB"
        + (
            f", peak GPU memory {summary['peak_gpu_gb']:.2f} GB"
            if summary.get("peak_gpu_gb") is not None
            else ""
        )
    )
    print(f"adapter:   {summary['adapter']}")
    print(f"run folder: {summary['run_dir']} (config.yaml, metrics.jsonl, loss.png, summary.json)")


def cmd_bench(argv: list[str]) -> int:
    """`lorakit bench` has no configure: its options are `lorakit.bench`'s own parser's, which gets `argv`."""
    from lorakit.bench import main as bench_main

    bench_main(argv, prog="lorakit bench")
    return 0
