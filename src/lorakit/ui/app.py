"""The playground's HTTP layer: `lorakit serve`'s OpenAI app, plus the page and its /api routes.

The chat goes through serve's own /v1/chat/completions (so the page's side-by-side requests are batched by the
same engine, in one mixed batch), and loading and unloading adapters through serve's /v1/load_lora_adapter and
/v1/unload_lora_adapter with the workspace as the adapter root. The routes here add what only the page needs:
the training form's schema, uploads, data previews, runs and their live curves (SSE, in run_routes), the adapters,
weighted mixes and combining (in adapter_routes), exports and evaluations (jobs, listed and deletable), and
downloads. Every /api route takes the same API key as /v1; the page and its static files do not (they hold no
data). Errors are OpenAI-shaped JSON, one line, as in serve.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from lorakit.serve import protocol as P
from lorakit.serve.app import require_key
from lorakit.serve.engine import Engine
from lorakit.ui.adapter_routes import AdapterPanel
from lorakit.ui.jobs import Jobs
from lorakit.ui.run_routes import RunRoutes
from lorakit.ui.runs import Runs
from lorakit.ui.schema import form_schema
from lorakit.ui.workspace import Workspace, check_name

STATIC = Path(__file__).parent / "static"
PREVIEW_MAX = 20
"""Most examples one preview renders."""


@dataclass(frozen=True)
class Settings:
    base_name: str
    model: str | None
    """The model spec every run, evaluation and export uses (None: the default SmolLM2)."""
    api_key: str | None
    max_upload_mb: float


def add_ui(app: FastAPI, engine: Engine, ws: Workspace, runs: Runs, jobs: Jobs, settings: Settings) -> None:
    """Add the page, its static files and the /api routes to serve's app."""
    routes = _Routes(engine, ws, runs, jobs, settings)
    app.include_router(routes.router(), dependencies=[Depends(require_key(settings.api_key))])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


