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

A name is served by one of the model's adapters, its *slot* (`slot`): the name itself where the model takes it
(letters, digits, _ and -) and no other adapter holds it, else a free variant of it (`org/fr` is served by
`org_fr`, a second load of `fr` while the first is still in use by `fr-2`). So names may hold `.`, `/` or `:`,
and a name can be loaded again at once:

    bank.load("fr", "adapters/fr-step2", replace=True)   # in place: requests running on fr finish on the old
                                                         # weights, later ones get the new (vLLM's load_inplace)

A lease (`hold`, `use`) takes the slots its names have when it starts and keeps them until it ends.

With `heads=True` the bank also serves classifier adapters (task_type SEQ_CLS: reward models, text classifiers,
as `lorakit train --objective reward|classify` saves them) over the same causal LM: their LoRA pairs load like any
other's, and their heads are kept beside the model (`bank.head(name)`, scored with
`lorakit.classifier_heads.head_scores`), so that one base in memory generates and classifies.

One ladder adapter (a side network with mlp blocks, `lorakit.variants.ladder`) may be loaded too: it is attached
once, and its output reaches only the rows that name it (`ladder_rows`); for LoRA routing those rows are base rows.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from torch import nn

from lorakit.classifier_heads import Head, keep_heads_beside, read_head
from lorakit.control import active_adapters, disabled, set_active
from lorakit.embeddings import embedding_pooling
from lorakit.errors import AdapterError
from lorakit.formats import folder_refusal
from lorakit.inject import ADAPTER_NAME, delete_adapter
from lorakit.io import LoadPlan, apply_plan, plan_adapter
from lorakit.mixed import row_adapters
from lorakit.registry import adapter_names
from lorakit.variants.ladder import PEFT_TYPE as LADDER
from lorakit.variants.ladder import detach_ladder, ladder_of, ladder_rows


