"""The running batch: the rows decoding together and their shared, left-padded KV cache.

    batch = Batch(prefixes)
    batch.join(cache, mask, rows)           # rows just prefilled, with their cache and (rows, T) mask
    ids, mask, positions = batch.step_inputs()   # one decode step: each row's last token
    batch.drop_finished()                   # finished and cancelled rows leave, their adapters released

Rows of different lengths share one cache of shape (batch, kv_heads, T, head_dim) per layer: the (batch, T) mask
is 1 for a row's real tokens and 0 for its left padding, and explicit position ids keep each row's positions its
own, so that a row decodes as it would alone. When rows leave, the columns that are padding in every remaining row
go too.

The engine thread owns the batch.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from lorakit.serve import kvcache
from lorakit.serve.prefixes import PrefixCache
from lorakit.serve.rows import Row


class Batch:
    def __init__(self, prefixes: PrefixCache) -> None:
        self.prefixes = prefixes  # where finished rows' sequences go
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (batch, T): 1 for real tokens, 0 for left padding

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, cache: DynamicCache, mask: torch.Tensor, rows: list[Row]) -> None:
        """Add rows with their cache and mask, left-padding the shorter cache to a common T."""
        if self.cache is None:
            self.cache, self.mask, self.rows = cache, mask, list(rows)
            return
        self.cache, self.mask = kvcache.join(self.cache, self.mask, cache, mask)
        self.rows = self.rows + list(rows)

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inputs of one decode step: each row's last token (batch, 1), the mask grown by that token
        (batch, T + 1), and its position (batch, 1). The mask is the batch's from now on (the step's forward
        grows the cache to match)."""
        ids = torch.tensor([[r.out_ids[-1]] for r in self.rows], dtype=torch.long)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        positions = torch.tensor([[r.n_real] for r in self.rows], dtype=torch.long)
        return ids, self.mask, positions

    def drop_finished(self) -> None:
        """Remove finished and cancelled rows (their sequences go to the prefix cache, their adapters are
        released), and the cache columns no remaining row needs."""
        for r in self.rows:
            if r.req.cancelled and not r.finished:
                r.finished = True
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        if self.prefixes.enabled and len(keep) < len(self.rows):
            self.prefixes.remember(self.rows, self.cache, self.mask)
        for r in self.rows:
            if r.finished:
                r.lease.close()
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        self.cache, self.mask = kvcache.select(self.cache, self.mask, keep)