class _Routes:
    def __init__(self, engine: Engine, ws: Workspace, runs: Runs, jobs: Jobs, settings: Settings) -> None:
        self.engine, self.bank, self.ws, self.runs, self.jobs = engine, engine.bank, ws, runs, jobs
        self.settings = settings
        self.panel = AdapterPanel(engine, ws, settings.base_name)

    def router(self) -> APIRouter:
        r = APIRouter(prefix="/api")
        for path, fn, method in [
            ("/info", self.info, "GET"),
            ("/schema", self.schema, "GET"),
            ("/workspace", self.workspace, "GET"),
            ("/upload", self.upload, "POST"),
            ("/preview", self.preview, "POST"),
            *RunRoutes(self.runs, self._loaded_from).routes(),
            *self.panel.routes(),
            ("/export", self.export, "POST"),
            ("/eval", self.evaluate, "POST"),
            ("/jobs", self.list_jobs, "GET"),
            ("/jobs/{job_id}", self.job, "GET"),
            ("/jobs/{job_id}/cancel", self.cancel_job, "POST"),
            ("/jobs/{job_id}", self.delete_job, "DELETE"),
            ("/download", self.download, "GET"),
            ("/files", self.delete_file, "DELETE"),
        ]:
            r.add_api_route(path, fn, methods=[method])
        return r

    # -- what the page shows first -----------------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        import lorakit
        from lorakit.combine import METHODS
        from lorakit.data.tasks import TASKS
        from lorakit.device import cpu_model, dtype_name

        param = next(self.engine.model.parameters())
        return {
            "base_name": self.settings.base_name,
            "model_path": self.settings.model,
            "workspace": str(self.ws.root),
            "version": lorakit.__version__,
            "cpu": cpu_model(),
            "device": str(param.device),
            "dtype": dtype_name(param.dtype),
            "max_upload_mb": self.settings.max_upload_mb,
            "max_model_len": self.engine.max_model_len,
            "combine_methods": list(METHODS),
            "tasks": sorted(TASKS),
            "auth": self.settings.api_key is not None,
        }

    async def schema(self) -> dict[str, Any]:
        return form_schema()

    async def workspace(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.ws.listing)

    # -- data --------------------------------------------------------------------------------------------------

    async def upload(self, request: Request, name: str = "", fields: str = "") -> dict[str, Any]:
        """The body is the file; `fields`: the form's data.fields, with which it is checked."""
        columns = _fields(fields)
        limit = int(self.settings.max_upload_mb * 2**20)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise P.APIError(
                    413,
                    f"upload {name!r} is over the {self.settings.max_upload_mb:g} MB limit",
                    "too_large",
                    "file",
                )
            chunks.append(chunk)
        path, n, pairs = await asyncio.to_thread(self.ws.save_upload, name, b"".join(chunks), columns)
        return {"path": path, "examples": n, "pairs": pairs}

    async def preview(self, request: Request) -> dict[str, Any]:
        from lorakit.data.jsonl import DataError
        from lorakit.data.preference import as_pair, read_any
        from lorakit.data.tasks import make_pairs, make_task
        from lorakit.data.tokenize import IGNORE, encode_example, learned_segments
        from lorakit.train.objectives import PREFERENCE_OBJECTIVES

        body = await P.read_json(request)
        n = _int(body.get("n", 3), "n", 1, PREVIEW_MAX)
        max_len = _int(body.get("max_len", 256), "max_len", 8, 1 << 20)
        chat, on_all = bool(body.get("chat", True)), bool(body.get("train_on_all", False))
        fields = _fields(body.get("fields"))
        if body.get("objective") in ("classify", "regression"):
            return await asyncio.to_thread(self._preview_labelled, body, n, max_len, fields)
        if body.get("objective") == "token_classify":
            return await asyncio.to_thread(self._preview_tagged, body, n, max_len, fields)
        if body.get("objective") == "embed":
            return await asyncio.to_thread(self._preview_text_pairs, body, n, max_len, fields)
        try:
            if body.get("file"):
                path = self.ws.path(body["file"], what="file")
                items, pairs = await asyncio.to_thread(read_any, path, fields)
            elif body.get("objective") in PREFERENCE_OBJECTIVES:  # the built-in task's preference pairs
                task = str(body.get("task") or "dates")
                items, pairs = (
                    [as_pair(r, "explicit", task) for r in make_pairs(task, n_train=0, n_eval=n)[1]],
                    True,
                )
            else:
                items, pairs = make_task(str(body.get("task") or "dates"), n_train=0, n_eval=n)[1], False
        except DataError as e:
            raise P.bad(str(e).replace(str(self.ws.root) + "/", ""), "file") from None
        # a pair shows as its two sides, each with its answer learned
        sides = (
            [(p[s], s) for p in items[:n] for s in ("chosen", "rejected")]
            if pairs
            else [(e, None) for e in items[:n]]
        )
        tok = self.engine.tokenizer
        out = []
        with self.engine.tokenizer_lock:
            for ex, side in sides:
                enc = encode_example(tok, ex, max_len=max_len, chat=chat, train_on_all=on_all)
                segments = learned_segments(tok, ex, chat=chat, train_on_all=on_all)
                out.append(
                    {
                        "segments": [{"text": t, "learned": learned} for t, learned in segments],
                        "tokens": len(enc.input_ids),
                        "learned_tokens": sum(label != IGNORE for label in enc.labels[1:]),
                        "truncated": enc.truncated,
                    }
                    | ({"side": side} if side else {})
                )
        return {"total": len(items), "examples": out, "pairs": pairs}

    def _preview_labelled(
        self, body: dict[str, Any], n: int, max_len: int, fields: dict[str, str] | None
    ) -> dict[str, Any]:
        """A classifier's (a regression's) first examples as the run reads them: the text the model sees (the
        tokenizer's classification input, no chat template, nothing learned) and its label."""
        from lorakit.data.jsonl import DataError
        from lorakit.data.labels import encode_targets, read_labelled
        from lorakit.data.tasks import make_labelled, make_scored

        scores = body["objective"] == "regression"
        try:
            if body.get("file"):
                items = read_labelled(self.ws.path(body["file"], what="file"), fields, scores=scores)
            else:
                make = make_scored if scores else make_labelled
                items = make(str(body.get("task") or "dates"), n_train=0, n_eval=n)[1]
        except DataError as e:
            raise P.bad(str(e).replace(str(self.ws.root) + "/", ""), "file") from None
        shown = items[:n]
        with self.engine.tokenizer_lock:
            rows, _ = encode_targets(self.engine.tokenizer, shown, [0] * len(shown), max_len=max_len)
            texts = [self.engine.tokenizer.decode(r.row.input_ids) for r in rows]
        out = [
            {
                "segments": [{"text": text, "learned": False}],
                "tokens": len(r.row.input_ids),
                "learned_tokens": 0,
                "truncated": r.row.truncated,
                "label": it["label"],
            }
            for it, r, text in zip(shown, rows, texts, strict=True)
        ]
        return {"total": len(items), "examples": out, "pairs": False}

    def _preview_tagged(
        self, body: dict[str, Any], n: int, max_len: int, fields: dict[str, str] | None
    ) -> dict[str, Any]:
        """A token classifier's first examples as the run reads them: each text with its entities marked (the
        spans the tags are learned from) and, as its label, each entity's type and words."""
        from lorakit.data.jsonl import DataError
        from lorakit.data.tagging import encode_tagged, read_tagged, tag_names
        from lorakit.data.tasks import make_tagged

        try:
            if body.get("file"):
                items = read_tagged(self.ws.path(body["file"], what="file"), fields)
            else:
                items = make_tagged(str(body.get("task") or "dates"), n_train=0, n_eval=n)[1]
            names = tag_names(items, "the data")
        except DataError as e:
            raise P.bad(str(e).replace(str(self.ws.root) + "/", ""), "file") from None
        shown = items[:n]
        with self.engine.tokenizer_lock:
            rows, _ = encode_tagged(self.engine.tokenizer, shown, names, max_len=max_len)
        out = []
        for r in rows:
            segments, at = [], 0
            for s, e, _ in r.spans:
                segments += [{"text": r.text[at:s], "learned": False}, {"text": r.text[s:e], "learned": True}]
                at = e
            segments.append({"text": r.text[at:], "learned": False})
            out.append(
                {
                    "segments": [g for g in segments if g["text"]],
                    "tokens": len(r.row.input_ids),
                    "learned_tokens": sum(o is not None for o in r.offsets),
                    "truncated": r.row.truncated,
                    "label": "; ".join(f"{kind} {r.text[s:e]!r}" for s, e, kind in r.spans) or "no entity",
                }
            )
        return {"total": len(items), "examples": out, "pairs": False}

    def _preview_text_pairs(
        self, body: dict[str, Any], n: int, max_len: int, fields: dict[str, str] | None
    ) -> dict[str, Any]:
        """An embedding model's first examples as the run reads them: each anchor (the text embedded, as the
        tokenizer encodes it alone) and, as its label, the positive it is trained to lie near and the hard
        negative, if any (of a scored pair: the other text and its score)."""
        from lorakit.data.jsonl import DataError
        from lorakit.data.tasks import make_text_pairs
        from lorakit.data.textpairs import read_text_pairs

        try:
            if body.get("file"):
                items = read_text_pairs(self.ws.path(body["file"], what="file"), fields)
            else:
                items = make_text_pairs(str(body.get("task") or "dates"), n_train=0, n_eval=n)[1]
        except DataError as e:
            raise P.bad(str(e).replace(str(self.ws.root) + "/", ""), "file") from None
        shown = items[:n]
        with self.engine.tokenizer_lock:
            lengths = [len(ids) for ids in self.engine.tokenizer([it["anchor"] for it in shown])["input_ids"]]
        out = []
        for it, length in zip(shown, lengths, strict=True):
            negative = f"; negative: {it['negative']!r}" if it["negative"] is not None else ""
            label = f"positive: {it['positive']!r}{negative}"
            if "score" in it:  # a scored pair (STS): the other text and how alike the two are
                label = f"paired with: {it['positive']!r}; score {it['score']:g}"
            out.append(
                {
                    "segments": [{"text": it["anchor"], "learned": False}],
                    "tokens": min(length, max_len),
                    "learned_tokens": 0,
                    "truncated": length > max_len,
                    "label": label,
                }
            )
        return {"total": len(items), "examples": out, "pairs": False}

    async def export(self, request: Request) -> dict[str, Any]:
        body = await P.read_json(request)
        adapter = self.panel.path(body.get("adapter"))
        kind = body.get("kind", "gguf")
        if kind not in ("merged", "gguf", "gguf-merged"):
            raise P.bad(f"kind must be merged, gguf or gguf-merged, got {kind!r}", "kind")
        default = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(body.get("adapter")))[
            -40:
        ].strip("._-")
        out_name = check_name(body.get("out") or f"{default or 'adapter'}-{kind}", "out")
        out = (
            self.ws.root
            / "exports"
            / (out_name if kind == "merged" else f"{out_name.removesuffix('.gguf')}.gguf")
        )
        if out.exists():
            raise P.APIError(409, f"{self.ws.rel(out)} exists already: pick another name", "exists", "out")
        model = ["--model", self.settings.model] if self.settings.model else []
        if kind == "merged":
            argv = ["merge", "--adapter", str(adapter), "--out", str(out), *model]
        else:
            argv = ["export", "gguf", "--adapter", str(adapter), "--out", str(out), *model]
            argv += ["--merged"] if kind == "gguf-merged" else []
        summary = {"adapter": body.get("adapter"), "kind": kind, "out": self.ws.rel(out)}
        return {"job": self.jobs.start("export", argv, result_file=out, summary=summary)}

    async def evaluate(self, request: Request) -> dict[str, Any]:
        from lorakit.data.tasks import TASKS

        body = await P.read_json(request)
        adapter = self.panel.path(body.get("adapter"))
        limit = _int(body.get("limit", 50), "limit", 1, 10_000)
        if body.get("file"):
            data = ["--data", str(self.ws.path(body["file"], what="file"))]
            shown = self.ws.rel(Path(data[1]))
        else:
            task = body.get("task") or "dates"
            if task not in TASKS:
                raise P.bad(f"unknown built-in task {task!r}; available: {sorted(TASKS)}", "task")
            data, shown = ["--task", task], f"task:{task}"
        model = ["--model", self.settings.model] if self.settings.model else []
        # a classifier's, reward model's, regression's or token classifier's adapter: its base has no trained
        # head to compare with
        from lorakit.classifier_heads import is_classifier

        heads = await asyncio.to_thread(is_classifier, adapter)
        compare = [] if heads else ["--compare-base"]
        argv = ["eval", *data, "--adapter", str(adapter), *compare, "--json", "--limit", str(limit), *model]
        summary = {"adapter": body.get("adapter"), "data": shown, "limit": limit}
        return {"job": self.jobs.start("eval", argv, summary=summary)}

    async def list_jobs(self, kind: str = "") -> dict[str, Any]:
        if kind not in ("", "eval", "export"):
            raise P.bad(f"kind must be eval or export, got {kind!r}", "kind")
        return {"jobs": await asyncio.to_thread(self.jobs.list, kind or None)}

    async def job(self, job_id: str) -> dict[str, Any]:
        return self.jobs.state(job_id)

    async def delete_job(self, job_id: str) -> dict[str, Any]:
        return {"deleted": await asyncio.to_thread(self.jobs.delete, job_id)}

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self.jobs.cancel(job_id)

    async def delete_file(self, path: str = "") -> dict[str, Any]:
        return {"deleted": await asyncio.to_thread(self.ws.remove, path, self._loaded_from)}

    def _loaded_from(self, real: Path) -> str | None:
        """Why `real` may not be deleted: an adapter is loaded from it or from inside it (None: it may)."""
        for name in self.bank.names():
            path = self.bank.paths.get(name)
            if path is None:
                continue
            loaded = Path(os.path.realpath(path))
            if loaded == real or real in loaded.parents:
                return f"adapter {name!r} is loaded from it: unload it first"
        return None

    async def download(self, path: str = "") -> FileResponse:
        real, filename = await asyncio.to_thread(self.ws.download, path)
        return FileResponse(real, filename=filename)


def _fields(value: Any) -> dict[str, str]:
    """The form's data.fields (YAML text, or a mapping); 400 if it is none."""
    from lorakit.data.shapes import parse_fields

    try:
        return parse_fields(value)
    except ValueError as e:
        raise P.bad(f"data.fields {e}", "fields") from None


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise P.bad(f"{what} must be an integer in {lo}..{hi}, got {value!r}", what)
    return value


__all__ = ["Settings", "add_ui"]
