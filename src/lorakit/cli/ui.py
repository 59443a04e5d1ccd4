"""`lorakit ui`: the web playground (`lorakit.ui`)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from lorakit.cli.common import MODEL_HELP, add_device
from lorakit.cliargs import positive_float, positive_int, tcp_port


def configure_ui(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=MODEL_HELP + "; runs train on it too")
    p.add_argument(
        "--workspace",
        default="playground",
        help="the folder the page works in, created if missing; every path it names stays inside "
        "(default: playground)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=tcp_port, default=7860, help="TCP port (default: 7860)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LORAKIT_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /api/* and /v1/* (the page asks for it; "
        "default: $LORAKIT_API_KEY)",
    )
    p.add_argument(
        "--max-upload-mb", type=positive_float, default=50.0, help="largest data upload, MB (default: 50)"
    )
    p.add_argument(
        "--max-model-len",
        type=positive_int,
        help="the chat's context length, prompt plus completion (default: the model's); a longer "
        "conversation leaves out its oldest turns",
    )
    add_device(p)


def cmd_ui(args: argparse.Namespace) -> int:
    from lorakit.ui import UIConfig, build, run

    cfg = UIConfig(
        workspace=args.workspace,
        model=args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_upload_mb=args.max_upload_mb,
        max_model_len=args.max_model_len,
        device=args.device,
        dtype=args.dtype,
    )
    t0 = time.perf_counter()
    app = build(cfg)
    print(
        f"lorakit ui: ready in {time.perf_counter() - t0:.1f} s; open http://{cfg.host}:{cfg.port}/ "
        f"(workspace {app.state.workspace.root})",
        file=sys.stderr,
        flush=True,
    )
    run(app, cfg, log_level="info" if args.verbose else "warning")
    return 0
