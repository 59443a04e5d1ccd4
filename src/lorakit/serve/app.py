"""The HTTP layer: an OpenAI-compatible FastAPI app in front of an `Engine`.

    app = create_app(engine, AppConfig(base_name="SmolLM2-135M-Instruct", base_path="...", api_key="sk-1"))

Routes: the generation routes of `lorakit.serve.generation` (POST /v1/completions and /v1/chat/completions, both
streaming with SSE; POST /tokenize and /detokenize), the classification route of `lorakit.serve.classify` (POST
/classify and /v1/classify: a reward model's or a classifier's scores), OpenAI's POST /v1/embeddings
(`lorakit.serve.embeddings`: an embedding model's adapter's vectors), the adapter routes of
`lorakit.serve.adapters`, GET /health and GET /metrics (Prometheus). The request's `model` names the adapter; the base model's name means no adapter.
Every error is JSON in OpenAI's shape, and nothing a client sends stops the server.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.serve import protocol as P
from lorakit.serve.adapters import AdapterRoutes
from lorakit.serve.classify import ClassifyRoutes
from lorakit.serve.embeddings import EmbeddingRoutes
from lorakit.serve.engine import Engine
from lorakit.serve.generation import GenerationRoutes
from lorakit.serve.inflight import ClientGone
from lorakit.serve.metrics import render as render_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppConfig:
    """What the HTTP layer needs besides the engine."""

    base_name: str
    """The id of the base model in /v1/models; a request naming it runs without an adapter."""
    base_path: str
    """Where the base model was loaded from (the `root` of its /v1/models entry)."""
    api_key: str | None = None
    """If set, /v1/* requests need `Authorization: Bearer <api_key>`."""
    adapter_root: Path | None = None
    """Runtime loading and unloading are allowed only when set, and loading only from under it."""
    load_on_demand: bool = False
    """A request naming a folder under `adapter_root` that is not loaded loads it first."""
    max_waiting: int = 1024
    """Most sequences queued behind a full batch: a request that would queue more gets a 503."""


def create_app(engine: Engine, config: AppConfig) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not engine.alive:
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine  # for what builds on this app (lorakit ui)
    app.add_exception_handler(P.APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
    adapters = AdapterRoutes(
        engine, config.base_name, config.base_path, config.adapter_root, load_on_demand=config.load_on_demand
    )
    generation = GenerationRoutes(engine, adapters, config.max_waiting)
    auth = [Depends(require_key(config.api_key))]
    app.add_api_route("/v1/completions", generation.completions, methods=["POST"], dependencies=auth)
    app.add_api_route(
        "/v1/chat/completions", generation.chat_completions, methods=["POST"], dependencies=auth
    )
    classify = ClassifyRoutes(engine, adapters, generation.latency)
    for path in ("/classify", "/v1/classify"):  # vLLM's path, SGLang's
        app.add_api_route(path, classify.classify, methods=["POST"], dependencies=auth)
    embeddings = EmbeddingRoutes(engine, adapters, generation.latency)
    app.add_api_route("/v1/embeddings", embeddings.embeddings, methods=["POST"], dependencies=auth)
    app.add_api_route("/tokenize", generation.tokenize, methods=["POST"], dependencies=auth)
    app.add_api_route("/detokenize", generation.detokenize, methods=["POST"], dependencies=auth)
    app.include_router(adapters.router(), dependencies=auth)

    @app.get("/metrics")
    async def metrics() -> Response:
        text = render_metrics(engine, generation.latency, adapters.on_demand_loads)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        body = {"status": "ok" if ok else "engine stopped", **engine.load(), **engine.stats}
        body["on_demand_loads"] = adapters.on_demand_loads
        return JSONResponse(body, status_code=200 if ok else 503)

    return app


# -- errors and auth -------------------------------------------------------------------------------------------


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, P.APIError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    what = {404: "no route", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    err = P.APIError(exc.status_code, f"{what}: {request.method} {request.url.path}", str(exc.status_code))
    return JSONResponse(err.body(), status_code=exc.status_code)


async def _client_gone(request: Request, _: Exception) -> Response:
    log.info("client went away: %s %s cancelled", request.method, request.url.path)
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    err = P.APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
    return JSONResponse(err.body(), status_code=500)


def require_key(api_key: str | None) -> Callable:
    """A FastAPI dependency: with `api_key` set, a request without `Authorization: Bearer <api_key>` gets a 401."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise P.APIError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key"
            )

    return check
