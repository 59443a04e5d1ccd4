"""`lorakit serve`: the model and adapters behind an OpenAI-compatible HTTP API (`lorakit.serve`)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from lorakit.cli.common import MODEL_HELP, add_device
from lorakit.cliargs import non_negative, non_negative_int, positive_int, tcp_port


def configure_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument(
        "--adapter", action="append", metavar="NAME=DIR", help="adapter to serve as model NAME; repeatable"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=tcp_port, default=8000, help="TCP port (default: 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LORAKIT_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $LORAKIT_API_KEY)",
    )
    p.add_argument(
        "--adapter-root",
        help="allow /v1/load_lora_adapter and unloading, loading only from under this folder",
    )
    p.add_argument(
        "--load-on-demand",
        action="store_true",
        help="a request naming no loaded adapter but a folder under --adapter-root (model org/x: ROOT/org/x) "
        "loads it first",
    )
    p.add_argument("--max-adapters", type=positive_int, help="most adapters resident at once (LRU eviction)")
    p.add_argument("--served-model-name", help="the base model's id (default: the model folder's name)")
    p.add_argument(
        "--max-batch", type=positive_int, default=8, help="most requests decoded together (default: 8)"
    )
    p.add_argument(
        "--wait-ms",
        type=non_negative,
        default=5.0,
        help="batching window of an idle server, ms (default: 5)",
    )
    p.add_argument("--max-model-len", type=positive_int, help="context length (default: the model's)")
    p.add_argument(
        "--max-waiting",
        type=positive_int,
        default=1024,
        help="most sequences queued behind a full batch; more get a 503 to retry (default: 1024)",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=non_negative,
        default=1024.0,
        help="MiB of finished requests' KV cache kept for prompts that start the same way, such as a chat's "
        "next turn (default: 1024; 0: off)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=non_negative_int,
        default=512,
        help="most prompt tokens computed between two decode steps: a longer prompt is prefilled a chunk per "
        "step, so that streaming answers pause for a chunk at a time; while nothing streams, prompts run whole "
        "(default: 512; 0: whole prompts)",
    )
    add_device(p)


def cmd_serve(args: argparse.Namespace) -> int:
    from lorakit.serve import ServeConfig, build, run

    adapters = _adapters(args.adapter or [])
    cfg = ServeConfig(
        model=args.model,
        adapters=adapters,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        adapter_root=args.adapter_root,
        load_on_demand=args.load_on_demand,
        max_adapters=args.max_adapters,
        served_model_name=args.served_model_name,
        max_batch=args.max_batch,
        wait_ms=args.wait_ms,
        max_model_len=args.max_model_len,
        max_waiting=args.max_waiting,
        prefix_cache_mb=args.prefix_cache_mb,
        prefill_chunk=args.prefill_chunk,
        device=args.device,
        dtype=args.dtype,
    )
    t0 = time.perf_counter()
    app = build(cfg)
    print(
        f"lorakit serve: {cfg.base_name()} + adapters {list(adapters)} ready in {time.perf_counter() - t0:.1f} s; "
        f"listening on http://{cfg.host}:{cfg.port}/v1"
        + (f", runtime loading from {cfg.adapter_root}" if cfg.adapter_root else "")
        + (" (on demand)" if cfg.load_on_demand else ""),
        file=sys.stderr,
        flush=True,
    )
    run(app, cfg, log_level="info" if args.verbose else "warning")
    return 0


def _adapters(specs: list[str]) -> dict[str, str]:
    """NAME=DIR specs as {name: dir}, each name once."""
    from lorakit.errors import ConfigError

    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {spec!r}: expected NAME=DIR")
        if name in adapters:
            raise ConfigError(f"--adapter {name!r} is given twice")
        adapters[name] = path
    return adapters
