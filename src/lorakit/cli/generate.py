"""`lorakit generate` and `lorakit eval`: the commands that run a model (with adapters) on text."""

from __future__ import annotations

import argparse

from lorakit.cli.common import MODEL_HELP, add_allow_pickle, add_device, load
from lorakit.cliargs import non_negative, positive_int


def configure_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument(
        "--adapter", action="append", help="adapter folder (or a GGUF LoRA file); repeat to activate several"
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative, default=0.0, help="0 = greedy (default)")
    p.add_argument("--no-chat", action="store_true", help="feed the prompt raw, without the chat template")
    add_device(p)
    add_allow_pickle(p, several=True)


def cmd_generate(args: argparse.Namespace) -> int:
    import lorakit
    from lorakit.generate import generate

    model, tok = load(args.model, args.device, args.dtype)
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


def configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", required=True, help="JSONL file: {prompt,completion}, {messages} or {text} per line"
    )
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--adapter", help="adapter folder (PEFT layout) or a GGUF LoRA file")
    p.add_argument(
        "--max-len", type=positive_int, default=256, help="maximum tokens per example (default: 256)"
    )
    p.add_argument(
        "--limit", type=positive_int, default=100, help="examples generated for accuracy (default: 100)"
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    add_device(p)
    add_allow_pickle(p)


def cmd_eval(args: argparse.Namespace) -> int:
    import lorakit
    from lorakit.data.jsonl import read_jsonl
    from lorakit.data.tokenize import encode_dataset
    from lorakit.train.evaluate import eval_loss, exact_match

    examples = read_jsonl(args.data)
    model, tok = load(args.model, args.device, args.dtype)
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
