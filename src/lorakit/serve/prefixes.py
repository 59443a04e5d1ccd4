"""The prefix cache: the KV cache of finished requests, kept so that later prompts that start the same way skip
recomputing that start (a chat's next turn, a shared system prompt, few-shot examples).

    store = PrefixStore(max_bytes=1 << 30)
    store.add(key, tokens, kv)            # a finished row: its tokens and their (1, kv_heads, T, head_dim) cache
    hit = store.lookup(key, prompt_ids)   # the longest cached start of the prompt, or None

A key names what the cache was computed with (the adapter, and which load of it: `AdapterBank.serials`), so an
adapter unloaded and loaded again under the same name never meets the old cache (an aLoRA adapter's request also
takes the base model's entries, up to its invocation: the tokens before it are the base model's). The KV cache at
position j depends only on tokens 0..j (attention is causal), so any common start of a cached sequence and a prompt is valid
cache for the prompt, not only whole cached sequences: a match is the longest common prefix over the entries of
the key, at most the prompt's length minus one (the last prompt token must run to give the next token's logits).

Entries are evicted least recently used first to stay within `max_bytes`; an entry that another one extends is
dropped (the longer one serves both). `PrefixCache` is the engine's store: keyed by adapter load, and filled with
each prompt as it is prefilled (so that requests arriving while it runs share it) and each row's whole sequence
when it finishes. It lives on the engine thread: it is not locked.

Prompts that join one prefill cannot use each other's cache that way: `shared_starts` finds the long starts they
have in common beyond what the store holds, which the engine computes once, in a forward of their own, and adds
to the store before the prefill looks the prompts up again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lorakit.serve import kvcache
from lorakit.variants.alora import invocation_of, last_invocation

if TYPE_CHECKING:
    from transformers import DynamicCache

    from lorakit.bank import AdapterBank
    from lorakit.serve.requests import GenRequest
    from lorakit.serve.rows import Row

log = logging.getLogger(__name__)

MIN_MATCH = 16
"""Shortest match worth using: below it, recomputing costs about as little as copying the cache."""

SHARE_MIN = 64
"""Fewest tokens, beyond what the store already holds, that make a cache entry worth a copy at prefill time, and a
start shared by prompts of one prefill worth a forward of its own."""


@dataclass(eq=False)
class Entry:
    key: Hashable
    tokens: torch.Tensor  # (T,) int64, on the CPU
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (1, kv_heads, T, head_dim)
    nbytes: int

    @classmethod
    def of(cls, key: Hashable, tokens: Sequence[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Entry:
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        return cls(key, torch.tensor(list(tokens), dtype=torch.long), kv, nbytes)


@dataclass(frozen=True)
class Hit:
    entry: Entry
    length: int  # the prompt's first `length` tokens are cached

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer the cached (keys, values) of those tokens, each (1, kv_heads, length, head_dim) (views)."""
        return [(k[:, :, : self.length], v[:, :, : self.length]) for k, v in self.entry.kv]


@dataclass(frozen=True)
class Start:
    """A start that prompts of one prefill share: computed once, then cached under `key`."""

    key: Hashable
    tokens: tuple[int, ...]
    prompt: int  # index of a prompt that starts with it, whose cached start (the longest) it continues


def shared_starts(prompts: Sequence[tuple[Hashable, Sequence[int], int]]) -> list[Start]:
    """The starts worth computing once for distinct prompts (key, tokens, cached length) of one prefill.

    Prompts of one key share a start when their longest common start (at most all but the last token of either)
    goes at least SHARE_MIN tokens beyond what either has cached. Sorted, a prompt's longest common start with any
    other is the one with a neighbour, so neighbours are compared; a start that another one extends is left out
    (once the longer one is cached, it serves both: a lookup finds any common start)."""
    by_key: dict[Hashable, list[int]] = {}
    for i, (key, _, _) in enumerate(prompts):
        by_key.setdefault(key, []).append(i)
    out: list[Start] = []
    for key, idx in by_key.items():
        order = sorted(idx, key=lambda i: tuple(prompts[i][1]))
        found: dict[tuple[int, ...], int] = {}
        for a, b in zip(order, order[1:], strict=False):
            (_, pa, ca), (_, pb, cb) = prompts[a], prompts[b]
            n = min(len(pa), len(pb)) - 1
            if n - max(ca, cb) < SHARE_MIN:
                continue
            n = _common(torch.tensor(pa[:n]), torch.tensor(pb[:n]))
            if n - max(ca, cb) >= SHARE_MIN:
                found[tuple(pa[:n])] = a if ca >= cb else b
        kept: list[tuple[int, ...]] = []
        for start in sorted(found, key=len, reverse=True):
            if not any(longer[: len(start)] == start for longer in kept):
                kept.append(start)
        out += [Start(key, start, found[start]) for start in kept]
    return out


