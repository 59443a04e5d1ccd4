"""`lorakit serve`: an OpenAI-compatible HTTP server for one base model and many LoRA adapters.

    from lorakit.serve import ServeConfig, build, run
    cfg = ServeConfig(adapters={"fr": "adapters/fr"}, adapter_root="adapters", api_key="sk-local")
    app = build(cfg)          # loads the model and the adapters; raises LorakitError on bad input
    run(app, cfg)             # uvicorn, until Ctrl-C

Needs fastapi and uvicorn (`pip install lorakit`, they are main dependencies). See docs/serve.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

DEFAULT_BASE_NAME = "SmolLM2-135M-Instruct"


@dataclass
class ServeConfig:
    """Settings of `lorakit serve`."""

    model: str | None = None
    """A Hugging Face model folder or a .gguf file (None: the bundled SmolLM2-135M-Instruct)."""
    adapters: dict[str, str] = field(default_factory=dict)
    """Adapters loaded at start-up, name -> folder (from anywhere: the operator chose them)."""
    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """If set, /v1/* requests need `Authorization: Bearer <api_key>`."""
    adapter_root: str | None = None
    """Allow loading adapters at runtime, only from under this folder (None: no runtime loading/unloading)."""
    load_on_demand: bool = False
    """A request whose model is no loaded adapter but a folder under `adapter_root` (`org/x`: ROOT/org/x) loads it
    first (with `max_adapters`, evicting the least recently used idle adapter)."""
    max_adapters: int | None = None
    """Most adapters resident at once; loading one more evicts the least recently used idle one."""
    served_model_name: str | None = None
    """The base model's id in the API (default: the model folder's name, or SmolLM2-135M-Instruct)."""
    max_batch: int = 8
    """Most requests decoded together in one batch."""
    wait_ms: float = 5.0
    """How long a request arriving at an idle server waits for others to batch with."""
    max_model_len: int | None = None
    """Context length, prompt plus completion (default: the model's max_position_embeddings)."""
    max_waiting: int = 1024
    """Most sequences queued for a place in the batch; a request that would queue more gets a 503 (try again)."""
    prefix_cache_mb: float = 1024
    """Most MiB of finished requests' KV cache kept, so that prompts that start the same way skip that start
    (a chat's next turn, a shared system prompt); 0 turns the prefix cache off."""
    prefill_chunk: int = 512
    """Most prompt tokens computed between two decode steps: longer prompts are prefilled a chunk per step, so
    that the answers streaming meanwhile pause for a chunk at a time; while nothing streams, prompts run whole
    (0: whole prompts at once)."""
    device: str = "auto"
    """Where the model runs: auto (a CUDA GPU if there is one), cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """The model's dtype: auto (bf16 on a GPU, and on a CPU with native bf16: lorakit.device; else fp32),
    float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_waiting < 1:
            raise ConfigError(f"--max-waiting must be at least 1, got {self.max_waiting}")
        if not 0 <= self.prefix_cache_mb < float("inf"):
            raise ConfigError(
                f"--prefix-cache-mb must be a number of MiB, 0 or more, got {self.prefix_cache_mb}"
            )
        if self.prefill_chunk < 0:
            raise ConfigError(f"--prefill-chunk must be 0 or more, got {self.prefill_chunk}")
        if self.wait_ms < 0:
            raise ConfigError(f"--wait-ms must be >= 0, got {self.wait_ms}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"--max-model-len must be at least 2, got {self.max_model_len}")
        if self.max_adapters is not None and self.max_adapters < len(self.adapters):
            raise ConfigError(
                f"--max-adapters {self.max_adapters} is less than the {len(self.adapters)} adapters given"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty")
        if self.load_on_demand and self.adapter_root is None:
            raise ConfigError("--load-on-demand needs --adapter-root DIR: the folder adapters load from")
        if self.adapter_root is not None and not Path(self.adapter_root).is_dir():
            raise ConfigError(f"--adapter-root {self.adapter_root!r} is not a folder")
        from lorakit.serve.names import adapter_name_problem

        for name in self.adapters:
            problem = adapter_name_problem(name)
            if problem:
                raise ConfigError(problem)
        if self.served_model_name is not None and self.served_model_name in self.adapters:
            raise ConfigError(f"adapter name {self.served_model_name!r} is also the base model's name")

    def base_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model is None:
            return DEFAULT_BASE_NAME
        path = Path(self.model)
        return path.stem if path.suffix.lower() == ".gguf" else path.resolve().name


def build(config: ServeConfig) -> FastAPI:
    """Load the model and the start-up adapters; return the FastAPI app (the engine starts with the app)."""
    from lorakit.bank import AdapterBank
    from lorakit.models import load_model, resolve_model_dir
    from lorakit.serve.app import AppConfig, create_app
    from lorakit.serve.engine import Engine, EngineConfig

    base = config.base_name()
    if base in config.adapters:
        raise ConfigError(
            f"adapter name {base!r} is also the base model's name; pick another (or --served-model-name)"
        )
    from lorakit.device import placement

    device, dtype = placement(config.device, config.dtype)
    model, tokenizer = load_model(config.model, dtype=dtype, device=device)
    bank = AdapterBank(model, max_adapters=config.max_adapters, heads=True)  # classifiers: /v1/classify
    for name, path in config.adapters.items():
        seconds = bank.load(name, Path(path).resolve())
        log.info("loaded adapter %r from %s in %.2f s", name, path, seconds)
    engine = Engine(
        model,
        tokenizer,
        bank,
        EngineConfig(
            max_batch=config.max_batch,
            wait_ms=config.wait_ms,
            max_model_len=config.max_model_len,
            prefix_cache_bytes=int(config.prefix_cache_mb * 2**20),
            prefill_chunk=config.prefill_chunk,
        ),
    )
    app_config = AppConfig(
        base_name=base,
        base_path=str(resolve_model_dir(config.model)),
        api_key=config.api_key,
        adapter_root=Path(config.adapter_root).resolve() if config.adapter_root else None,
        load_on_demand=config.load_on_demand,
        max_waiting=config.max_waiting,
    )
    if config.load_on_demand and config.max_adapters is None:
        log.warning(
            "--load-on-demand without --max-adapters: every adapter under the root a request names stays"
        )
    if config.api_key is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --api-key: anyone who can reach it can use it", config.host)
    return create_app(engine, app_config)


def run(app: FastAPI, config: ServeConfig, *, log_level: str = "warning") -> None:
    """Serve `app` with uvicorn until interrupted. Idle keep-alive connections stay open 30 s (uvicorn's default
    is 5 s): a client that pools connections, as the OpenAI SDK does, then rarely reuses one just as the server
    closes it, which it sees as a connection error.

    What is alive now (the model, its tokenizer, the start-up adapters: about 390,000 Python objects for
    SmolLM2) lives as long as the process, so the garbage collector is told to stop scanning it (`gc.freeze`, as
    vLLM and SGLang do after start-up). Without that, each full collection scanned all of it, a pause in decoding
    of about 0.1 s (4 ms after the freeze: benchmarks/bench_load.py), and loading adapters at run time triggers
    them now and then."""
    import gc

    import uvicorn

    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=30,
    )


__all__ = ["ServeConfig", "build", "run"]
