"""The queue of prompts waiting for their prefill, and how much of them each engine step computes.

    queue = PrefillQueue(forward, prefixes, fail, chunk=512, max_tokens=8192, pad_id=0, stats=engine.stats)
    spent = queue.add(new_rows, decoding=True)  # admitted rows: long starts they share are computed once
    ready = queue.step(spent, decoding=True)    # the rows to prefill now, first come first

While rows are decoding, each step computes at most `chunk` prompt tokens, so that those rows pause for one
chunk at a time (chunked prefill). The rows whose rest (after what the prefix cache holds) fits in what is left of
the chunk are handed back to be prefilled and join the batch; of the first one that does not fit, the next chunk
of its prompt is computed with what is left and kept as its cached start (`Row.prefix`), shared with the rows of
the same prompt and kept in the prefix cache for later ones. A prompt to score (`prompt_logprobs`) runs whole:
alone when it does not fit. Without a chunk size (0) every waiting row is ready at once.

While nothing decodes, no answer waits for the prompts, and chunks only cost time (each attends to the ones
before it through an explicit mask, and its cached start is copied in: with nothing streaming, a long prompt's
first token came 1.19x later in chunks of 512, benchmarks/bench_chunked.py): waiting rows are prefilled whole, as many as `max_tokens` padded prompt tokens
allow (the engine's `max_prefill_tokens`, counted as `Engine._admit` counts them); only a longer prompt is
computed in chunks of `max_tokens`.

The engine thread owns the queue; `forward` is the engine's (`Runner.forward`), `fail` fails rows that are not in
the batch (releasing their adapters).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from lorakit.serve import kvcache
from lorakit.serve.prefixes import PrefixCache, shared_starts
from lorakit.serve.requests import Failed, GenRequest, failure
from lorakit.serve.rows import Row

log = logging.getLogger(__name__)

MIN_CHUNK = 32
"""Fewest tokens worth a chunk forward of their own when other rows were prefilled this step (less is left:
the next step)."""


def prompt_key(adapter: str | None, req: GenRequest) -> tuple:
    """Requests with equal keys have equal prefills: the same adapter (the model's: `Row.adapter`) and prompt."""
    return (adapter, tuple(req.prompt_ids))


class PrefillQueue:
    def __init__(
        self,
        forward: Callable[..., torch.Tensor],
        prefixes: PrefixCache,
        fail: Callable[[list[Row], Failed], None],
        *,
        chunk: int,
        max_tokens: int,
        pad_id: int,
        stats: dict[str, int],
    ) -> None:
        if chunk < 0:
            raise ValueError(f"prefill_chunk must be at least 0, got {chunk}")
        self.forward, self.prefixes, self.fail = forward, prefixes, fail
        self.chunk, self.max_tokens, self.pad_id, self.stats = chunk, max_tokens, pad_id, stats
        self.rows: list[Row] = []  # admitted, their prompts not yet (wholly) computed: first come first

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list[Row], *, decoding: bool) -> int:
        """Queue newly admitted rows; when none were waiting, first compute the long starts they share (they then
        go first). `decoding`: whether rows are decoding (see the module's docstring). The prompt tokens
        computed."""
        spent = 0 if self.rows else self._share_starts(rows, self._budget(decoding))
        self.rows += rows
        return spent

    def step(self, spent: int = 0, *, decoding: bool) -> list[Row]:
        """The rows to prefill now, having computed the next chunk of the first that does not fit (see the module's
        docstring); `spent`: prompt tokens computed already this step, `decoding`: whether rows are decoding."""
        for r in [r for r in self.rows if r.req.cancelled]:  # gone while waiting
            r.finished = True
            r.lease.close()
        waiting = [r for r in self.rows if not r.finished]
        if not self.chunk or not waiting:
            self.rows = []
            return waiting
        self._look_up(waiting)  # what others computed since: a later row may find a longer start
        left, ready, keys, longest = max(self._budget(decoding) - spent, 0), [], set(), 0
        for r in waiting:
            key = prompt_key(r.adapter, r.req)
            scored = r.req.params.prompt_logprobs is not None
            rest = 0 if key in keys else len(r.req.prompt_ids) - (0 if scored else r.cached)
            # while nothing decodes: their prefill's padded size, as `Engine._admit` counts it
            padded = max(longest, rest) * len(keys | {key})
            fits = rest <= left if decoding else padded <= self.max_tokens
            if not fits and (ready or not scored):
                break
            ready.append(r)
            keys.add(key)
            left, longest = left - rest, max(longest, rest)
        self.rows = waiting[len(ready) :]
        nxt = self.rows[0] if self.rows else None
        if nxt is not None and nxt.req.params.prompt_logprobs is None:
            if decoding and left >= (MIN_CHUNK if ready else 1):
                self._chunk(nxt, left)  # what is left of the chunk goes to the next prompt in line
            elif not decoding and not ready:  # longer than a whole prefill may be
                self._chunk(nxt, self.max_tokens)
        return ready

    def _budget(self, decoding: bool) -> int:
        """Most prompt tokens computed in a step."""
        return self.chunk if decoding else max(self.chunk, self.max_tokens)

    @torch.no_grad()
    def _chunk(self, row: Row, n: int) -> None:
        """Compute the next `n` tokens of the row's prompt after its cached start, and make the whole its cached
        start (shared with the rows of the same prompt, and kept in the prefix cache for others)."""
        ids = row.req.prompt_ids
        done = row.cached + n
        same = [r for r in self.rows if prompt_key(r.adapter, r.req) == prompt_key(row.adapter, row.req)]
        try:
            ids_t, mask, positions, cache = kvcache.prompt_inputs(
                [(ids[:done], row.prefix.kv() if row.prefix else None)], self.pad_id
            )
            self.forward([row.adapter], ids_t, mask, positions, cache, last_only=True, sequences=lambda: [ids[:done]])
        except Exception as e:  # noqa: BLE001 - this prompt alone fails
            log.exception("a prefill chunk failed")
            self.rows = [r for r in self.rows if r not in same]
            self.fail(same, failure(e))
            return
        # one row, no padding: its whole cache, (1, kv_heads, done, head_dim) per layer
        hit = self.prefixes.own(self.prefixes.key(row.adapter), ids[:done], kvcache.kv(cache))
        chunked = row.chunked + n
        for r in same:
            r.prefix, r.chunked = hit, chunked
        self.stats["prefill_chunks"] += 1

    def _look_up(self, rows: list[Row]) -> None:
        """Give each row the longest cached start of its prompt, when the prefix cache now holds a longer one than
        it has (never for a prompt to score: it runs whole)."""
        if not self.prefixes.enabled:
            return
        for r in rows:
            hit = self.prefixes.lookup_request(r.adapter, r.req)  # (None for a prompt to score)
            if hit is not None and hit.length > r.cached:
                r.prefix = hit

    @torch.no_grad()
    def _share_starts(self, rows: list[Row], budget: int) -> int:
        """Compute once, and cache, the long starts that new prompts share beyond what the prefix cache holds
        (`prefixes.shared_starts`: many requests behind one system prompt arriving together), so that their
        prefill runs each prompt's rest only; with a chunk size, only as many as fit in `budget` tokens (longer ones
        are shared chunk by chunk: `_chunk` keeps each chunk in the cache). The tokens computed. An optimisation:
        should it fail, the prompts run whole."""
        if not self.prefixes.enabled or len(rows) < 2:
            return 0
        unscored = [r for r in rows if r.req.params.prompt_logprobs is None]
        firsts = list({prompt_key(r.adapter, r.req): r for r in unscored}.values())
        key = self.prefixes.key
        starts = shared_starts([(key(r.adapter), r.req.prompt_ids, r.cached) for r in firsts])
        if self.chunk:
            left, fit = budget, []
            for s in starts:
                cost = len(s.tokens) - firsts[s.prompt].cached
                if cost <= left:
                    fit.append(s)
                    left -= cost
            starts = fit
        if not starts:
            return 0
        try:
            parts = []
            for s in starts:
                hit = firsts[s.prompt].prefix  # its cached start, shorter than it by SHARE_MIN at least
                parts.append((s.tokens, hit.kv() if hit else None))
            ids, mask, positions, cache = kvcache.prompt_inputs(parts, self.pad_id)
            adapters = [firsts[s.prompt].adapter for s in starts]
            self.forward(adapters, ids, mask, positions, cache, last_only=True, sequences=lambda: [s.tokens for s in starts])
            for i, s in enumerate(starts):
                self.prefixes.add(s.key, s.tokens, kvcache.row(cache, i, mask[i].nonzero()[:, 0]))
        except Exception:  # noqa: BLE001
            log.exception("computing the prompts' shared starts failed; they run whole")
            return 0
        self.stats["shared_starts"] += len(starts)
        self._look_up(unscored)
        return int(mask[:, -ids.shape[1] :].sum())
