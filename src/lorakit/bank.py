"""An adapter bank: many adapters resident over one base model, for serving and for switching.

    bank = AdapterBank(model, max_adapters=8)
    bank.load("fr", "adapters/fr"); bank.load("de", "adapters/de", pin=True)
    with bank.use(["fr", "de", None]):      # a mixed batch: one adapter per row (None: base model)
        logits = model(input_ids).logits
    bank.activate("fr")                     # hot swap for plain forward calls: a pointer change
    bank.unload("fr")

Loading beyond `max_adapters` evicts the least recently used adapter that is neither pinned nor in use. An
adapter unloaded while batches use it stays until the last of them ends, so in-flight requests finish. All
methods are thread-safe; forward passes themselves are the caller's to serialise.

One ladder adapter (a side network with mlp blocks, `lorakit.variants.ladder`) may be loaded too: it is attached
once, and its output reaches only the rows that name it (`ladder_rows`); for LoRA routing those rows are base rows.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from torch import nn

from lorakit.control import active_adapters, disabled, set_active
from lorakit.errors import AdapterError
from lorakit.formats import folder_refusal
from lorakit.inject import delete_adapter
from lorakit.io import LoadPlan, apply_plan, plan_adapter
from lorakit.mixed import row_adapters
from lorakit.registry import adapter_names
from lorakit.variants.ladder import PEFT_TYPE as LADDER
from lorakit.variants.ladder import detach_ladder, ladder_of, ladder_rows


class AdapterBank:
    def __init__(self, model: nn.Module, *, max_adapters: int | None = None) -> None:
        if max_adapters is not None and max_adapters < 1:
            raise AdapterError(f"max_adapters must be at least 1, got {max_adapters}")
        self.model = model
        self.max_adapters = max_adapters
        self.paths: dict[str, Path | None] = {n: None for n in adapter_names(model)}
        self.pinned: set[str] = set()
        self._lru: OrderedDict[str, float] = OrderedDict((n, time.monotonic()) for n in self.paths)
        self._in_use: Counter[str] = Counter()
        self._doomed: set[str] = set()  # unloaded while in use: deleted when released
        self._lock = threading.RLock()
        self.ladder: str | None = None  # the name of the loaded ladder adapter, if any
        self._loads = itertools.count(1)
        self.serials: dict[str, int] = {n: next(self._loads) for n in self.paths}
        """Which load each adapter is: a name unloaded and loaded again gets a new serial (caches key on it)."""
        if self.paths:
            set_active(model, {})

    # -- contents ---------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return [n for n in self.paths if n not in self._doomed]

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def load(
        self,
        name: str,
        path: str | Path,
        *,
        pin: bool = False,
        allow_pickle: bool = False,
        source: str | Path | None = None,
    ) -> float:
        """Load the adapter folder `path` as `name`; returns the seconds it took. Evicts if the bank is full.

        `source` is the folder recorded in `paths` when `path` is a copy of it (default: `path`)."""
        with self._lock:
            if name in self.paths and name not in self._doomed:
                raise AdapterError(f"adapter {name!r} is already loaded (from {self.paths[name]})")
            if name in self._doomed:
                raise AdapterError(f"adapter {name!r} is still being unloaded (requests in flight); retry")
            t0 = time.perf_counter()
            reason = folder_refusal(path, "bank")
            if reason:
                raise AdapterError(reason)
            # the file is read and checked, and refusals made, before evicting: a bad file must not evict anyone
            plan = plan_adapter(self.model, path, name, allow_pickle=allow_pickle)
            if plan.peft_type == LADDER:
                self._check_ladder(plan)
            if self.max_adapters is not None and len(self.names()) >= self.max_adapters:
                self._evict_one()
            apply_plan(self.model, plan, name, activate=False)
            if plan.peft_type == LADDER:  # plain forward calls stay the base's until routed (use, activate)
                ladder_of(self.model).set_rows(False)
                self.ladder = name
            self.paths[name] = Path(source if source is not None else path)
            self.serials[name] = next(self._loads)
            self._lru[name] = time.monotonic()
            if pin:
                self.pinned.add(name)
            return time.perf_counter() - t0

    def unload(self, name: str) -> None:
        """Remove `name`; if batches are using it, it goes when the last of them ends."""
        with self._lock:
            self._known(name)
            self.pinned.discard(name)
            if self._in_use[name]:
                self._doomed.add(name)
            else:
                self._delete(name)

    def pin(self, name: str, pinned: bool = True) -> None:
        with self._lock:
            self._known(name)
            (self.pinned.add if pinned else self.pinned.discard)(name)

    # -- use --------------------------------------------------------------------------------------------------

    def activate(self, name: str | None) -> None:
        """Make `name` the adapter of plain forward calls (None: the base model). No weights move."""
        with self._lock:
            if name is not None:
                self._known(name)
                self._touch(name)
            if self.ladder is not None:
                ladder_of(self.model).set_rows(name == self.ladder)
                name = None if name == self.ladder else name
            if any(n != self.ladder for n in self.paths):  # LoRA adapters are loaded
                set_active(self.model, {} if name is None else name)

    @contextmanager
    def hold(self, names: Sequence[str | None]) -> Iterator[None]:
        """A lease: the adapters in `names` stay loaded until the block ends (an unload meanwhile waits for it),
        and count as recently used. Routing is left as it is: see `use`."""
        distinct = {n for n in names if n is not None}
        with self._lock:
            for n in distinct:
                self._known(n)
            for n in distinct:
                self._in_use[n] += 1
                self._touch(n)
        try:
            yield
        finally:
            with self._lock:
                for n in distinct:
                    self._in_use[n] -= 1
                    if not self._in_use[n] and n in self._doomed:
                        self._delete(n)

    @contextmanager
    def use(self, names: Sequence[str | None]) -> Iterator[None]:
        """Run the block's forward passes with adapter `names[i]` for batch row i (None: no adapter), holding
        them (`hold`) meanwhile. The adapters active before are active again afterwards.

        A batch of one adapter takes the single-adapter path; a mixed batch the stacked mixed-adapter path."""
        with self.hold(names), ExitStack() as stack:
            if self.ladder is not None:  # the ladder's rows get its side output and no LoRA
                stack.enter_context(ladder_rows(self.model, [n == self.ladder for n in names]))
                names = [None if n == self.ladder else n for n in names]
            distinct = set(names)
            if distinct == {None}:
                ctx = disabled(self.model)
            elif len(distinct) == 1:
                ctx = _activated(self.model, next(iter(distinct)))
            else:
                ctx = row_adapters(self.model, list(names))
            with ctx:
                yield

    # -- internals --------------------------------------------------------------------------------------------

    def _known(self, name: str) -> None:
        if name not in self.paths or name in self._doomed:
            raise AdapterError(f"no adapter {name!r} in the bank; loaded: {self.names()}")

    def _check_ladder(self, plan: LoadPlan) -> None:
        """AdapterError if the bank cannot serve the planned ladder."""
        cfg, _ = plan.payload
        if cfg.block != "mlp":
            raise AdapterError(
                f"{plan.path}: a ladder with {cfg.block} side blocks cannot be served: they keep their own KV "
                "cache, which the batch's cache surgery (rows joining and leaving) does not mirror; serve a ladder "
                "with mlp side blocks, or use lorakit generate --adapter DIR"
            )
        if self.ladder is not None:
            state = (
                " and is still being unloaded (requests in flight); retry"
                if self.ladder in self._doomed
                else ""
            )
            raise AdapterError(
                f"{plan.path}: ladder adapter {self.ladder!r} is already loaded{state}; one ladder side network "
                "can be attached to a model, so unload it first"
            )
        if ladder_of(self.model) is not None:
            raise AdapterError(
                f"{plan.path}: the model already carries a ladder side network attached outside the bank"
            )

    def _touch(self, name: str) -> None:
        self._lru[name] = time.monotonic()
        self._lru.move_to_end(name)

    def _evict_one(self) -> None:
        for name in self._lru:  # oldest first
            if name not in self.pinned and not self._in_use[name] and name not in self._doomed:
                self._delete(name)
                return
        raise AdapterError(
            f"the bank is full ({self.max_adapters} adapters) and every adapter is pinned or in use; "
            "unload one first"
        )

    def _delete(self, name: str) -> None:
        if name == self.ladder:
            detach_ladder(self.model)
            self.ladder = None
        else:
            delete_adapter(self.model, name)
        self.paths.pop(name, None)
        self.serials.pop(name, None)
        self._lru.pop(name, None)
        self._doomed.discard(name)
        self._in_use.pop(name, None)
        self.pinned.discard(name)


@contextmanager
def _activated(model: nn.Module, name: str) -> Iterator[None]:
    """`name` active inside the block, the previous active set restored after it."""
    before = active_adapters(model)
    set_active(model, name)
    try:
        yield
    finally:
        set_active(model, before)
