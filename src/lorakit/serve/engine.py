"""The serving engine: one thread owns the model and runs step-level continuous batching over many adapters.

    engine = Engine(model, tokenizer, bank, EngineConfig(max_batch=8, wait_ms=5))
    engine.start()
    engine.submit(GenRequest([1, 2, 3], "fr", SamplingParams(max_tokens=16, temperature=0), emit=print))
    engine.call(lambda: bank.load("de", "adapters/de")).result()   # model changes run between steps
    engine.stop()

Every iteration of the loop takes the waiting requests (up to `max_batch` rows in all; when the batch is empty it
waits up to `wait_ms` for more to arrive), prefills the new ones together (left padding, one adapter per row),
appends their KV cache to the running batch's and then runs one decode step for all rows, each row with its
own adapter (`lorakit.mixed.row_adapters`; a batch of one adapter takes the plain single-adapter path; a ladder
adapter's side output is gated to its rows, `lorakit.variants.ladder.ladder_rows`). New
requests join between decode steps, finished ones leave. Rows of different lengths share one left-padded cache
of shape (batch, kv_heads, T, head_dim); the 2D attention mask hides the padding and explicit position ids keep
each row's positions its own, so a row decodes as it would alone.

Torch is not thread-safe for concurrent forwards and loading or deleting an adapter rewires modules, so anything
that touches the model (`call`) runs on this thread, between steps. Each admitted request holds its adapter in
the bank until it ends (a lease: `bank.hold([name])` kept open), so an adapter unloaded meanwhile goes when its
last request finishes; requests still waiting for it fail with 404.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from lorakit.bank import AdapterBank
from lorakit.control import disabled, set_active
from lorakit.errors import AdapterError
from lorakit.mixed import row_adapters
from lorakit.serve.requests import Delta, Done, Failed, GenRequest, sample
from lorakit.variants.ladder import ladder_rows

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Row:
    req: GenRequest
    lease: ExitStack
    generator: torch.Generator | None
    out_ids: list[int] = field(default_factory=list)
    n_real: int = 0  # tokens of this row in the cache (prompt + generated tokens fed back)
    sent: int = 0  # characters of output already emitted
    finished: bool = False


@dataclass(frozen=True)
class EngineConfig:
    """Scheduler settings."""

    max_batch: int = 8
    """Most requests decoded together."""
    wait_ms: float = 5.0
    """When the batch is empty, how long the first request waits for others to share its prefill."""
    max_prefill_tokens: int = 8192
    """Most (padded) prompt tokens prefilled in one forward; a longer single prompt is prefilled alone."""
    max_model_len: int | None = None
    """Context length: prompt plus completion (default: the model's max_position_embeddings)."""


# -- the engine ------------------------------------------------------------------------------------------------


class Engine:
    def __init__(self, model, tokenizer, bank: AdapterBank, config: EngineConfig | None = None) -> None:
        self.model, self.tokenizer, self.bank = model, tokenizer, bank
        self.config = config or EngineConfig()
        if self.config.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.config.max_batch}")
        model_len = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = self.config.max_model_len or model_len
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = _eos_ids(model, tokenizer)
        # the server encodes on its threads, the engine decodes on this one: one tokenizer call at a time
        self.tokenizer_lock = threading.Lock()
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self._inbox: queue.Queue = queue.Queue()
        self._pending: deque[GenRequest] = deque()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (batch, T): 1 for real tokens, 0 for left padding
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.stats = {"steps": 0, "prefills": 0, "max_rows": 0, "requests": 0, "errors": 0}

    # -- public, any thread ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, req: GenRequest) -> None:
        self._inbox.put(req)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between steps; the future holds its result or exception."""
        fut: Future = Future()
        self._inbox.put((fn, fut))
        return fut

    def load(self) -> dict[str, Any]:
        """Rows decoding, requests waiting, and adapters unloaded but kept until their requests finish."""
        unloading = sorted(set(self.bank.paths) - set(self.bank.names()))
        return {
            "running": len(self._rows),
            "waiting": len(self._pending) + self._inbox.qsize(),
            "unloading": unloading,
        }

    # -- the loop ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        log.info("engine started: max_batch=%d wait_ms=%.1f", self.config.max_batch, self.config.wait_ms)
        while not self._stopping.is_set():
            self._take()
            new = self._admit()
            if new:
                self._guarded(self._prefill, new)
            if self._rows:
                self._guarded(self._decode, list(self._rows))
        gone = Failed(503, "the server is shutting down", "server_shutdown")
        for row in self._rows:
            self._finish(row, gone)
        self._drop_finished()
        for req in self._pending:
            req.emit(gone)

    def _guarded(self, step: Callable[[list[_Row]], None], rows: list[_Row]) -> None:
        """Run a prefill or decode step; if it raises, its rows fail (HTTP 500) and the engine keeps serving."""
        try:
            step(rows)
        except Exception as e:  # noqa: BLE001 - a failed forward must not take the server down
            log.exception("engine step failed")
            self.stats["errors"] += 1
            failed = Failed(500, f"generation failed: {type(e).__name__}: {e}", "server_error")
            # after a failed decode the shared cache may be half-updated: the whole batch starts afresh
            for row in rows + (self._rows if step == self._decode else []):
                if not row.finished:
                    self._finish(row, failed)
                if row not in self._rows:
                    row.lease.close()
        self._drop_finished()

    def _take(self) -> None:
        """Move requests from the inbox to the pending queue, running commands on the way. Blocks while idle."""
        idle = not self._rows and not self._pending
        deadline = None
        while True:
            try:
                if idle and deadline is None:
                    item = self._inbox.get(timeout=0.2)
                elif deadline is not None and len(self._pending) < self.config.max_batch:
                    item = self._inbox.get(timeout=max(deadline - time.monotonic(), 0.0))
                else:
                    item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple):
                self._command(*item)
                continue
            self._pending.append(item)
            if idle and deadline is None:  # first request into an empty engine: wait a moment for company
                deadline = time.monotonic() + self.config.wait_ms / 1000

    def _command(self, fn: Callable[[], Any], fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            fut.set_exception(e)

    def _admit(self) -> list[_Row]:
        """Pending requests that join now: up to max_batch rows in all, and the prefill token budget."""
        new: list[_Row] = []
        longest = 0
        while self._pending and len(self._rows) + len(new) < self.config.max_batch:
            req = self._pending[0]
            if req.cancelled:
                self._pending.popleft()
                continue
            longest_if = max(longest, len(req.prompt_ids))
            if new and longest_if * (len(new) + 1) > self.config.max_prefill_tokens:
                break
            self._pending.popleft()
            lease = ExitStack()
            if req.adapter is not None:
                try:
                    lease.enter_context(self.bank.hold([req.adapter]))
                except AdapterError:
                    gone = f"the model {req.adapter!r} was unloaded; adapters: {self.bank.names()}"
                    req.emit(Failed(404, gone, "model_not_found"))
                    continue
            gen = None
            if req.params.seed is not None:
                gen = torch.Generator().manual_seed(req.params.seed)
            new.append(_Row(req, lease, gen))
            longest = longest_if
            self.stats["requests"] += 1
        return new

    # -- forward passes ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _prefill(self, rows: list[_Row]) -> None:
        """Run the new rows' prompts (left-padded) and append their cache to the running batch's."""
        length = max(len(r.req.prompt_ids) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.req.prompt_ids)
            ids[i, length - n :] = torch.tensor(r.req.prompt_ids, dtype=torch.long)
            mask[i, length - n :] = 1
            r.n_real = n
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(rows, ids, mask, positions, cache, last_only=True)
        self._append(cache, mask, rows)
        self.stats["prefills"] += 1
        for i, r in enumerate(rows):
            self._accept(r, logits[i])

    @torch.no_grad()
    def _decode(self, rows: list[_Row]) -> None:
        """One decode step for every running row: feed each row's last token."""
        ids = torch.tensor([[r.out_ids[-1]] for r in rows], dtype=torch.long)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        positions = torch.tensor([[r.n_real] for r in rows], dtype=torch.long)
        logits = self._forward(rows, ids, self._mask, positions, self._cache, last_only=False)
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        for i, r in enumerate(rows):
            r.n_real += 1
            self._accept(r, logits[i])

    def _forward(
        self,
        rows: list[_Row],
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        *,
        last_only: bool,
    ) -> torch.Tensor:
        """Logits of each row's last position, (batch, vocab), with each row's adapter.

        ids and positions are (batch, new tokens), mask (batch, cached + new tokens); `cache` grows in place."""
        device = next(self.model.parameters()).device
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if last_only and self._keep_kw:
            kwargs[self._keep_kw] = 1
        with self._adapters([r.req.adapter for r in rows]):
            out = self.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                **kwargs,
            )
        return out.logits[:, -1].float().cpu()

    def _adapters(self, names: list[str | None]) -> AbstractContextManager:
        """Row i of the next forward passes uses adapter names[i] (None: the base model).

        Not `bank.use`: that refuses adapters unloaded meanwhile, which the rows' leases (`bank.hold`) still
        keep. The bank's ladder, if any, reaches only its own rows, which are base rows for LoRA."""
        ladder = self.bank.ladder
        if ladder is None:
            return self._lora(names)
        stack = ExitStack()
        stack.enter_context(ladder_rows(self.model, [n == ladder for n in names]))
        stack.enter_context(self._lora([None if n == ladder else n for n in names]))
        return stack

    def _lora(self, names: list[str | None]) -> AbstractContextManager:
        distinct = set(names)
        if distinct == {None}:
            return disabled(self.model)
        if len(distinct) == 1:  # the single-adapter path, as offline generation takes
            set_active(self.model, names[0])
            return nullcontext()
        return row_adapters(self.model, names)

    def _append(self, cache: DynamicCache, mask: torch.Tensor, rows: list[_Row]) -> None:
        """Join the new rows' cache and mask to the running batch's, left-padding the shorter to a common T."""
        if self._cache is None:
            self._cache, self._mask, self._rows = cache, mask, list(rows)
            return
        old, new = _kv(self._cache), _kv(cache)
        t = max(self._mask.shape[1], mask.shape[1])
        merged = [
            tuple(
                torch.cat([_pad_left(a, t, dim=2), _pad_left(b, t, dim=2)], dim=0)
                for a, b in zip(x, y, strict=True)
            )
            for x, y in zip(old, new, strict=True)
        ]
        self._cache = _make_cache(merged)
        self._mask = torch.cat([_pad_left(self._mask, t, dim=1), _pad_left(mask, t, dim=1)], dim=0)
        self._rows = self._rows + list(rows)

    def _drop_finished(self) -> None:
        """Remove finished and cancelled rows from the batch, and cache columns no row needs any more."""
        for r in self._rows:
            if r.req.cancelled and not r.finished:
                r.finished = True
        keep = [i for i, r in enumerate(self._rows) if not r.finished]
        for r in self._rows:
            if r.finished:
                r.lease.close()
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        idx = torch.tensor(keep, dtype=torch.long)
        mask = self._mask.index_select(0, idx)
        start = int(mask.any(0).nonzero()[0, 0])  # leading columns that are padding in every remaining row
        self._mask = mask[:, start:]
        self._cache = _make_cache(
            [
                (
                    k.index_select(0, idx.to(k.device))[:, :, start:],
                    v.index_select(0, idx.to(v.device))[:, :, start:],
                )
                for k, v in _kv(self._cache)
            ]
        )

    # -- tokens to text ----------------------------------------------------------------------------------------

    def _accept(self, row: _Row, logits: torch.Tensor) -> None:
        """Sample the row's next token, emit the new text, and decide whether the row is done."""
        p = row.req.params
        tok = sample(logits, p.temperature, p.top_p, row.generator)
        row.out_ids.append(tok)
        reason = None
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = "stop"
        with self.tokenizer_lock:
            text = self.tokenizer.decode(row.out_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        if reason is None and (len(row.out_ids) >= p.max_tokens or row.n_real + 1 >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if len(text) > row.sent:
                row.req.emit(Delta(text[row.sent :]))
            self._finish(row, Done(reason, len(row.req.prompt_ids), len(row.out_ids)))
            return
        safe = len(text) - max((len(s) - 1 for s in p.stop), default=0)  # a stop string may be starting
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            safe = min(safe, len(text) - 1)
        if safe > row.sent:
            row.req.emit(Delta(text[row.sent : safe]))
            row.sent = safe

    def _finish(self, row: _Row, event: Done | Failed) -> None:
        row.finished = True
        row.req.emit(event)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


# -- KV cache tensors ------------------------------------------------------------------------------------------


def _kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each (batch, kv_heads, T, head_dim)."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def _make_cache(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def _pad_left(x: torch.Tensor, length: int, *, dim: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
