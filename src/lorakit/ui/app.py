"""The playground's HTTP layer: `lorakit serve`'s OpenAI app, plus the page and its /api routes.

The chat goes through serve's own /v1/chat/completions (so the page's side-by-side requests are batched by the
same engine, in one mixed batch), and loading and unloading adapters through serve's /v1/load_lora_adapter and
/v1/unload_lora_adapter with the workspace as the adapter root. The routes here add what only the page needs:
the training form's schema, uploads, data previews, runs and their live curves (SSE, in run_routes), weighted
mixes, combining, exports and evaluations (jobs, listed and deletable), and downloads. Every /api route takes the
same API key as /v1; the page and its static files do not (they hold no data). Errors are OpenAI-shaped JSON,
one line, as in serve.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from lorakit.errors import LorakitError
from lorakit.serve import protocol as P
from lorakit.serve.app import require_key
from lorakit.serve.engine import Engine, EngineStopped
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
        self.mix_lock = asyncio.Lock()
        self.mixes: dict[str, str] = {}
        """label -> loaded adapter name of each weighted mix made here"""

    def router(self) -> APIRouter:
        r = APIRouter(prefix="/api")
        for path, fn, method in [
            ("/info", self.info, "GET"),
            ("/schema", self.schema, "GET"),
            ("/workspace", self.workspace, "GET"),
            ("/upload", self.upload, "POST"),
            ("/preview", self.preview, "POST"),
            *RunRoutes(self.runs, self._loaded_from).routes(),
            ("/adapters", self.adapters, "GET"),
            ("/mix", self.mix, "POST"),
            ("/combine", self.combine, "POST"),
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

    # -- adapters ----------------------------------------------------------------------------------------------

    async def adapters(self) -> dict[str, Any]:
        return {"base": self.settings.base_name, "adapters": await asyncio.to_thread(self._adapter_rows)}

    def _adapter_rows(self) -> list[dict[str, Any]]:
        from lorakit.io import describe_adapter, folder_format

        rows = []
        for name in self.bank.names():
            path = self.bank.paths.get(name)
            row: dict[str, Any] = {"name": name, "path": self._shown(path)}
            label = next((k for k, v in self.mixes.items() if v == name), None)
            if label is not None:
                row["mix"] = label
            if path is not None:
                try:
                    info, (fmt, _) = describe_adapter(path), folder_format(path)
                except LorakitError as e:  # the folder changed since it was loaded: say so, list the rest
                    row["error"] = str(e)
                else:
                    cfg = info.get("config")
                    row.update(
                        rank=getattr(cfg, "r", None),
                        alpha=getattr(cfg, "alpha", None),
                        targets=sorted({m.rsplit(".", 1)[-1] for m in info.get("modules", {})})
                        or getattr(cfg, "targets", None),
                        params=info.get("parameters"),
                        kind=fmt.label
                        + (" + DoRA" if getattr(cfg, "use_dora", False) else "")
                        + (" + lora_bias" if getattr(cfg, "lora_bias", False) else "")
                        + (" + KaSA" if getattr(cfg, "use_kasa", False) else "")
                        + (" + BD-LoRA" if getattr(cfg, "use_bdlora", None) else ""),
                        size_bytes=sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file()),
                    )
            rows.append(row)
        return rows

    def _shown(self, path: Path | None) -> str | None:
        if path is None:
            return None
        return self.ws.rel(path) if self.ws.inside(Path(path).resolve()) else str(path)

    def _adapter_path(self, ref: Any) -> Path:
        """A loaded adapter's folder, or a workspace folder the page names."""
        if isinstance(ref, str) and ref in self.bank and self.bank.paths.get(ref) is not None:
            return Path(self.bank.paths[ref])
        path = self.ws.path(ref, what="adapter")
        if not path.is_dir():
            raise P.bad(f"adapter {ref!r} is neither a loaded adapter nor an adapter folder", "adapter")
        return path

    async def mix(self, request: Request) -> dict[str, Any]:
        """Load the weighted sum of loaded adapters' ΔW as one adapter, exactly (`combine` with method cat, written
        to mixes/): {"name": "mix_1", "label": "a=0.7 + b=0.3"}. The same weights again give the same adapter."""
        from lorakit.combine import combine

        body = await P.read_json(request)
        weights = body.get("weights")
        if not isinstance(weights, dict) or not weights:
            raise P.bad(
                '\'weights\' must map loaded adapters to numbers, e.g. {"a": 0.7, "b": 0.3}', "weights"
            )
        for n, w in weights.items():
            if n not in self.bank:
                raise P.APIError(
                    404,
                    f"mix: {n!r} is not a loaded adapter; loaded: {self.bank.names()}",
                    "not_found",
                    "weights",
                )
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise P.bad(f"mix: the weight of {n!r} must be a finite number, got {w!r}", "weights")
        label = " + ".join(f"{n}={w:g}" for n, w in weights.items())
        async with self.mix_lock:
            name = self.mixes.get(label)
            if name is not None and name in self.bank:
                return {"name": name, "label": label}
            sources = [self._adapter_path(n) for n in weights]
            name = next(
                f"mix_{i}"
                for i in itertools.count(1)
                if f"mix_{i}" not in self.bank and not (self.ws.root / "mixes" / f"mix_{i}").exists()
            )
            out = self.ws.root / "mixes" / name
            try:
                await asyncio.to_thread(combine, sources, list(weights.values()), "cat", out)
                await asyncio.wrap_future(self.engine.call(lambda: self.bank.load(name, out)))
            except EngineStopped:
                raise P.APIError(503, "the engine is not running", "server_error") from None
            except LorakitError as e:
                raise P.bad(f"mix {label}: {e}", "weights") from None
            self.mixes[label] = name
        return {"name": name, "label": label}

    async def combine(self, request: Request) -> dict[str, Any]:
        from lorakit.combine import combine

        body = await P.read_json(request)
        sources = body.get("sources")
        if not isinstance(sources, list) or len(sources) < 1:
            raise P.bad("'sources' must list loaded adapters or adapter folders", "sources")
        paths = [self._adapter_path(s) for s in sources]
        out_name = check_name(body.get("out"), "out")
        out = self.ws.root / "adapters" / out_name
        if out.exists():
            raise P.APIError(409, f"adapters/{out_name} exists already: pick another name", "exists", "out")
        weights = body.get("weights")
        if weights is not None and (
            not isinstance(weights, list)
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)
        ):
            raise P.bad("'weights' must be a list of numbers, one per source", "weights")
        try:
            await asyncio.to_thread(
                combine,
                paths,
                weights,
                str(body.get("method") or "linear"),
                out,
                density=body.get("density"),
                svd_rank=body.get("svd_rank"),
            )
        except LorakitError as e:
            raise P.bad(f"combine: {str(e).replace(str(self.ws.root) + '/', '')}", "sources") from None
        return {"path": self.ws.rel(out)}

    async def export(self, request: Request) -> dict[str, Any]:
        body = await P.read_json(request)
        adapter = self._adapter_path(body.get("adapter"))
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
        adapter = self._adapter_path(body.get("adapter"))
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
        argv = [
            "eval",
            *data,
            "--adapter",
            str(adapter),
            "--compare-base",
            "--json",
            "--limit",
            str(limit),
            *model,
        ]
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
