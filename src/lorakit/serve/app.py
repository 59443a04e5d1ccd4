"""The HTTP layer: an OpenAI-compatible FastAPI app in front of an `Engine`.

    app = create_app(engine, AppConfig(base_name="SmolLM2-135M-Instruct", base_path="...", api_key="sk-1"))

Routes: POST /v1/completions and /v1/chat/completions (both stream with SSE), GET /health, and the adapter
routes of `lorakit.serve.adapters`. The request's `model` names the adapter; the base model's name means no
adapter. Handlers validate and tokenize, then hand the request to the engine thread and read its tokens back
from an asyncio queue the engine feeds (`loop.call_soon_threadsafe`). Every error is JSON in OpenAI's shape, and
nothing a client sends stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.serve import protocol as P
from lorakit.serve.adapters import AdapterRoutes
from lorakit.serve.engine import Engine
from lorakit.serve.requests import Delta, Done, Event, Failed, GenRequest, Prompt, TokenLogprob

log = logging.getLogger(__name__)
T = TypeVar("T")
DISCONNECT_POLL_S = 0.2
"""How often a handler waiting for the engine checks whether its client is still there."""


class ClientGone(Exception):
    """The client closed the connection before its answer was ready; its request was cancelled."""


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
    adapters = AdapterRoutes(engine, config.base_name, config.base_path, config.adapter_root)
    generation = GenerationRoutes(engine, adapters)
    auth = [Depends(require_key(config.api_key))]
    app.add_api_route("/v1/completions", generation.completions, methods=["POST"], dependencies=auth)
    app.add_api_route(
        "/v1/chat/completions", generation.chat_completions, methods=["POST"], dependencies=auth
    )
    app.include_router(adapters.router(), dependencies=auth)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        body = {"status": "ok" if ok else "engine stopped", **engine.load(), **engine.stats}
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


# -- generation ------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """A request handed to the engine: its events arrive on `events`; `first` is already taken from it."""

    req: GenRequest
    events: asyncio.Queue
    first: Event
    model: str  # the name answered in responses

    async def events_until_done(self) -> AsyncIterator[Event]:
        """`first`, then the rest, up to and including Done or Failed."""
        event = self.first
        while True:
            yield event
            if isinstance(event, (Done, Failed)):
                return
            event = await self.events.get()


class GenerationRoutes:
    def __init__(self, engine: Engine, adapters: AdapterRoutes) -> None:
        self.engine, self.adapters, self.tok = engine, adapters, engine.tokenizer

    async def completions(self, request: Request) -> Response:
        parsed = P.parse_completion(await P.read_json(request))
        run = await self._start(parsed, request)
        rid = P.new_id("cmpl")
        wanted, token_text = run.req.params.logprobs is not None, self._token_text()
        echoed = (
            await asyncio.to_thread(self._prompt_text, parsed, run.req.prompt_ids) if parsed.echo else None
        )
        if parsed.stream:
            offset = 0  # text_offset continues across chunks

            def chunk(text: str, finish: str | None, entries: tuple[TokenLogprob, ...] = ()) -> dict:
                nonlocal offset
                lps = P.completion_logprobs(entries, token_text, offset) if wanted else None
                offset += sum(len(t) for t in lps["tokens"]) if lps else 0
                return P.completion_body(rid, run.model, text, finish, None, lps)

            stream = self._stream(run, rid, chunk, parsed.include_usage, chat=False, echoed=echoed)
            return _sse_response(stream)
        text, done, entries = await _unless_gone(request, run.req, _collect(run))
        use = P.usage(done.prompt_tokens, done.completion_tokens)
        if echoed is not None:
            text = echoed + text
        lps = P.completion_logprobs(entries, token_text) if wanted else None
        return JSONResponse(P.completion_body(rid, run.model, text, done.finish_reason, use, lps))

    def _prompt_text(self, parsed: P.Parsed, ids: list[int]) -> str:
        """What `echo` puts first: the prompt as given, or its token ids' text."""
        if isinstance(parsed.prompt, str):
            return parsed.prompt
        with self.engine.tokenizer_lock:
            return self.tok.decode(ids)

    async def chat_completions(self, request: Request) -> Response:
        parsed = P.parse_chat(await P.read_json(request))
        run = await self._start(parsed, request)
        rid = P.new_id("chatcmpl")
        wanted, token_text = run.req.params.logprobs is not None, self._token_text()
        if parsed.stream:

            def chunk(text: str, finish: str | None, entries: tuple[TokenLogprob, ...] = ()) -> dict:
                delta = {"content": text} if text or not finish else {}
                lps = P.chat_logprobs(entries, token_text) if wanted and entries else None
                return P.chat_chunk(rid, run.model, delta, finish, lps)

            return _sse_response(self._stream(run, rid, chunk, parsed.include_usage, chat=True))
        text, done, entries = await _unless_gone(request, run.req, _collect(run))
        use = P.usage(done.prompt_tokens, done.completion_tokens)
        lps = P.chat_logprobs(entries, token_text) if wanted else None
        return JSONResponse(P.chat_body(rid, run.model, text, done.finish_reason, use, lps))

    def _token_text(self) -> Callable[[int], str]:
        """A token id's text for logprobs (special tokens included), remembered for the request."""
        memo: dict[int, str] = {}

        def text(token: int) -> str:
            if token not in memo:
                with self.engine.tokenizer_lock:
                    memo[token] = self.tok.decode([token])
            return memo[token]

        return text

    async def _start(self, parsed: P.Parsed, request: Request) -> _Run:
        """Submit the request and wait for its first event, so that early failures get their own status.

        A client that disconnects meanwhile cancels it (it may still be queued behind a full batch)."""
        adapter = self.adapters.adapter_for(parsed.model)
        ids = await asyncio.to_thread(self._encode, parsed)  # a long prompt must not stall the event loop
        params = P.sampling_params(parsed, self._budget(parsed, len(ids)))
        wrong = [t for t, _ in params.logit_bias if t >= self.engine.vocab_size]
        if wrong:
            raise P.bad(
                f"logit_bias: token ids out of range [0, {self.engine.vocab_size}): {wrong[:5]}", "logit_bias"
            )
        if not self.engine.alive:
            raise P.APIError(503, "the engine is not running", "server_error")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: Event) -> None:  # called on the engine thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
                loop.call_soon_threadsafe(events.put_nowait, event)

        req = GenRequest(ids, adapter, params, emit)
        self.engine.submit(req)
        first = await _unless_gone(request, req, events.get())
        if isinstance(first, Failed):
            raise P.APIError(first.status, first.message, first.code)
        return _Run(req, events, first, parsed.model or self.adapters.base_name)

    def _encode(self, parsed: P.Parsed) -> list[int]:
        """Prompt token ids: chat messages through the chat template, text as is, or the ids given."""
        tok = self.tok
        with self.engine.tokenizer_lock:
            if parsed.messages is not None:
                if not getattr(tok, "chat_template", None):
                    raise P.bad("this model has no chat template; use /v1/completions", "messages")
                try:
                    text = tok.apply_chat_template(
                        parsed.messages, tokenize=False, add_generation_prompt=True
                    )
                except Exception as e:  # noqa: BLE001 - the template rejects these messages (jinja errors)
                    raise P.bad(f"the chat template rejects these messages: {e}", "messages") from None
                ids = tok(text, add_special_tokens=False)["input_ids"]
            elif isinstance(parsed.prompt, str):
                ids = tok(parsed.prompt, add_special_tokens=True)["input_ids"]
            else:
                ids = list(parsed.prompt)
                wrong = [t for t in ids if not 0 <= t < self.engine.vocab_size]
                if wrong:
                    raise P.bad(
                        f"token ids out of range [0, {self.engine.vocab_size}): {wrong[:5]}", "prompt"
                    )
        if not ids:
            raise P.bad("the prompt is empty", "prompt" if parsed.messages is None else "messages")
        return ids

    def _budget(self, parsed: P.Parsed, n_prompt: int) -> int:
        """max_tokens for this request; 400 if prompt + max_tokens exceed the context length."""
        limit, want = self.engine.max_model_len, parsed.max_tokens
        if want is None and n_prompt < limit:
            return limit - n_prompt
        if want is None or n_prompt + want > limit:
            raise P.APIError(
                400,
                f"this model's maximum context length is {limit} tokens; you requested {n_prompt + (want or 0)} "
                f"tokens ({n_prompt} in the prompt, {want or 0} for the completion): shorten the prompt or "
                "max_tokens",
                "context_length_exceeded",
                "messages" if parsed.messages is not None else "prompt",
            )
        return want

    async def _stream(
        self,
        run: _Run,
        rid: str,
        chunk: Callable[..., dict],
        include_usage: bool,
        *,
        chat: bool,
        echoed: str | None = None,
    ) -> AsyncIterator[str]:
        try:
            if chat:
                yield P.sse(P.chat_chunk(rid, run.model, {"role": "assistant", "content": ""}, None))
            elif echoed is not None and run.req.params.prompt_logprobs is None:
                yield P.sse(chunk(echoed, None))  # with logprobs, the Prompt event brings it
            async for event in run.events_until_done():
                if isinstance(event, Prompt):
                    yield P.sse(chunk(echoed or "", None, event.logprobs))
                elif isinstance(event, Delta):
                    yield P.sse(chunk(event.text, None, event.logprobs))
                elif isinstance(event, Done):
                    yield P.sse(chunk("", event.finish_reason))
                    if include_usage:
                        use = P.usage(event.prompt_tokens, event.completion_tokens)
                        yield P.sse(P.usage_chunk(rid, run.model, chat, use))
                else:  # the openai client raises APIError on an "error" event
                    yield P.sse(P.APIError(event.status, event.message, event.code).body())
            yield "data: [DONE]\n\n"
        finally:
            run.req.cancelled = True  # done (no-op), or the client went away: its row leaves the batch


async def _unless_gone(request: Request, req: GenRequest, waiting: Awaitable[T]) -> T:
    """`await waiting`, unless the client disconnects first: then `req` is cancelled (its row leaves the batch at
    the next step; the engine sends it nothing more) and ClientGone is raised. Streams need none of this:
    Starlette ends a stream whose client went away, and `_stream`'s `finally` cancels the request."""
    task = asyncio.ensure_future(waiting)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            req.cancelled = True
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientGone
    return task.result()


async def _collect(run: _Run) -> tuple[str, Done, list[TokenLogprob]]:
    parts: list[str] = []
    entries: list[TokenLogprob] = []
    try:
        async for event in run.events_until_done():
            if isinstance(event, Prompt):
                entries.extend(event.logprobs)
            elif isinstance(event, Delta):
                parts.append(event.text)
                entries.extend(event.logprobs)
            elif isinstance(event, Done):
                return "".join(parts), event, entries
            else:
                raise P.APIError(event.status, event.message, event.code)
    finally:
        run.req.cancelled = True
    raise AssertionError("unreachable: events end with Done or Failed")


def _sse_response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
