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
(`lorakit.serve.batch`), so a row decodes as it would alone. This module schedules; the forward passes and each
row's next token are `lorakit.serve.runner`'s.

The KV cache of each prompt prefilled, and of each finished row (prompt and generated tokens), goes to the prefix
cache (`lorakit.serve.prefixes`); a new row whose prompt starts like a cached sequence prefills only the rest, its
cached start put in front as past keys and values (rows of one prefill then have padding between their cached
start and their new tokens, which the mask hides like any other). Prompts wait for their prefill in a queue
(`lorakit.serve.prefill`) that computes at most `prefill_chunk` prompt tokens per step: a longer prompt is computed
a chunk per step, between decode steps (while nothing decodes, prompts are prefilled whole), and long starts
that new prompts share are computed once.

Torch is not thread-safe for concurrent forwards and loading or deleting an adapter rewires modules, so anything
that touches the model (`call`) runs on this thread, between steps. Each request holds its adapter in the bank
until it ends (a lease: `bank.hold([name])` kept open), taken when the server accepted it (`GenRequest.lease`,
which the row takes over) or else when the engine admits it; so an adapter unloaded meanwhile goes when its last
request finishes, and requests that hold no lease yet fail with 404. The lease fixes which of the model's adapters
the row runs with (`Row.adapter`): a name loaded again in place (`AdapterBank.load(replace=True)`) serves requests
accepted after it with the new weights, while those accepted before finish on the old.

A failure is its request's alone: an exception while admitting a request (its seed, its adapter's lease) fails
that request (HTTP 500); a failed batched prefill is retried row by row, so only the rows that fail alone fail;
the per-row work of a step (sampling, detokenizing, stop strings, emitting) is guarded row by row. Only a failed
decode forward, which no row can be blamed for and which may leave the shared cache half-updated, fails the
whole batch. Nothing a request carries stops the loop; once stopped, new work fails at once (`EngineStopped`,
503) instead of waiting forever.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.bank import AdapterBank
from lorakit.errors import AdapterError
from lorakit.serve.batch import Batch
from lorakit.serve.guide import Guide
from lorakit.serve.prefill import PrefillQueue, prompt_key
from lorakit.serve.prefixes import PrefixCache
from lorakit.serve.requests import SHUTDOWN, Failed, GenRequest, deliver, failure, release
from lorakit.serve.rows import Row
from lorakit.serve.runner import Runner

log = logging.getLogger(__name__)


class EngineStopped(RuntimeError):
    """Work handed to an engine that has stopped (or is stopping)."""


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
    prefix_cache_bytes: int = 1 << 30
    """Most bytes of finished requests' KV cache kept for later prompts that start the same way (0: none)."""
    prefill_chunk: int = 512
    """Most prompt tokens computed between two decode steps: a longer prompt is prefilled a chunk per step, so
    that the rows decoding meanwhile pause for one chunk at a time, not for the whole prompt; while no row decodes,
    prompts run whole, up to max_prefill_tokens (0: whole prompts)."""


# -- the engine ------------------------------------------------------------------------------------------------


