"""The adapter routes: /v1/models (the base and each adapter, with vLLM's `parent` and `root`) and vLLM's
/v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace"} and /v1/unload_lora_adapter {"lora_name"}.

With `load_on_demand` (`lorakit serve --load-on-demand`), a request whose `model` is no loaded adapter but names a
folder under the adapter root (`org/sql` -> ROOT/org/sql) loads it first, as the load route would, once however many
requests ask for it at the same time; with `--max-adapters` the least recently used idle adapter makes room
(LoRAX's and S-LoRA's dynamic loading, vLLM's filesystem resolver).

Every generation request holds its adapter from the moment it is accepted (`resolve`, `leases`: the engine's row
takes the hold over), so no unload, eviction or load in place between its acceptance and its end changes the
adapter it runs with.

`load_inplace: true` loads a file over a name already served (what RL loops do after each policy step): requests
accepted from then on get the new weights, and requests accepted before, running or queued, finish on the old ones,
which go when the last of them ends (`AdapterBank.load(replace=True)`). No request ever sees half of each.

Runtime loading is the server's biggest attack surface (a client names a folder on the server), so it is off
unless the server was started with an adapter root, and then the folder and every adapter file in it must lie,
symlinks followed, inside that root, checked on the files as opened (`lorakit.serve.confine`: no window between
check and use); a path with `..` is refused outright. The checked files are copied to a private folder, which
the engine thread loads between decode steps. Any error from loading a requested adapter is that adapter's: a
one-line 400 naming it (409 if the bank is busy), never a 500. Unloads run on the engine thread too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from lorakit.errors import AdapterError, LorakitError
from lorakit.serve import protocol as P
from lorakit.serve.confine import PathRefused, PathUnreadable, private_copy
from lorakit.serve.engine import Engine, EngineStopped
from lorakit.serve.names import adapter_name_problem

log = logging.getLogger(__name__)


class AdapterRoutes:
    def __init__(
        self,
        engine: Engine,
        base_name: str,
        base_path: str,
        adapter_root: Path | None,
        *,
        load_on_demand: bool = False,
    ) -> None:
        if load_on_demand and adapter_root is None:
            raise ValueError("load_on_demand needs an adapter root")
        self.engine, self.bank = engine, engine.bank
        self.base_name, self.base_path, self.adapter_root = base_name, base_path, adapter_root
        self.load_on_demand = load_on_demand
        self.created = int(time.time())
        self.on_demand_loads = 0
        self._loading: dict[str, asyncio.Future] = {}  # name -> its on-demand load in progress

    def router(self) -> APIRouter:
        r = APIRouter()
        r.add_api_route("/v1/models", self.models, methods=["GET"])
        r.add_api_route("/v1/models/{model:path}", self.model, methods=["GET"])
        r.add_api_route("/v1/load_lora_adapter", self.load, methods=["POST"])
        r.add_api_route("/v1/unload_lora_adapter", self.unload, methods=["POST"])
        return r

    def adapter_for(self, model: str | None) -> str | None:
        """The adapter a request's `model` names (None: the base model); 404 listing the choices if unknown. With
        `load_on_demand`, a folder under the root that has that name counts (it is loaded when generation needs it)."""
        if model is None or model == self.base_name:
            return None
        if model in self.bank or (self.load_on_demand and self._loadable(model)):
            return model
        raise self._not_found(model)

    def _not_found(self, model: str, why: str = "") -> P.APIError:
        available = [self.base_name, *self.bank.names()]
        why = f": {why}" if why else ""
        more = f" (nor a folder under the adapter root{why})" if self.load_on_demand else ""
        message = f"the model {model!r} does not exist{more}; available: {available}"
        return P.APIError(404, message, "model_not_found", "model")

    def _loadable(self, model: str) -> bool:
        """Whether `model` is a served name with a folder of that name under the adapter root."""
        assert self.adapter_root is not None
        if adapter_name_problem(model) or ".." in Path(model).parts:
            return False
        return (self.adapter_root / model).is_dir()

    # -- holding a request's adapter ---------------------------------------------------------------------------

    async def resolve(self, model: str | None) -> tuple[str | None, contextlib.ExitStack]:
        """(the adapter a generation request's `model` names, a hold on it until `leases` takes over: close it);
        loads it first with `load_on_demand`. 404 for an unknown model; a failed on-demand load fails the request
        as the load route would (400 for a bad file, 403 outside the root, 503 if every adapter is in use)."""
        hold = contextlib.ExitStack()
        adapter = self.adapter_for(model)
        if adapter is None:
            return None, hold
        loads = 0
        while True:
            try:
                hold.enter_context(self.bank.hold([adapter]))
                return adapter, hold
            except AdapterError:
                if not self.load_on_demand:
                    raise self._not_found(adapter) from None
            if loads == 3:  # loaded, then evicted by other on-demand loads before it was held, three times
                raise P.APIError(
                    503, f"adapter {adapter!r} could not be kept loaded; retry", "server_overloaded"
                )
            await self._load_on_demand(adapter)
            loads += 1

    def leases(self, adapter: str | None, n: int) -> list[tuple[contextlib.ExitStack | None, str | None]]:
        """`n` holds on `adapter` (one per row of a request, for `GenRequest.lease` and `.slot`); 404 if it was
        unloaded since `resolve` (then none is kept)."""
        if adapter is None:
            return [(None, None)] * n
        out = []
        try:
            for _ in range(n):
                stack = contextlib.ExitStack()
                (slot,) = stack.enter_context(self.bank.hold([adapter]))
                out.append((stack, slot))
        except AdapterError:
            for stack, _ in out:
                stack.close()
            raise self._not_found(adapter) from None
        return out

    async def _load_on_demand(self, name: str) -> None:
        """Load the root's folder `name` as `name` (if it is not loaded); requests for a name being loaded wait for
        that load, and share its error."""
        while (pending := self._loading.get(name)) is not None:
            try:
                await asyncio.shield(pending)
                return
            except asyncio.CancelledError:
                if not pending.cancelled():  # this request was cancelled, not the load
                    raise
        pending = self._loading[name] = asyncio.get_running_loop().create_future()
        try:
            await self._load(name)
            pending.set_result(None)
        except asyncio.CancelledError:
            pending.cancel()  # the request that loaded went away: a waiter loads instead
            raise
        except Exception as e:
            pending.set_exception(e)
            pending.exception()  # retrieved: each waiter raises it itself
            raise
        finally:
            del self._loading[name]

    async def _load(self, name: str) -> None:
        root = self._root()
        with contextlib.ExitStack() as stack:
            try:
                real, copy = await asyncio.to_thread(stack.enter_context, private_copy(root, name))
            except PathRefused as e:
                raise P.APIError(403, str(e), "adapter_path_refused", "model") from None
            except PathUnreadable as e:
                raise self._not_found(name, str(e)) from None

            def load() -> float | None:  # None: another route loaded it meanwhile
                return None if name in self.bank else self.bank.load(name, copy, source=real)

            try:
                seconds = await asyncio.wrap_future(self.engine.call(load))
            except EngineStopped:
                raise P.APIError(503, "the engine is not running", "server_error") from None
            except Exception as e:  # noqa: BLE001 - whatever the adapter's files make the loaders raise
                error = _load_error(name, name, e, copy, real)
                if error.code == "adapter_busy":  # every adapter in use: capacity, not the request's fault
                    busy = (
                        f"adapter {name!r} cannot be loaded now: all {self.bank.max_adapters} adapters "
                        "(--max-adapters) are in use by requests or pinned; retry"
                    )
                    raise P.APIError(503, busy, "server_overloaded") from None
                raise P.APIError(error.status, error.message, error.code, "model") from None
        if seconds is not None:
            self.on_demand_loads += 1
            log.info("loaded adapter %r on demand from %s in %.2f s", name, real, seconds)

    # -- /v1/models --------------------------------------------------------------------------------------------

    def cards(self) -> list[dict[str, Any]]:
        out = [self._card(self.base_name, self.base_path, None)]
        for name in self.bank.names():
            card = self._card(name, str(self.bank.paths.get(name) or ""), self.base_name)
            out.append(card)
            try:
                head, pooling = self.bank.head(name), self.bank.pooling(name)
            except AdapterError:  # unloaded since names() was read
                continue
            if head is not None:  # lorakit's extension: a classifier's adapter, served at /v1/classify
                kind = (
                    "token_classification"
                    if head.per_token
                    else head.problem or ("reward" if head.outputs == 1 else "single_label_classification")
                )
                card["classifier"] = {"kind": kind, "classes": list(head.classes)}
            if (
                pooling is not None
            ):  # lorakit's extension: an embedding model's adapter, served at /v1/embeddings
                card["embedding"] = {"pooling": pooling}
        return out

    def _card(self, name: str, root: str, parent: str | None) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "lorakit",
            "root": root,
            "parent": parent,
            "max_model_len": self.engine.max_model_len,
            "permission": [],
        }

    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": self.cards()})

    async def model(self, model: str) -> JSONResponse:
        for card in self.cards():
            if card["id"] == model:
                return JSONResponse(card)
        self.adapter_for(model)  # raises the 404 with the list
        raise AssertionError("unreachable")

    # -- load and unload ---------------------------------------------------------------------------------------

    async def load(self, request: Request) -> PlainTextResponse:
        body = await P.read_json(request)
        root = self._root()
        name = self._name(body)
        lora_path = checked_path(body.get("lora_path"))
        inplace = body.get("load_inplace", False)
        if not isinstance(inplace, bool):
            raise P.bad(f"'load_inplace' must be true or false, got {inplace!r}", "load_inplace")
        if name in self.bank and not inplace:
            raise P.bad(
                f'the adapter {name!r} has already been loaded; unload it first, or pass "load_inplace": true',
                "lora_name",
            )
        with contextlib.ExitStack() as stack:
            try:  # every file opened once and checked as opened (confine.py); copying runs off the event loop
                real, copy = await asyncio.to_thread(stack.enter_context, private_copy(root, lora_path))
            except PathRefused as e:
                raise P.APIError(403, str(e), "adapter_path_refused", "lora_path") from None
            except PathUnreadable as e:
                raise P.APIError(
                    400, f"cannot load adapter {name!r}: {e}", "adapter_invalid", "lora_path"
                ) from None
            try:
                seconds = await asyncio.wrap_future(
                    self.engine.call(lambda: self.bank.load(name, copy, source=real, replace=inplace))
                )
            except EngineStopped:
                raise P.APIError(503, "the engine is not running", "server_error") from None
            except Exception as e:  # noqa: BLE001 - whatever the adapter's files make the loaders raise
                raise _load_error(name, lora_path, e, copy, real) from None
        log.info(
            "loaded adapter %r from %s in %.2f s%s", name, real, seconds, " (in place)" if inplace else ""
        )
        if inplace:
            return PlainTextResponse(f"Success: LoRA adapter '{name}' reloaded in place successfully.")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: Request) -> PlainTextResponse:
        body = await P.read_json(request)
        self._root()
        name = self._name(body)
        try:
            await asyncio.wrap_future(self.engine.call(lambda: self.bank.unload(name)))
        except EngineStopped:
            raise P.APIError(503, "the engine is not running", "server_error") from None
        except AdapterError:
            loaded = self.bank.names()
            raise P.APIError(
                404, f"the adapter {name!r} cannot be found; loaded: {loaded}", "model_not_found"
            ) from None
        log.info("unloaded adapter %r (requests in flight finish first)", name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    def _root(self) -> Path:
        if self.adapter_root is None:
            raise P.APIError(
                403,
                "loading and unloading adapters at runtime is disabled; start the server with --adapter-root DIR "
                "to allow it (adapters load only from under DIR)",
                "runtime_updates_disabled",
            )
        return self.adapter_root

    def _name(self, body: dict[str, Any]) -> str:
        name = body.get("lora_name")
        if not isinstance(name, str) or not name.strip():
            raise P.bad("'lora_name' must be a non-empty string", "lora_name")
        problem = adapter_name_problem(name)  # the rule, its length included
        if problem:
            raise P.bad(f"'lora_name': {problem}", "lora_name")
        if name == self.base_name:
            raise P.bad(f"{name!r} is the base model's name", "lora_name")
        return name


def checked_path(lora_path: Any) -> str:
    """`lora_path` if it is a non-empty string without `..`; where it leads is checked as it is opened
    (`lorakit.serve.confine`)."""
    if not isinstance(lora_path, str) or not lora_path.strip():
        raise P.bad("'lora_path' must be a non-empty string", "lora_path")
    if ".." in Path(lora_path).parts:
        raise P.APIError(
            403,
            f"lora_path {lora_path!r} refused: it may not contain '..'",
            "adapter_path_refused",
            "lora_path",
        )
    return lora_path


def _load_error(name: str, lora_path: str, e: Exception, copy: Path, real: Path) -> P.APIError:
    """A one-line 400 naming the adapter (409 if the bank is busy); the private copy's path reads as the real one."""
    message = " ".join(str(e).replace(str(copy), str(real)).split())
    if isinstance(e, AdapterError) and ("being unloaded" in message or "bank is full" in message):
        return P.APIError(409, message, "adapter_busy")  # AdapterBank's wording
    if not isinstance(e, LorakitError):  # not a refusal we wrote: keep the traceback for the operator
        log.warning("loading adapter %r from %s failed", name, real, exc_info=e)
        message = f"{type(e).__name__}: {message}"
    return P.APIError(
        400, f"cannot load adapter {name!r} from {lora_path!r}: {message}", "adapter_invalid", "lora_path"
    )
