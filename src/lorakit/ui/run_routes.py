"""The playground's run routes: start, stop, resume and delete training runs, their configs, and their live
curves as server-sent events (replayed from metrics.jsonl, then live, resumable with Last-Event-ID)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from lorakit.serve import protocol as P
from lorakit.ui.runs import Runs

EVENTS_POLL_S = 0.5
"""How often a run's event stream looks for new records in metrics.jsonl."""


class RunRoutes:
    def __init__(self, runs: Runs, in_use: Callable[[Path], str | None]) -> None:
        self.runs = runs
        self.in_use = in_use
        """Why a path may not be deleted (an adapter is loaded from it), or None."""

    def routes(self) -> list[tuple[str, Callable[..., Any], str]]:
        """(path under /api, handler, method) of each route."""
        return [
            ("/runs", self.list_runs, "GET"),
            ("/runs", self.start_run, "POST"),
            ("/runs/{name}", self.run_detail, "GET"),
            ("/runs/{name}/stop", self.stop_run, "POST"),
            ("/runs/{name}/resume", self.resume_run, "POST"),
            ("/runs/{name}/config.yaml", self.run_config, "GET"),
            ("/runs/{name}/events", self.run_events, "GET"),
            ("/runs/{name}", self.delete_run, "DELETE"),
        ]

    # -- the routes ------------------------------------------------------------------------------------------------

    async def list_runs(self) -> dict[str, Any]:
        return {"runs": [self.runs.state(n) for n in self.runs.names()]}

    async def start_run(self, request: Request) -> dict[str, Any]:
        body = await P.read_json(request)
        name = body.get("name") or _next_name(self.runs.names())
        return await asyncio.to_thread(self.runs.start, name, body.get("values"))

    async def run_detail(self, name: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.runs.detail, name)

    async def stop_run(self, name: str) -> dict[str, Any]:
        return self.runs.stop(name)

    async def delete_run(self, name: str) -> dict[str, Any]:
        await asyncio.to_thread(self.runs.delete, name, self.in_use)
        return {"deleted": f"runs/{name}"}

    async def resume_run(self, name: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.runs.resume, name)

    async def run_config(self, name: str) -> Response:
        folder = self.runs.folder(name)
        self.runs.state(name)  # 404 for an unknown run
        path = folder / ("config.yaml" if (folder / "config.yaml").is_file() else "request.yaml")
        return Response(
            path.read_bytes(),
            media_type="application/x-yaml",
            headers={"Content-Disposition": f'attachment; filename="{name}-config.yaml"'},
        )

    async def run_events(self, name: str, request: Request) -> StreamingResponse:
        """The run's records (replayed from metrics.jsonl, then live), its status when it changes, and `end` once
        it no longer runs. Each record's event id is the byte offset in metrics.jsonl after it: a client that
        reconnects with `Last-Event-ID` (as EventSource does) gets only the records after that one."""
        self.runs.state(name)  # 404 before the stream starts
        metrics = self.runs.folder(name) / "metrics.jsonl"
        start = await asyncio.to_thread(_resume_offset, request.headers.get("last-event-id"), metrics, name)

        async def stream():
            pos, last, was_running = start, None, None  # pos: the end of the last whole line sent
            while True:
                running = self.runs.running(name)  # before the read: what a finished run wrote is read after
                try:
                    with metrics.open("rb") as f:
                        f.seek(pos)
                        chunk = f.read()
                except FileNotFoundError:
                    chunk = b""
                *lines, _partial = chunk.split(b"\n")  # a line still being written is read again next time
                for line in lines:
                    pos += len(line) + 1
                    if line.strip():
                        yield f"event: metric\nid: {pos}\ndata: {line.decode('utf-8', 'replace')}\n\n"
                if lines or running != was_running:  # the run's folder is read again only when it moved
                    state = self.runs.state(name)
                    if (state["status"], state["step"]) != last:
                        last = (state["status"], state["step"])
                        yield f"event: status\ndata: {json.dumps(state)}\n\n"
                was_running = running
                if not running:
                    yield "event: end\ndata: {}\n\n"
                    return
                await asyncio.sleep(EVENTS_POLL_S)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )


def _resume_offset(header: str | None, metrics: Path, name: str) -> int:
    """Where a run's event stream starts: 0, or the `Last-Event-ID` a reconnecting client sends, which must be
    an offset this stream gave out (the end of a line of metrics.jsonl)."""
    if header is None or not header.strip():
        return 0
    where = f"runs/{name}/metrics.jsonl"
    try:
        size = metrics.stat().st_size
    except FileNotFoundError:
        size = 0
    text = header.strip()
    offset = int(text) if text.isascii() and text.isdigit() else -1
    ok = 0 <= offset <= size
    if ok and offset > 0:
        with metrics.open("rb") as f:
            f.seek(offset - 1)
            ok = f.read(1) == b"\n"
    if not ok:
        raise P.bad(
            f"Last-Event-ID {text[:40]!r} is not a line end of {where} ({size} bytes): "
            "reconnect without it to replay the whole run",
            "Last-Event-ID",
        )
    return offset


def _next_name(existing: list[str]) -> str:
    n = len(existing) + 1
    while f"run-{n}" in existing:
        n += 1
    return f"run-{n}"


__all__ = ["EVENTS_POLL_S", "RunRoutes"]
