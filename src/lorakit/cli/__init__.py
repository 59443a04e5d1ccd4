"""`lorakit` command line: a table from subcommand to one library function. Prints; the library logs.

Each subcommand's module holds, side by side, `configure_X(parser)`, which adds the options, and `cmd_X(args)`,
which makes the call and prints. `COMMANDS` maps each name to (help, configure, run), in `lorakit --help`'s
order; adding a subcommand is one entry there. Heavy modules are imported inside the `cmd_` functions, so that
`lorakit --help` stays quick.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from lorakit.cli import adapters, cache, generate, serve, train, ui
from lorakit.cliargs import OneLineParser, os_error_line
from lorakit.errors import LorakitError


class Command(NamedTuple):
    help: str
    configure: Callable[[argparse.ArgumentParser], None] | None
    """Adds the subcommand's options. None: `run` gets the raw arguments and parses them itself (bench)."""
    run: Callable[[Any], int]
    extra: bool = False
    """The arguments its parser does not know reach `run` as `args.extra` (train's overrides); else an error."""


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "inject LoRA into the default model, train a few steps, save, reload, generate",
        train.configure_demo,
        train.cmd_demo,
    ),
    "train": Command(
        "fine-tune a LoRA adapter (default: SmolLM2-135M-Instruct on the built-in 'dates' task)",
        train.configure_train,
        train.cmd_train,
        extra=True,
    ),
    "inspect": Command(
        "show what an adapter or a LoRA on a model adapts: r·(d+k) vs d·k per layer",
        adapters.configure_inspect,
        adapters.cmd_inspect,
    ),
    "merge": Command(
        "merge an adapter into its base and write a plain Hugging Face model folder",
        adapters.configure_merge,
        adapters.cmd_merge,
    ),
    "export": Command(
        "export an adapter (or the merged model) for on-device runtimes: lorakit export gguf (docs/gguf.md)",
        adapters.configure_export,
        adapters.cmd_export,
    ),
    "extract": Command(
        "extract a LoRA adapter from a fully fine-tuned model: ΔW to its base, truncated by SVD (docs/extract.md)",
        adapters.configure_extract,
        adapters.cmd_extract,
    ),
    "convert": Command(
        "write an adapter as plain PEFT LoRA: a DyLoRA one at rank b (docs/dylora.md), a KaSA or BD-LoRA one as "
        "the LoRA pair of its change to W0 (docs/peft-features.md)",
        adapters.configure_convert,
        adapters.cmd_convert,
    ),
    "eval": Command(
        "eval loss and exact-match accuracy of a model (+ adapter) on a data file (JSONL, JSON, CSV, "
        "Parquet, a datasets folder)",
        generate.configure_eval,
        generate.cmd_eval,
    ),
    "generate": Command(
        "generate text with the chat template, optionally with adapters",
        generate.configure_generate,
        generate.cmd_generate,
    ),
    "bench": Command(
        "time a LoRA training step against PEFT and the frozen-base bound (lorakit bench --help)",
        None,
        train.cmd_bench,
    ),
    "combine": Command(
        "combine adapters into a new adapter: cat, linear, svd, ties, dare_*, magnitude_prune",
        adapters.configure_combine,
        adapters.cmd_combine,
    ),
    "serve": Command(
        "serve the model and adapters over an OpenAI-compatible HTTP API",
        serve.configure_serve,
        serve.cmd_serve,
    ),
    "ui": Command(
        "a web playground: train with live curves, chat side by side, manage adapters (docs/ui.md)",
        ui.configure_ui,
        ui.cmd_ui,
    ),
    "cache": Command(
        "list lorakit's cache (converted models, kernels) and clean what nothing needs any more",
        cache.configure_cache,
        cache.cmd_cache,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="lorakit", description="Low-Rank Adaptation toolkit (PEFT-compatible adapters).")
    p.add_argument("-v", "--verbose", action="store_true", help="log library messages at INFO level")
    sub = p.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        parser = sub.add_parser(name, help=command.help, add_help=command.configure is not None)
        if command.configure is not None:
            command.configure(parser)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    command = COMMANDS[args.command]
    if command.configure is None:  # bench: its options belong to its own parser
        return command.run(rest)
    if rest and not command.extra:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.extra = rest
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return command.run(args)
    except LorakitError as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the system refused a file (permissions, a folder for a file, ...): name it
        if args.verbose:
            raise
        print(f"lorakit {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the training loop (which saves a checkpoint and raises LorakitError)
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
