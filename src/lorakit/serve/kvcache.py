"""The batch's KV cache as plain tensors: per layer (keys, values), each (batch, kv_heads, T, head_dim).

The engine joins the caches of rows prefilled at different times (left-padding the shorter to a common T) and
drops rows and leading all-padding columns when requests finish; these helpers move between `DynamicCache` and
tensors across transformers versions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache


def kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each (batch, kv_heads, T, head_dim)."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def make_cache(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def pad_left(x: torch.Tensor, length: int, *, dim: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def join(
    cache: DynamicCache, mask: torch.Tensor, new_cache: DynamicCache, new_mask: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """The rows of `cache` then those of `new_cache`, the shorter left-padded to a common T; masks (batch, T)."""
    t = max(mask.shape[1], new_mask.shape[1])
    merged = [
        tuple(
            torch.cat([pad_left(a, t, dim=2), pad_left(b, t, dim=2)], dim=0)
            for a, b in zip(x, y, strict=True)
        )
        for x, y in zip(kv(cache), kv(new_cache), strict=True)
    ]
    return make_cache(merged), torch.cat([pad_left(mask, t, dim=1), pad_left(new_mask, t, dim=1)], dim=0)


def select(cache: DynamicCache, mask: torch.Tensor, keep: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """Rows `keep` of the cache, without the leading columns that are padding in every one of them."""
    idx = torch.tensor(keep, dtype=torch.long)
    mask = mask.index_select(0, idx)
    start = int(mask.any(0).nonzero()[0, 0])
    return (
        make_cache(
            [
                (
                    k.index_select(0, idx.to(k.device))[:, :, start:],
                    v.index_select(0, idx.to(v.device))[:, :, start:],
                )
                for k, v in kv(cache)
            ]
        ),
        mask[:, start:],
    )


def stack(
    parts: list[list[tuple[torch.Tensor, torch.Tensor]] | None],
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """One cache from single rows' caches (each per layer (1, kv_heads, T_i, head_dim), or None for a row with
    none), each left-padded to the longest: per layer (keys, values) (batch, kv_heads, T, head_dim), and the
    (batch, T) mask. Always new tensors (never the parts themselves)."""
    empty = [(k[:, :, :0], v[:, :, :0]) for k, v in next(p for p in parts if p is not None)]
    parts = [empty if p is None else p for p in parts]  # a row with none: all padding
    lengths = [p[0][0].shape[2] for p in parts]
    t = max(lengths)
    mask = torch.zeros((len(parts), t), dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, t - n :] = 1
    layers = [
        tuple(torch.cat([pad_left(p[layer][j], t, dim=2) for p in parts], dim=0) for j in (0, 1))
        for layer in range(len(empty))
    ]
    return layers, mask


def prompt_inputs(
    prompts: list[tuple[Sequence[int], list[tuple[torch.Tensor, torch.Tensor]] | None]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache]:
    """A prefill's inputs for prompts given as (tokens, the cache of their first tokens or None): the tokens after
    each cached start, left-padded to a common length, (batch, new) `ids` and `positions` (continuing from the
    cached length), and the cache holding the cached starts (left-padded: `stack`) with the (batch, cached + new)
    mask covering both."""
    cached = torch.tensor([0 if past is None else past[0][0].shape[2] for _, past in prompts])
    length = max(len(tokens) - int(c) for (tokens, _), c in zip(prompts, cached, strict=True))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, ((tokens, _), c) in enumerate(zip(prompts, cached.tolist(), strict=True)):
        n = len(tokens) - c
        ids[i, length - n :] = torch.tensor(list(tokens[c:]), dtype=torch.long)
        mask[i, length - n :] = 1
    positions = (cached[:, None] + mask.cumsum(-1) - 1).clamp(min=0)
    if not cached.any():
        return ids, mask, positions, DynamicCache()
    past, past_mask = stack([past for _, past in prompts])
    return ids, torch.cat([past_mask, mask], dim=1), positions, make_cache(past)


def row(cache: DynamicCache, i: int, cols: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row i's columns `cols` of the cache, per layer (1, kv_heads, len(cols), head_dim): copies."""
    return [
        (k[i : i + 1].index_select(2, cols.to(k.device)), v[i : i + 1].index_select(2, cols.to(v.device)))
        for k, v in kv(cache)
    ]
