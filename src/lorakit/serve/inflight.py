"""A generation request in flight: its rows' events as they arrive from the engine thread, collected into each
choice's result or awaited only while the client is still there (`unless_gone`), and the usage it reports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from lorakit.serve import protocol as P
from lorakit.serve import responses as R
from lorakit.serve.requests import Delta, Done, Event, Failed, GenRequest, Prompt, TokenLogprob

T = TypeVar("T")
DISCONNECT_POLL_S = 0.2
"""How often a handler waiting for the engine checks whether its client is still there."""


class ClientGone(Exception):
    """The client closed the connection before its answer was ready; its request was cancelled."""


@dataclass
class Run:
    """A request handed to the engine, one row per choice generated (`width` per prompt, prompt by prompt): its
    events arrive on `events` as (row, event) pairs; `first` is already taken from it."""

    reqs: list[GenRequest]
    events: asyncio.Queue
    first: tuple[int, Event]
    model: str  # the name answered in responses
    width: int  # rows per prompt: best_of (n unless set)
    endpoint: str  # "completions" or "chat", for the latency metrics
    started: float  # time.monotonic() when the handler had read the request

    def cancel(self) -> None:
        """Every choice's row leaves the batch (a no-op for those already done)."""
        for req in self.reqs:
            req.cancelled = True

    async def events_until_done(self) -> AsyncIterator[tuple[int, Event]]:
        """`first`, then the rest, until every choice is Done or one has Failed."""
        left, item = len(self.reqs), self.first
        while True:
            yield item
            if isinstance(item[1], Failed):
                return
            if isinstance(item[1], Done):
                left -= 1
                if not left:
                    return
            item = await self.events.get()


Result = tuple[str, Done, list[TokenLogprob]]
"""One choice's text, its end, and its log-probabilities (the prompt's first, with echo)."""


async def unless_gone(request: Request, reqs: list[GenRequest], waiting: Awaitable[T]) -> T:
    """`await waiting`, unless the client disconnects first: then `reqs` are cancelled (their rows leave the batch
    at the next step; the engine sends them nothing more) and ClientGone is raised. Streams need none of this:
    Starlette ends a stream whose client went away, and the stream's `finally` cancels the request (`GenerationRoutes._stream`)."""
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
            for req in reqs:
                req.cancelled = True
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientGone
    return task.result()


async def collect(run: Run) -> list[Result]:
    """Each choice's result, in choice order; the first failure fails the request (and cancels the rest)."""
    parts: list[list[str]] = [[] for _ in run.reqs]
    entries: list[list[TokenLogprob]] = [[] for _ in run.reqs]
    dones: dict[int, Done] = {}
    try:
        async for i, event in run.events_until_done():
            if isinstance(event, Prompt):
                entries[i].extend(event.logprobs)
            elif isinstance(event, Delta):
                parts[i].append(event.text)
                entries[i].extend(event.logprobs)
            elif isinstance(event, Done):
                dones[i] = event
            else:
                raise P.APIError(event.status, event.message, event.code)
    finally:
        run.cancel()
    return [("".join(parts[i]), dones[i], entries[i]) for i in range(len(run.reqs))]


def usage(results: list[Result], width: int) -> dict[str, Any]:
    """Each prompt once, and every choice's tokens (with best_of, those not returned too: they were generated).
    A prompt's cached tokens are its first choice's (its choices share one prefill)."""
    prompt_tokens = sum(done.prompt_tokens for _, done, _ in results[::width])
    cached = sum(done.cached_tokens for _, done, _ in results[::width])
    return R.usage(prompt_tokens, sum(done.completion_tokens for _, done, _ in results), cached)


def sse_response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
