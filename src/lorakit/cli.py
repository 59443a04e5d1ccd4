"""`lorakit` command line: a thin map from subcommand to one library function. Prints; the library logs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from lorakit.cliargs import OneLineParser, non_negative, os_error_line, positive_int, tcp_port
from lorakit.errors import LorakitError

MODEL_HELP = "a Hugging Face model folder or a .gguf file (default: the bundled SmolLM2-135M-Instruct)"


def _load(model_spec: str | None):
    from lorakit.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(model_spec)
    print(
        f"loaded {model_spec or 'SmolLM2-135M-Instruct (default)'} in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return model, tok


def cmd_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lorakit.demo import ANSWER, QUESTION, run_demo
    from lorakit.models import load_model
    from lorakit.report import format_report

    model, tok = _load(args.model)
    bar = tqdm(total=args.steps, desc="LoRA demo training", unit="step")

    def on_step(step: int, loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(1)

    result = run_demo(
        model, tok, args.out, steps=args.steps, on_step=on_step, reload=lambda: load_model(args.model)
    )
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


def cmd_inspect(args: argparse.Namespace) -> int:
    import lorakit

    target = Path(args.target) if args.target else None
    is_adapter = target is not None and (target / "adapter_config.json").exists()  # even a broken one
    if target is not None and args.model is None and not args.apply and lorakit.is_ladder_folder(target):
        info = lorakit.describe_adapter(target)
        print(json.dumps(info, indent=2, default=str) if args.json else lorakit.format_ladder(info))
        return 0
    if is_adapter and args.model is None and not args.apply:
        info = lorakit.describe_adapter(target)
        if args.json:
            print(json.dumps({**info, "config": info["config"].to_peft_dict()}, indent=2, default=str))
            return 0
        _print_adapter(info)
        base_q = lorakit.quant.adapter_base_quantization(target)
        if base_q:
            print(f"trained on a 4-bit base: {json.dumps(base_q, sort_keys=True)}")
        return 0
    model_spec = args.model if target is None or is_adapter else str(target)
    if args.quantize:  # straight into 4 bits, as lorakit train --model.quantize does
        model, _, qreport = lorakit.load_quantized(model_spec, method=args.quantize)
        print(qreport.summary())
    else:
        model, _ = _load(model_spec)
    if is_adapter:
        lorakit.load_adapter(model, target)
    else:
        lorakit.inject(model, lorakit.LoraConfig(r=args.r, alpha=args.r, targets=_targets(args.targets)))
        print(f"(what a LoRA of r={args.r} on {args.targets} would add)")
    report = lorakit.parameter_report(model)
    print(json.dumps(report, indent=2) if args.json else lorakit.format_report(report, max_rows=args.rows))
    return 0


def _print_adapter(info: dict) -> None:
    cfg = info["config"]
    print(
        f"LoRA adapter: r={cfg.r} alpha={cfg.alpha} rslora={cfg.use_rslora} dora={cfg.use_dora} init={cfg.init} "
        f"bias={cfg.bias}"
    )
    print(f"targets: {cfg.targets}  base model: {cfg.base_model}")
    print(f"{'module':<52} {'r':>4} {'d':>6} {'k':>6} {'d·k':>10} {'r·(d+k)':>9}")
    full = lora = 0
    for module, shapes in sorted(info["modules"].items()):
        r, k = shapes["lora_A"][0], _prod(shapes["lora_A"][1:])
        d = shapes["lora_B"][0]
        full, lora = full + d * k, lora + r * (d + k)
        print(f"{module[-52:]:<52} {r:>4} {d:>6} {k:>6} {d * k:>10,} {r * (d + k):>9,}")
    print(
        f"{len(info['modules'])} modules, {info['parameters']:,} parameters in {info['tensors']} tensors; "
        f"adapted weights {full:,} -> {lora:,} ({full / max(lora, 1):.1f}x fewer)"
    )


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _targets(spec: str) -> str | list[str]:
    return (
        spec
        if spec == "all-linear" or not spec.replace("_", "").replace(",", "").isalnum()
        else spec.split(",")
    )


def cmd_merge(args: argparse.Namespace) -> int:
    from lorakit.export import merge_to_folder

    out = merge_to_folder(args.model, args.adapter, args.out, allow_pickle=args.allow_pickle)
    print(f"merged {args.adapter} into {args.model or 'the default model'}; wrote {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from lorakit.variants.dylora import export_rank

    out = export_rank(args.adapter, args.rank, args.out)
    print(f"wrote {args.adapter} at rank {args.rank} as a PEFT LoRA adapter: {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import lorakit
    from lorakit.generate import generate

    model, tok = _load(args.model)
    for i, path in enumerate(args.adapter or []):
        lorakit.load_adapter(model, path, f"a{i}", allow_pickle=args.allow_pickle)
    if args.adapter and len(args.adapter) > 1:
        lorakit.set_active(model, [f"a{i}" for i in range(len(args.adapter))])
    print(
        generate(
            model,
            tok,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            chat=not args.no_chat,
            temperature=args.temperature,
        )
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lorakit.train.config import load_config
    from lorakit.train.run import run_training

    cfg = load_config(args.config, args.overrides)
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
            bars[0].set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            bars[0].refresh()
        elif "eval_loss" in rec:
            tqdm.write(
                f"step {rec['step']}: eval loss {rec['eval_loss']:.4f}"
                + (f", accuracy {100 * rec['eval_accuracy']:.1f}%" if "eval_accuracy" in rec else "")
            )

    try:
        summary = run_training(cfg, callbacks=[on_record], say=tqdm.write)
    finally:
        for bar in bars:
            bar.close()
    if "rank" in summary:  # torchrun: only rank 0 reports
        return 0
    b, a = summary["before"], summary["after"]
    print("\n               before      after")
    if "accuracy" in a:
        print(f"accuracy     {100 * b['accuracy']:7.1f}%   {100 * a['accuracy']:7.1f}%")
    if "loss" in a:
        print(f"eval loss    {b['loss']:8.4f}   {a['loss']:8.4f}")
    else:
        print("eval loss         n/a        n/a   (no eval token left after truncation: raise data.max_len)")
    print(
        f"\n{summary['tokens'] / summary['train_seconds']:.0f} tokens/s over {summary['train_seconds']:.0f} s, "
        f"peak memory {summary['peak_rss_gb']:.2f} GB"
    )
    print(f"adapter:   {summary['adapter']}")
    print(f"run folder: {summary['run_dir']} (config.yaml, metrics.jsonl, loss.png, summary.json)")
    return 0


def cmd_bench(argv: list[str]) -> int:
    from lorakit.bench import main as bench_main

    bench_main(argv, prog="lorakit bench")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import lorakit
    from lorakit.data.jsonl import read_jsonl
    from lorakit.data.tokenize import encode_dataset
    from lorakit.train.evaluate import eval_loss, exact_match

    examples = read_jsonl(args.data)
    model, tok = _load(args.model)
    if args.adapter:
        lorakit.load_adapter(model, args.adapter, allow_pickle=args.allow_pickle)
    rows, stats = encode_dataset(tok, examples, max_len=args.max_len, chat=not args.no_chat)
    print(f"{len(rows)} examples ({stats['truncated']} truncated to {args.max_len} tokens)")
    loss = eval_loss(model, rows, tok.pad_token_id)
    print(
        f"eval loss: {loss:.4f}"
        if loss is not None
        else f"eval loss: n/a (no example has a token left to evaluate after truncation to {args.max_len} tokens)"
    )
    acc, samples = exact_match(
        model, tok, examples[: args.limit], max_new_tokens=args.max_new_tokens, chat=not args.no_chat
    )
    if acc is not None:
        print(f"exact-match accuracy: {100 * acc:.1f}% on {len(samples)} examples")
        for s in samples[:3]:
            print(f"  expected {s['expected']!r}, got {s['got']!r}")
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    from lorakit.combine import combine

    out = combine(
        args.adapters,
        args.weights,
        args.method,
        args.out,
        density=args.density,
        svd_rank=args.svd_rank,
        majority_sign_method=args.majority_sign,
        seed=args.seed,
        allow_missing=args.allow_missing,
        ignore_base_model=args.ignore_base_model,
        allow_pickle=args.allow_pickle,
    )
    print(f"combined {len(args.adapters)} adapters with {args.method}; wrote {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lorakit.errors import ConfigError
    from lorakit.serve import ServeConfig, build, run

    adapters: dict[str, str] = {}
    for spec in args.adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {spec!r}: expected NAME=DIR")
        if name in adapters:
            raise ConfigError(f"--adapter {name!r} is given twice")
        adapters[name] = path
    cfg = ServeConfig(
        model=args.model,
        adapters=adapters,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        adapter_root=args.adapter_root,
        max_adapters=args.max_adapters,
        served_model_name=args.served_model_name,
        max_batch=args.max_batch,
        wait_ms=args.wait_ms,
        max_model_len=args.max_model_len,
    )
    t0 = time.perf_counter()
    app = build(cfg)
    print(
        f"lorakit serve: {cfg.base_name()} + adapters {list(adapters)} ready in {time.perf_counter() - t0:.1f} s; "
        f"listening on http://{cfg.host}:{cfg.port}/v1"
        + (f", runtime loading from {cfg.adapter_root}" if cfg.adapter_root else ""),
        file=sys.stderr,
        flush=True,
    )
    run(app, cfg, log_level="info" if args.verbose else "warning")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="lorakit", description="Low-Rank Adaptation toolkit (PEFT-compatible adapters).")
    p.add_argument("-v", "--verbose", action="store_true", help="log library messages at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo", help="inject LoRA into the default model, train a few steps, save, reload, generate"
    )
    d.add_argument("--model", help=MODEL_HELP)
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    d.add_argument("--steps", type=positive_int, default=30, help="training steps (default: 30)")
    d.set_defaults(func=cmd_demo)

    from lorakit.train.config import help_text

    t = sub.add_parser(
        "train",
        help="fine-tune a LoRA adapter (default: SmolLM2-135M-Instruct on the built-in 'dates' task)",
        usage="lorakit train [CONFIG.yaml] [--section.key value ...] [--model PATH] [--method NAME]",
        epilog="settings (YAML sections; override any with --section.key value; --model PATH is short for\n"
        "--model.path PATH, --method NAME for --train.method NAME):\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.set_defaults(func=cmd_train)

    i = sub.add_parser(
        "inspect", help="show what an adapter or a LoRA on a model adapts: r·(d+k) vs d·k per layer"
    )
    i.add_argument(
        "target", nargs="?", help="an adapter folder, or a model (folder/.gguf); default: the default model"
    )
    i.add_argument("--model", help="apply the adapter to this model and report trainable vs total parameters")
    i.add_argument("--apply", action="store_true", help="apply the adapter to the default model and report")
    i.add_argument(
        "--r", type=positive_int, default=8, help="rank for a hypothetical LoRA on a model (default: 8)"
    )
    i.add_argument(
        "--targets", default="all-linear", help="targets for a hypothetical LoRA, comma-separated or a regex"
    )
    i.add_argument("--rows", type=positive_int, default=40, help="table rows to print (default: 40)")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--quantize", choices=["nf4"], help="quantize to 4 bits first (QLoRA): bits/param")
    i.set_defaults(func=cmd_inspect)

    m = sub.add_parser(
        "merge", help="merge an adapter into its base and write a plain Hugging Face model folder"
    )
    m.add_argument("--model", help=MODEL_HELP)
    m.add_argument("--adapter", required=True, help="adapter folder (PEFT layout)")
    m.add_argument("--out", required=True, help="output folder for the merged model")
    m.add_argument(
        "--allow-pickle", action="store_true", help="accept a pickled adapter_model.bin (weights_only)"
    )
    m.set_defaults(func=cmd_merge)

    cv = sub.add_parser(
        "convert", help="export a DyLoRA adapter at rank b as a plain PEFT LoRA adapter (docs/dylora.md)"
    )
    cv.add_argument("--adapter", required=True, help="DyLoRA adapter folder (trained with --method dylora)")
    cv.add_argument("--rank", type=int, required=True, help="rank b of the exported adapter, 1..r_max")
    cv.add_argument("--out", required=True, help="output adapter folder (written atomically)")
    cv.set_defaults(func=cmd_convert)

    e = sub.add_parser(
        "eval", help="eval loss and exact-match accuracy of a model (+ adapter) on a JSONL file"
    )
    e.add_argument(
        "--data", required=True, help="JSONL file: {prompt,completion}, {messages} or {text} per line"
    )
    e.add_argument("--model", help=MODEL_HELP)
    e.add_argument("--adapter", help="adapter folder (PEFT layout)")
    e.add_argument(
        "--max-len", type=positive_int, default=256, help="maximum tokens per example (default: 256)"
    )
    e.add_argument(
        "--limit", type=positive_int, default=100, help="examples generated for accuracy (default: 100)"
    )
    e.add_argument("--max-new-tokens", type=positive_int, default=32)
    e.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    e.add_argument(
        "--allow-pickle", action="store_true", help="accept a pickled adapter_model.bin (weights_only)"
    )
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text with the chat template, optionally with adapters")
    g.add_argument("prompt")
    g.add_argument("--model", help=MODEL_HELP)
    g.add_argument("--adapter", action="append", help="adapter folder; repeat to activate several")
    g.add_argument("--max-new-tokens", type=positive_int, default=64)
    g.add_argument("--temperature", type=non_negative, default=0.0, help="0 = greedy (default)")
    g.add_argument("--no-chat", action="store_true", help="feed the prompt raw, without the chat template")
    g.add_argument(
        "--allow-pickle", action="store_true", help="accept pickled adapter_model.bin files (weights_only)"
    )
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser(
        "bench",
        help="time a LoRA training step against PEFT and the frozen-base bound (lorakit bench --help)",
        add_help=False,
    )
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser(
        "combine", help="combine adapters into a new adapter: cat, linear, svd, ties, dare_*, magnitude_prune"
    )
    c.add_argument("adapters", nargs="+", help="adapter folders (PEFT layout) to combine")
    c.add_argument("--out", required=True, help="output adapter folder (written atomically)")
    c.add_argument(
        "--method",
        required=True,
        help="cat (exact), linear, svd, ties, dare_linear, dare_ties or magnitude_prune (docs/combine.md)",
    )
    c.add_argument(
        "--weights", type=float, nargs="+", help="one weight per adapter, may be negative (default: 1 each)"
    )
    c.add_argument(
        "--density", type=float, help="fraction of ΔW entries kept, in (0, 1]: ties, dare_*, magnitude_prune"
    )
    c.add_argument(
        "--svd-rank", type=int, help="rank after the SVD (default: the largest source rank per module)"
    )
    c.add_argument(
        "--majority-sign", default="total", help="TIES sign election: total (default) or frequency"
    )
    c.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks (default: 0)")
    c.add_argument(
        "--allow-missing", action="store_true", help="a module missing from an adapter counts as ΔW = 0"
    )
    c.add_argument(
        "--ignore-base-model", action="store_true", help="combine adapters whose configs name different bases"
    )
    c.add_argument(
        "--allow-pickle", action="store_true", help="accept pickled adapter_model.bin files (weights_only)"
    )
    c.set_defaults(func=cmd_combine)

    s = sub.add_parser("serve", help="serve the model and adapters over an OpenAI-compatible HTTP API")
    s.add_argument("--model", help=MODEL_HELP)
    s.add_argument(
        "--adapter", action="append", metavar="NAME=DIR", help="adapter to serve as model NAME; repeatable"
    )
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=tcp_port, default=8000, help="TCP port (default: 8000)")
    s.add_argument(
        "--api-key",
        default=os.environ.get("LORAKIT_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $LORAKIT_API_KEY)",
    )
    s.add_argument(
        "--adapter-root",
        help="allow /v1/load_lora_adapter and unloading, loading only from under this folder",
    )
    s.add_argument("--max-adapters", type=positive_int, help="most adapters resident at once (LRU eviction)")
    s.add_argument("--served-model-name", help="the base model's id (default: the model folder's name)")
    s.add_argument(
        "--max-batch", type=positive_int, default=8, help="most requests decoded together (default: 8)"
    )
    s.add_argument(
        "--wait-ms",
        type=non_negative,
        default=5.0,
        help="batching window of an idle server, ms (default: 5)",
    )
    s.add_argument("--max-model-len", type=positive_int, help="context length (default: the model's)")
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":  # options belong to lorakit.bench's own parser
        return args.func(rest)
    if args.command == "train":  # lorakit train [CONFIG.yaml] [--section.key value ...]
        has_config = bool(rest) and not rest[0].startswith("--")
        args.config, args.overrides = (rest[0], rest[1:]) if has_config else (None, rest)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except LorakitError as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (
        OSError
    ) as e:  # the system refused a file (permissions, a folder for a file, ...): its one line names it
        if args.verbose:
            raise
        print(f"lorakit {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the training loop (which saves a checkpoint and raises LorakitError)
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