class AdapterBank:
    def __init__(self, model: nn.Module, *, max_adapters: int | None = None, heads: bool = False) -> None:
        if max_adapters is not None and max_adapters < 1:
            raise AdapterError(f"max_adapters must be at least 1, got {max_adapters}")
        self.model = model
        self.max_adapters = max_adapters
        self.heads: dict[str, Head] = {}
        """Slot -> the head of the classifier adapter it holds (with `heads`)."""
        self.poolings: dict[str, str] = {}
        """Slot -> the pooling of the embedding model's adapter it holds (task_type FEATURE_EXTRACTION; with
        `heads`)."""
        self._keeps_heads = heads
        if heads:
            keep_heads_beside(model)
        self.paths: dict[str, Path | None] = {n: None for n in adapter_names(model)}
        """The folder each name was loaded from (None: on the model before the bank)."""
        self.pinned: set[str] = set()
        self._slots: dict[str, str] = {n: n for n in self.paths}  # name -> the model's adapter serving it
        self._lru: OrderedDict[str, float] = OrderedDict((n, time.monotonic()) for n in self.paths)
        self._in_use: Counter[str] = Counter()  # slot -> leases
        self._retired: dict[str, str] = {}  # slot -> the name it served: unloaded or replaced while in use
        self._lock = threading.RLock()
        self.ladder: str | None = None  # the slot of the loaded ladder adapter, if any
        self._loads = itertools.count(1)
        self.serials: dict[str, int] = {n: next(self._loads) for n in self.paths}
        """Which load each slot holds: a slot deleted and used again gets a new serial (caches key on it)."""
        self.stats: Counter[str] = Counter()
        """What the bank has done: `loads` (and `load_seconds`, their total time), `refused` loads, `unloads`,
        `evictions` (unloads to make room), `replaced` (loads in place). Counts only grow."""
        if self.paths:
            set_active(model, {})

    # -- contents ---------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._slots

    def slot(self, name: str) -> str:
        """The model's adapter that serves `name` now (AdapterError if no adapter of that name is loaded)."""
        with self._lock:
            self._known(name)
            return self._slots[name]

    def slots(self) -> list[str]:
        """The model's adapters that serve a name now (not those kept only for requests in flight)."""
        with self._lock:
            return list(self._slots.values())

    def head(self, name: str) -> Head | None:
        """The head of classifier adapter `name`, None for another adapter (AdapterError if `name` is not loaded)."""
        return self.heads.get(self.slot(name))

    def pooling(self, name: str) -> str | None:
        """The pooling of embedding model adapter `name`, None for another adapter (AdapterError if `name` is not
        loaded)."""
        return self.poolings.get(self.slot(name))

    def unloading(self) -> list[str]:
        """The names whose old adapter is kept for requests in flight: unloaded, or loaded again in place."""
        with self._lock:
            return sorted(set(self._retired.values()))

    def load(
        self,
        name: str,
        path: str | Path,
        *,
        pin: bool = False,
        allow_pickle: bool = False,
        source: str | Path | None = None,
        replace: bool = False,
    ) -> float:
        """Load the adapter folder `path` as `name`; returns the seconds it took. Evicts if the bank is full.

        `replace`: if `name` is loaded, the new file serves it from now on, and leases taken before keep the old
        adapter until they end (a name not loaded is just loaded). Nothing changes if the file is refused.
        `source` is the folder recorded in `paths` when `path` is a copy of it (default: `path`)."""
        with self._lock:
            if not isinstance(name, str) or not name:
                raise AdapterError(f"an adapter name must be a non-empty string, got {name!r}")
            old = self._slots.get(name)
            if old is not None and not replace:
                raise AdapterError(
                    f"adapter {name!r} is already loaded (from {self.paths[name]}); unload it first, or replace it"
                )
            t0 = time.perf_counter()
            try:
                reason = folder_refusal(path, "bank")
                if reason:
                    raise AdapterError(reason)
                slot = self._free_slot(name)
                # the file is read and checked, and refusals made, before evicting: a bad file must not evict
                plan = plan_adapter(self.model, path, slot, allow_pickle=allow_pickle)
                head = read_head(self.model, path, allow_pickle=allow_pickle) if self._keeps_heads else None
                pooling = embedding_pooling(self.model, path) if self._keeps_heads else None
                if plan.peft_type == LADDER:
                    self._check_ladder(plan, replacing=old)
                if old is None and self.max_adapters is not None and len(self._slots) >= self.max_adapters:
                    self._evict_one()
                apply_plan(self.model, plan, slot, activate=False)
                if head is not None:
                    self.heads[slot] = head
                if pooling is not None:
                    self.poolings[slot] = pooling
            except Exception:
                self.stats["refused"] += 1
                raise
            if plan.peft_type == LADDER:  # plain forward calls stay the base's until routed (use, activate)
                ladder_of(self.model).set_rows(False)
                self.ladder = slot
            if old is not None:
                self._retire(old, name)
            self._slots[name] = slot
            self.paths[name] = Path(source if source is not None else path)
            self.serials[slot] = next(self._loads)
            self._touch(name)
            if pin:
                self.pinned.add(name)
            seconds = time.perf_counter() - t0
            self.stats["loads"] += 1
            self.stats["load_seconds"] += seconds
            self.stats["replaced"] += old is not None
            return seconds

    def unload(self, name: str) -> None:
        """Remove `name`; if batches are using it, its adapter goes when the last of them ends."""
        with self._lock:
            self._known(name)
            self._drop(name)
            self.stats["unloads"] += 1

    def pin(self, name: str, pinned: bool = True) -> None:
        with self._lock:
            self._known(name)
            (self.pinned.add if pinned else self.pinned.discard)(name)

    # -- use --------------------------------------------------------------------------------------------------

    def activate(self, name: str | None) -> None:
        """Make `name` the adapter of plain forward calls (None: the base model). No weights move."""
        with self._lock:
            slot = None
            if name is not None:
                slot = self.slot(name)
                self._touch(name)
            if self.ladder is not None:
                ladder_of(self.model).set_rows(slot == self.ladder)
                slot = None if slot == self.ladder else slot
            if any(s != self.ladder for s in self.serials):  # LoRA adapters are loaded
                set_active(self.model, {} if slot is None else slot)

    @contextmanager
    def hold(self, names: Sequence[str | None]) -> Iterator[list[str | None]]:
        """A lease: the adapters serving `names` now stay loaded until the block ends (an unload or a replacement
        meanwhile waits for it), and count as recently used. Yields their slots, the model's adapter names (None
        stays None). Routing is left as it is: see `use`."""
        with self._lock:
            for n in names:
                if n is not None:
                    self._known(n)
            slots = [None if n is None else self._slots[n] for n in names]
            distinct = {s for s in slots if s is not None}
            for s in distinct:
                self._in_use[s] += 1
            for n in {n for n in names if n is not None}:
                self._touch(n)
        try:
            yield slots
        finally:
            with self._lock:
                for s in distinct:
                    self._in_use[s] -= 1
                    if not self._in_use[s] and s in self._retired:
                        self._delete(s)

    @contextmanager
    def use(self, names: Sequence[str | None]) -> Iterator[None]:
        """Run the block's forward passes with adapter `names[i]` for batch row i (None: no adapter), holding
        them (`hold`) meanwhile. The adapters active before are active again afterwards.

        A batch of one adapter takes the single-adapter path; a mixed batch the stacked mixed-adapter path."""
        with self.hold(names) as slots, ExitStack() as stack:
            if self.ladder is not None:  # the ladder's rows get its side output and no LoRA
                stack.enter_context(ladder_rows(self.model, [s == self.ladder for s in slots]))
                slots = [None if s == self.ladder else s for s in slots]
            distinct = set(slots)
            if distinct == {None}:
                ctx = disabled(self.model)
            elif len(distinct) == 1:
                ctx = _activated(self.model, next(iter(distinct)))
            else:
                ctx = row_adapters(self.model, list(slots))
            with ctx:
                yield

    # -- internals --------------------------------------------------------------------------------------------

    def _known(self, name: str | None) -> None:
        if name not in self._slots:
            raise AdapterError(f"no adapter {name!r} in the bank; loaded: {self.names()}")

    def _free_slot(self, name: str) -> str:
        """A model adapter name for a new load of `name`: the name where the model takes it and it is free."""
        base = name if ADAPTER_NAME.match(name) else re.sub(r"[^A-Za-z0-9_-]", "_", name)
        taken = set(adapter_names(self.model)) | set(self.serials)
        slot, k = base, 1
        while slot in taken:
            k += 1
            slot = f"{base}-{k}"
        return slot

    def _name_of(self, slot: str) -> str:
        """The name `slot` serves, or served before it was retired."""
        return self._retired.get(slot) or next(n for n, s in self._slots.items() if s == slot)

    def _check_ladder(self, plan: LoadPlan, *, replacing: str | None) -> None:
        """AdapterError if the bank cannot serve the planned ladder (`replacing`: the slot it would replace)."""
        cfg, _ = plan.payload
        if cfg.block != "mlp":
            raise AdapterError(
                f"{plan.path}: a ladder with {cfg.block} side blocks cannot be served: they keep their own KV "
                "cache, which the batch's cache surgery (rows joining and leaving) does not mirror; serve a ladder "
                "with mlp side blocks, or use lorakit generate --adapter DIR"
            )
        if self.ladder is not None:
            name = self._name_of(self.ladder)
            if self.ladder == replacing:
                raise AdapterError(
                    f"{plan.path}: ladder adapter {name!r} cannot be replaced in place: a model carries one ladder "
                    "side network, and requests may be using this one; unload it, then load the new one"
                )
            state = (
                " and is still being unloaded (requests in flight); retry"
                if self.ladder in self._retired
                else ""
            )
            raise AdapterError(
                f"{plan.path}: ladder adapter {name!r} is already loaded{state}; one ladder side network "
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
            if name not in self.pinned and not self._in_use[self._slots[name]]:
                self._drop(name)
                self.stats["evictions"] += 1
                return
        raise AdapterError(
            f"the bank is full ({self.max_adapters} adapters) and every adapter is pinned or in use; "
            "unload one first"
        )

    def _drop(self, name: str) -> None:
        """Stop serving `name`; its adapter goes now, or when its last lease ends."""
        slot = self._slots.pop(name)
        self.paths.pop(name, None)
        self._lru.pop(name, None)
        self.pinned.discard(name)
        self._retire(slot, name)

    def _retire(self, slot: str, name: str) -> None:
        if self._in_use[slot]:
            self._retired[slot] = name
        else:
            self._delete(slot)

    def _delete(self, slot: str) -> None:
        if slot == self.ladder:
            detach_ladder(self.model)
            self.ladder = None
        else:
            delete_adapter(self.model, slot)
        self.serials.pop(slot, None)
        self.heads.pop(slot, None)
        self.poolings.pop(slot, None)
        self._retired.pop(slot, None)
        self._in_use.pop(slot, None)


@contextmanager
def _activated(model: nn.Module, name: str) -> Iterator[None]:
    """`name` active inside the block, the previous active set restored after it."""
    before = active_adapters(model)
    set_active(model, name)
    try:
        yield
    finally:
        set_active(model, before)
