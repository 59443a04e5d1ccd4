"""The playground's adapter routes: the loaded adapters with what their folders say, weighted mixes of them loaded
as one adapter (exact: `combine` with method cat), and combining adapters into a new folder."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Request

from lorakit.errors import LorakitError
from lorakit.serve import protocol as P
from lorakit.serve.engine import Engine, EngineStopped
from lorakit.ui.workspace import Workspace, check_name


class AdapterPanel:
    def __init__(self, engine: Engine, ws: Workspace, base_name: str) -> None:
        self.engine, self.bank, self.ws, self.base_name = engine, engine.bank, ws, base_name
        self.mix_lock = asyncio.Lock()
        self.mixes: dict[str, str] = {}
        """label -> loaded adapter name of each weighted mix made here"""

    def routes(self) -> list[tuple[str, Callable[..., Any], str]]:
        """(path under /api, handler, method) of each route."""
        return [
            ("/adapters", self.adapters, "GET"),
            ("/mix", self.mix, "POST"),
            ("/combine", self.combine, "POST"),
        ]

    async def adapters(self) -> dict[str, Any]:
        return {"base": self.base_name, "adapters": await asyncio.to_thread(self._adapter_rows)}

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

    def path(self, ref: Any) -> Path:
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
            sources = [self.path(n) for n in weights]
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
        paths = [self.path(s) for s in sources]
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