class Engine:
    def __init__(self, model, tokenizer, bank: AdapterBank, config: EngineConfig | None = None) -> None:
        self.model, self.tokenizer, self.bank = model, tokenizer, bank
        self.config = config or EngineConfig()
        if self.config.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.config.max_batch}")
        model_len = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = self.config.max_model_len or model_len
        self._inbox: queue.Queue = queue.Queue()
        self._pending: deque[GenRequest] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        if self.config.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be at least 0, got {self.config.prefix_cache_bytes}")
        self.prefixes = PrefixCache(bank, self.config.prefix_cache_bytes)
        self._batch = Batch(self.prefixes)  # the rows decoding, and their cache
        self.stats = {
            "steps": 0,
            "prefills": 0,
            "prefill_chunks": 0,
            "shared_prefills": 0,
            "shared_starts": 0,
            "prompt_tokens": 0,
            "cached_prompt_tokens": 0,
            "generated_tokens": 0,
            "max_rows": 0,
            "requests": 0,
            "errors": 0,
        }
        self.runner = Runner(
            model, tokenizer, bank, self.prefixes, self._batch, self.stats, max_model_len=self.max_model_len
        )
        self.vocab_size, self.tokenizer_lock = self.runner.vocab_size, self.runner.tokenizer_lock
        self.token_text = self.runner.token_text  # any thread
        self._queue = PrefillQueue(  # admitted rows whose prompts are not yet (wholly) computed
            self.runner.forward,
            self.prefixes,
            self._fail_rows,
            chunk=self.config.prefill_chunk,
            max_tokens=self.config.max_prefill_tokens,
            pad_id=self.runner.pad_id,
            stats=self.stats,
        )

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
        """Queue a request; on a stopped engine it fails at once (503)."""
        if self._stopping.is_set():
            deliver(req, SHUTDOWN)
            return
        self._inbox.put(req)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between steps; the future holds its result or exception
        (`EngineStopped` if the engine stops first)."""
        fut: Future = Future()
        if self._stopping.is_set():
            fut.set_exception(EngineStopped("the engine has stopped"))
            return fut
        self._inbox.put((fn, fut))
        return fut

    def load(self) -> dict[str, Any]:
        """Rows decoding, requests waiting, and adapters unloaded (or loaded again in place) whose old weights are
        kept until their requests finish."""
        return {
            "running": len(self._batch) + len(self._queue),
            "waiting": len(self._pending) + self._inbox.qsize(),
            "unloading": self.bank.unloading(),
        }

    # -- the loop ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        log.info("engine started: max_batch=%d wait_ms=%.1f", self.config.max_batch, self.config.wait_ms)
        while not self._stopping.is_set():
            try:
                self._iteration()
            except Exception as e:  # noqa: BLE001 - the last guard: the loop must outlive any bug
                log.exception("engine iteration failed")
                self._fail_batch(failure(e))
                time.sleep(0.01)  # should it repeat, the log stays readable and the CPU free
        self._stopping.set()
        for row in self._batch.rows:
            row.finish(SHUTDOWN)
        self._batch.drop_finished()
        self._fail_rows(self._queue.rows, SHUTDOWN, error=False)
        self._queue.rows = []
        while self._pending:
            deliver(self._pending.popleft(), SHUTDOWN)
        while True:  # work that arrived while stopping
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple):
                item[1].set_exception(EngineStopped("the engine has stopped"))
            else:
                deliver(item, SHUTDOWN)

    def _iteration(self) -> None:
        self._take()
        new = self._admit()
        decoding = len(self._batch) > 0  # else no answer waits: whole prompts, not chunks (`serve.prefill`)
        spent = self._queue.add(new, decoding=decoding) if new else 0
        if self._queue:
            ready = self._queue.step(spent, decoding=decoding)
            if ready:
                self._prefill_isolated(ready)
            # rows done in their prefill (max_tokens=1, a stop) take no decode step
            self._batch.drop_finished()
        if self._batch.rows:
            rows = list(self._batch.rows)
            try:
                self.runner.decode(rows)
            except Exception as e:  # noqa: BLE001 - a failed forward must not take the server down
                log.exception("decode step failed")
                # no row to blame, and the shared cache may be half-updated: the whole batch starts afresh
                self._fail_batch(failure(e))
        self._batch.drop_finished()

    def _prefill_isolated(self, rows: list[Row]) -> None:
        """Prefill the new rows together; if that raises, each alone, so that only the rows that fail alone fail.

        A prefill that raises has changed nothing shared (its cache joins the batch's only once it succeeded)."""
        try:
            self.runner.prefill(rows)
            return
        except Exception as e:  # noqa: BLE001 - one bad row must not fail the others
            if len(rows) == 1:
                log.exception("prefill failed")
                self._fail_rows(rows, failure(e))
                return
            log.warning(
                "a prefill of %d rows failed (%s: %s); prefilling them one by one",
                len(rows),
                type(e).__name__,
                e,
            )
        for row in rows:
            try:
                self.runner.prefill([row])
            except Exception as e:  # noqa: BLE001
                log.exception("prefill failed")
                self._fail_rows([row], failure(e))

    def _fail_rows(self, rows: list[Row], event: Failed, *, error: bool = True) -> None:
        """Fail rows that are not (or no longer) in the batch, releasing their adapters."""
        if error:
            self.stats["errors"] += 1
        for row in rows:
            if not row.finished:
                row.finish(event)
            if row not in self._batch.rows:
                row.lease.close()

    def _fail_batch(self, event: Failed) -> None:
        self.stats["errors"] += 1
        for row in self._batch.rows:
            if not row.finished:
                row.finish(event)
        self._batch.drop_finished()

    def _take(self) -> None:
        """Move requests from the inbox to the pending queue, running commands on the way. Blocks while idle."""
        idle = not self._batch.rows and not self._pending and not self._queue
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

    def _admit(self) -> list[Row]:
        """Pending requests that join now: up to max_batch rows in all, and the prefill token budget (counted over
        distinct prompts: equal ones share a forward, `Runner.prefill`)."""
        new: list[Row] = []
        longest, distinct = 0, set()
        while self._pending and len(self._batch) + len(self._queue) + len(new) < self.config.max_batch:
            req = self._pending[0]
            if req.cancelled:
                release(self._pending.popleft())
                continue
            slot = self._slot(req)
            key = prompt_key(slot, req)
            hit = self.prefixes.lookup_request(slot, req)
            longest_if = max(longest, len(req.prompt_ids) - (hit.length if hit else 0))
            forwards = len(distinct | {key})
            if new and longest_if * forwards > self.config.max_prefill_tokens:
                break
            self._pending.popleft()
            row = self._row(req)
            if row is not None:
                row.prefix = hit if row.adapter == slot else None
                new.append(row)
                longest = longest_if
                distinct.add(key)
        return new

    def _slot(self, req: GenRequest) -> str | None:
        """The model's adapter the request was accepted with, else the one serving its model now (None: the base
        model, or a name not loaded)."""
        if req.adapter is None or req.lease is not None:
            return req.slot
        try:
            return self.bank.slot(req.adapter)
        except AdapterError:  # `_row` fails the request
            return None

    def _row(self, req: GenRequest) -> Row | None:
        """The batch row of `req`, holding its adapter; None (and the request failed) if that is not possible."""
        self.stats["requests"] += 1
        # the row takes over the hold the request took when it was accepted, if it did
        lease, slot, req.lease = req.lease or ExitStack(), req.slot, None
        try:
            if req.adapter is not None and slot is None:
                try:
                    (slot,) = lease.enter_context(self.bank.hold([req.adapter]))
                except AdapterError:
                    gone = f"the model {req.adapter!r} was unloaded; adapters: {self.bank.names()}"
                    deliver(req, Failed(404, gone, "model_not_found"))
                    return None
            p = req.params
            gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
            text = functools.partial(self.token_text, special=False)
            guide = Guide(p.guide, text) if p.guide is not None else None
            return Row(req, lease, gen, frozenset(p.stop_token_ids), guide=guide, adapter=slot)
        except Exception as e:  # noqa: BLE001 - this request alone fails
            log.exception("admitting a request failed")
            lease.close()
            self.stats["errors"] += 1
            deliver(req, failure(e))
            return None