class PrefixStore:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be at least 0, got {max_bytes}")
        self.max_bytes = max_bytes
        # id(entry) -> entry, least recently used first
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self.nbytes = 0
        self.stats = {"added": 0, "evicted": 0}  # (hits are counted by the engine, per prefilled row)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, key: Hashable, prompt_ids: Sequence[int]) -> Hit | None:
        """The longest cached start of `prompt_ids` under `key` (at most all but its last token), or None when
        it is shorter than MIN_MATCH. A hit counts as a use of its entry (for eviction)."""
        if not self._entries:
            return None
        limit = len(prompt_ids) - 1
        if limit < MIN_MATCH:
            return None
        prompt = torch.tensor(prompt_ids[:limit], dtype=torch.long)
        best, best_len = None, 0
        for entry in self._entries.values():
            if entry.key != key:
                continue
            n = min(limit, entry.tokens.shape[0])
            if n <= best_len:
                continue
            m = _common(entry.tokens[:n], prompt[:n])
            if m > best_len:
                best, best_len = entry, m
        if best is None or best_len < MIN_MATCH:
            return None
        self._entries.move_to_end(id(best))
        return Hit(best, best_len)

    def add(self, key: Hashable, tokens: Sequence[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Keep `kv`, the cache of `tokens` under `key` (tensors the caller no longer changes). False if it is
        not kept: too short to be matched, bigger than the whole store, or already covered by an entry."""
        return self.add_entry(Entry.of(key, tokens, kv))

    def add_entry(self, entry: Entry) -> bool:
        """`add`, of an entry made already."""
        key, ids, t = entry.key, entry.tokens, entry.tokens.shape[0]
        if not self.enabled or t <= MIN_MATCH or entry.nbytes > self.max_bytes:
            return False
        for old in list(self._entries.values()):
            if old.key != key:
                continue
            n = old.tokens.shape[0]
            # already cached (maybe as the start of a longer one)
            if n >= t and _common(old.tokens[:t], ids) == t:
                self._entries.move_to_end(id(old))
                return False
            if n < t and _common(old.tokens, ids[:n]) == n:  # the new one extends it
                self._remove(old)
        self._entries[id(entry)] = entry
        self.nbytes += entry.nbytes
        self.stats["added"] += 1
        while self.nbytes > self.max_bytes:
            self._remove(next(iter(self._entries.values())))
            self.stats["evicted"] += 1
        return True

    def retain(self, keys: set) -> None:
        """Drop the entries whose key is not in `keys` (adapters unloaded since)."""
        for entry in [e for e in self._entries.values() if e.key not in keys]:
            self._remove(entry)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _remove(self, entry: Entry) -> None:
        del self._entries[id(entry)]
        self.nbytes -= entry.nbytes


class PrefixCache(PrefixStore):
    """The serve engine's store: keyed by adapter and load (`AdapterBank.serials`), filled from finished rows."""

    def __init__(self, bank: AdapterBank, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self.bank = bank

    def key(self, adapter: str | None) -> tuple:
        """What a row's KV cache was computed with: its adapter (the model's: `Row.adapter`), and which load of
        it."""
        return (adapter, self.bank.serials.get(adapter, 0) if adapter is not None else 0)

    def lookup_request(self, adapter: str | None, req: GenRequest) -> Hit | None:
        """The longest cached start of the request's prompt run with the model's `adapter` (None for prompts to
        score: every position's logits are wanted)."""
        if not self.enabled or req.params.prompt_logprobs is not None:
            return None
        hit = self.lookup(self.key(adapter), req.prompt_ids)
        invocation = invocation_of(self.bank.model, adapter)
        if invocation is not None:  # aLoRA: before its invocation, the adapter's cache is the base model's
            start = last_invocation(req.prompt_ids, invocation)
            base = self.lookup(self.key(None), req.prompt_ids[: len(req.prompt_ids) if start is None else start + 1])
            if base is not None and (hit is None or base.length > hit.length):
                hit = base
        return hit

    def own(self, key: Hashable, tokens: Sequence[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Hit:
        """A cached start made of `kv` (tensors nobody changes), the cache of all of `tokens`: kept in the store
        too when it takes it, so that other prompts can use it (a prompt's chunk: `EngineConfig.prefill_chunk`)."""
        entry = Entry.of(key, tokens, kv)
        self.add_entry(entry)
        return Hit(entry, len(tokens))

    def remember_prompts(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Keep the KV cache of the prompts just prefilled (row i of `cache` is `rows[i]`'s) that computed at least
        SHARE_MIN new tokens, so that requests arriving while they run share them."""
        try:
            for i, r in enumerate(rows):
                if len(r.req.prompt_ids) - r.cached < SHARE_MIN:
                    continue
                cols = mask[i].nonzero()[:, 0]
                if cols.numel() == len(r.req.prompt_ids):
                    self.add(self.key(r.adapter), r.req.prompt_ids, kvcache.row(cache, i, cols))
        except Exception:  # noqa: BLE001 - a cache is an optimisation: never a reason to fail
            log.exception("keeping a prefilled prompt's cache failed")

    def remember(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Keep the KV cache of the batch's finished rows that did not fail: the prompt and the generated tokens
        fed back (all but the last one sampled). Entries of adapters unloaded since go."""
        try:
            live = {self.key(n) for n in [None, *self.bank.slots()]}
            self.retain(live)
            for i, r in enumerate(rows):
                if not r.finished or r.failed:
                    continue
                key = self.key(r.adapter)
                tokens = [*r.req.prompt_ids, *r.out_ids][: r.n_real]
                if key not in live or len(tokens) != r.n_real:
                    continue
                cols = mask[i].nonzero()[:, 0]
                if cols.numel() != r.n_real:  # the row's cache is not what it should be: keep nothing
                    log.warning("row cache holds %d positions, expected %d", cols.numel(), r.n_real)
                    continue
                self.add(key, tokens, kvcache.row(cache, i, cols))
        except Exception:  # noqa: BLE001 - a cache is an optimisation: never a reason to fail
            log.exception("keeping a finished row's cache failed")


def _common(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common start of two equally long 1-D tensors."""
    differ = (a != b).nonzero()
    return int(differ[0, 0]) if len(differ) else a.shape[0]
