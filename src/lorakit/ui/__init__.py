"""`lorakit ui`: a web playground on one page. Train with live curves, chat with the base and adapters side by
side, manage the adapter collection, evaluate. See docs/ui.md.

    from lorakit.ui import UIConfig, build, run
    cfg = UIConfig(workspace="playground", port=7860)
    app = build(cfg)     # loads the model (lorakit serve's engine), opens the workspace
    run(app, cfg)        # uvicorn until Ctrl-C; live training runs then write a checkpoint and stop

It is `lorakit serve` (same engine, same OpenAI API, same key) with the workspace as the adapter root, plus the
page (static files inside the package: nothing loads from the internet) and its /api routes. Training,
evaluation and export run in subprocesses of `lorakit`, so the page stays responsive and their crashes stay
theirs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)
LOCK = ".ui.json"
"""In the workspace: which `lorakit ui` process uses it (one at a time; lorakit.ui.procs.claim)."""


@dataclass
class UIConfig:
    """Settings of `lorakit ui`."""

    workspace: str = "playground"
    """The folder the page works in (created if missing): uploads, runs, combined adapters, exports. Every path
    the page names must stay inside it."""
    model: str | None = None
    """A Hugging Face model folder or a .gguf file (None: the bundled SmolLM2-135M-Instruct). Runs train on it."""
    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = 7860
    """TCP port."""
    api_key: str | None = None
    """If set, /api/* and /v1/* requests need `Authorization: Bearer <api_key>` (the page asks for it)."""
    max_upload_mb: float = 50.0
    """Largest data file the page may upload."""
    max_batch: int = 8
    """Most chat requests decoded together in one batch."""
    wait_ms: float = 50.0
    """How long a chat request waits for the others sent with it, to share one mixed batch."""
    max_model_len: int | None = None
    """The chat's context length, prompt plus completion (None: the model's max_position_embeddings). A
    conversation that outgrows it leaves out its oldest turns."""
    device: str = "auto"
    """Where the chat model runs: auto, cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """The chat model's dtype: auto, float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        if self.max_upload_mb <= 0:
            raise ConfigError(f"--max-upload-mb must be > 0, got {self.max_upload_mb}")
        ws = Path(self.workspace)
        if ws.exists() and not ws.is_dir():
            raise ConfigError(f"--workspace {self.workspace!r} exists and is not a folder")


def build(config: UIConfig) -> FastAPI:
    """Load the model, open the workspace, and return the app (serve's, plus the page and /api)."""
    from lorakit.serve import ServeConfig
    from lorakit.serve import build as build_serve
    from lorakit.ui.app import Settings, add_ui
    from lorakit.ui.jobs import Jobs
    from lorakit.ui.procs import WorkspaceBusy, claim, release
    from lorakit.ui.runs import Runs
    from lorakit.ui.workspace import Workspace

    ws = Workspace(config.workspace)
    try:
        claim(ws.root / LOCK)
    except WorkspaceBusy as e:
        raise ConfigError(
            f"--workspace {str(ws.root)!r} is in use by another lorakit ui ({e}): stop it, or give another "
            "--workspace"
        ) from None
    serve = ServeConfig(
        model=config.model,
        host=config.host,
        port=config.port,
        api_key=config.api_key,
        adapter_root=str(ws.root),
        max_batch=config.max_batch,
        wait_ms=config.wait_ms,
        max_model_len=config.max_model_len,
        device=config.device,
        dtype=config.dtype,
    )
    try:
        app = build_serve(serve)
    except BaseException:
        release(ws.root / LOCK)
        raise
    model = str(Path(config.model).resolve()) if config.model else None
    # runs train the model the page chats with, on its device and in its dtype, unless the form says otherwise
    train_args = ["--model.path", model] if model else []
    train_args += ["--model.device", config.device] if config.device != "auto" else []
    train_args += ["--model.dtype", config.dtype] if config.dtype != "auto" else []
    runs = Runs(ws, train_args=train_args)
    jobs = Jobs(ws)
    settings = Settings(serve.base_name(), model, config.api_key, config.max_upload_mb)
    add_ui(app, app.state.engine, ws, runs, jobs, settings)
    app.state.runs, app.state.jobs, app.state.workspace = runs, jobs, ws
    return app


def run(app: FastAPI, config: UIConfig, *, log_level: str = "warning") -> None:
    """Serve until interrupted; then live runs write a checkpoint and stop (resumable from the page)."""
    from lorakit.serve import ServeConfig
    from lorakit.serve import run as run_serve
    from lorakit.ui.procs import release

    try:
        run_serve(app, ServeConfig(host=config.host, port=config.port), log_level=log_level)
    finally:
        app.state.jobs.shutdown()
        app.state.runs.shutdown()
        release(app.state.workspace.root / LOCK)


__all__ = ["UIConfig", "build", "run"]
