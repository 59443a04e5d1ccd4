"""The side network of Ladder LoRA: low-rank ladders from backbone layers into a narrow, gated side stream.

Our reading of ladder side-tuning (Sung et al. 2022, LST) with the low-rank down-samplers of Quantized Side Tuning
(Zhang et al. 2024). For ladders j = 1..k, fed by backbone hidden states h_j (batch, seq, hidden):

    z_j = B_j · A_j · rms(h_j)                      A_j (rank, hidden), B_j (width, rank): the low-rank ladder
    μ_j = σ(α_j / T)                                 α_j initialised to 0, so μ_j = 0.5 at the start
    s_j = block_j(μ_j · z_j + (1 − μ_j) · s_{j−1})   s_0 = 0; block: pre-norm MLP, or pre-norm causal attention + MLP
    y   = U · norm(s_k)                              U (hidden, width) initialised to zero

and y is added to the backbone's final (normalised) hidden state, so the model starts exactly equal to its base.
`rms` is a parameter-free RMS normalisation of the tapped state (backbone residual streams grow layer by layer).

Attention blocks have no positional encoding of their own: the tapped backbone states carry position. During
cached decoding (`Hugging Face generate`) each attention block keeps its own key/value cache, in step with the
model's cache (see `SideNetwork.begin`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import AdapterError


class SideMLP(nn.Module):
    """Pre-norm residual MLP on the side stream: s + W2·silu(W1·norm(s)), per token."""

    def __init__(self, width: int, ratio: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(width)
        self.up = nn.Linear(width, ratio * width, bias=False)
        self.down = nn.Linear(ratio * width, width, bias=False)

    def forward(self, s: torch.Tensor, ctx: _Context, slot: int) -> torch.Tensor:
        return s + self.down(F.silu(self.up(self.norm(s))))


class SideAttention(nn.Module):
    """Pre-norm causal self-attention then a pre-norm MLP, on the side stream (batch, seq, width)."""

    def __init__(self, width: int, ratio: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.mlp = SideMLP(width, ratio)

    def forward(self, s: torch.Tensor, ctx: _Context, slot: int) -> torch.Tensor:
        b, t, w = s.shape
        q, k, v = self.qkv(self.norm(s)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        k, v = ctx.extend(slot, k, v)  # (b, heads, past + t, head_dim)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask(t, k.shape[2], s.device))
        s = s + self.out(a.transpose(1, 2).reshape(b, t, w))
        return self.mlp(s, ctx, slot)


class _Context:
    """Per-forward facts the attention blocks need: the key padding mask and the side key/value cache."""

    def __init__(self, attention_mask: torch.Tensor | None, past: int, cache: list | None) -> None:
        self.attention_mask = attention_mask  # (batch, past + seq), 1 = real token; None: all real
        self.past = past
        self.cache = cache  # one (k, v) per block when decoding with a cache, else None
        self._mask: torch.Tensor | None = None

    def extend(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None:
            return k, v
        if self.cache[slot] is not None:
            k = torch.cat([self.cache[slot][0], k], dim=2)
            v = torch.cat([self.cache[slot][1], v], dim=2)
        self.cache[slot] = (k, v)
        return k, v

    def mask(self, t: int, n_keys: int, device: torch.device) -> torch.Tensor:
        """(batch or 1, 1, t, n_keys) boolean: causal, padding keys hidden, and every query sees itself (so a
        padding query has one key and no NaN)."""
        if self._mask is None or self._mask.shape[-2:] != (t, n_keys):
            qpos = torch.arange(n_keys - t, n_keys, device=device)[:, None]
            kpos = torch.arange(n_keys, device=device)[None, :]
            allowed = (kpos <= qpos)[None, None]
            if self.attention_mask is not None:
                valid = self.attention_mask[:, -n_keys:].to(device=device, dtype=torch.bool)[:, None, None, :]
                allowed = (allowed & valid) | (kpos == qpos)[None, None]
            self._mask = allowed
        return self._mask


BLOCKS = {"mlp": SideMLP, "transformer": SideAttention}


def attention_heads(width: int) -> int:
    """Heads of a side attention block: the most of 8, 4, 2 that divide the width with head size >= 16, else 1."""
    return next((h for h in (8, 4, 2) if width % h == 0 and width // h >= 16), 1)


class SideNetwork(nn.Module):
    """Ladders, gates, side blocks and the zero-initialised up-projection (see the module docstring).

    Runtime state (set by the hooks in `lorakit.variants.ladder`): `taps`, the tapped backbone states of the
    current forward, in ladder order; `ctx`, the current `_Context`; `outer_grad`, whether the caller had autograd
    on (the backbone itself always runs without it).
    """

    def __init__(
        self, hidden: int, width: int, rank: int, n_ladders: int, block: str, temperature: float, ratio: int
    ) -> None:
        super().__init__()
        self.hidden, self.width, self.temperature = hidden, width, temperature
        self.down_a = nn.ModuleList(nn.Linear(hidden, rank, bias=False) for _ in range(n_ladders))
        self.down_b = nn.ModuleList(nn.Linear(rank, width, bias=False) for _ in range(n_ladders))
        self.alpha = nn.Parameter(torch.zeros(n_ladders))
        if block == "mlp":
            self.blocks = nn.ModuleList(SideMLP(width, ratio) for _ in range(n_ladders))
        else:
            heads = attention_heads(width)
            self.blocks = nn.ModuleList(SideAttention(width, ratio, heads) for _ in range(n_ladders))
        self.norm = nn.RMSNorm(width)
        self.up = nn.Linear(width, hidden, bias=False)
        nn.init.zeros_(self.up.weight)
        self.taps: list[tuple[torch.Tensor, int]] = []
        self.kv: list | None = None
        self.ctx = _Context(None, 0, None)
        self.outer_grad = False
        self.rows: torch.Tensor | bool = True

    def set_rows(self, rows: torch.Tensor | Sequence[bool] | bool | None) -> None:
        """Gate the side output per batch row, for mixed batches (serving).

        None or True: every row gets it (the default: offline use is unchanged); False: no row (the model is its
        base); a (batch,) bool mask: only the True rows get it, the side network runs on those rows alone and the
        other rows keep exactly the backbone's state. Only per-token (MLP) side blocks can be gated: an attention
        block's own KV cache would fall out of step with the model's.
        """
        if rows is None or rows is True:
            self.rows = True
            return
        if not isinstance(self.blocks[0], SideMLP):
            raise AdapterError("ladder: only a side network of mlp blocks can be gated per row (set_rows)")
        if rows is False:
            self.rows = False
            return
        rows = torch.as_tensor(rows, dtype=torch.bool)
        if rows.dim() != 1:
            raise AdapterError(f"ladder: set_rows takes a (batch,) bool mask, got shape {tuple(rows.shape)}")
        self.rows = rows

    def gates(self) -> torch.Tensor:
        """μ_j = σ(α_j / T), one per ladder."""
        return torch.sigmoid(self.alpha / self.temperature)

    def begin(self, attention_mask: torch.Tensor | None, cache) -> None:
        """Start a backbone forward: remember the mask; keep the side cache in step with the model's `cache`.

        With a cache (generation), a forward at cache length 0 starts a new side cache, and later forwards must
        continue it (a side cache that does not match the model's cache is an error, not a silent wrong answer).
        Without one (training, scoring), every forward sees its whole sequence and nothing is cached.
        """
        self.taps.clear()
        self.outer_grad = torch.is_grad_enabled()
        past = int(cache.get_seq_length()) if cache is not None else 0
        if cache is None or not isinstance(self.blocks[0], SideAttention):
            self.kv = None
        elif past == 0:
            self.kv = [None] * len(self.blocks)
        elif self.kv is None or self.kv[0] is None or self.kv[0][0].shape[2] != past:
            have = None if self.kv is None or self.kv[0] is None else self.kv[0][0].shape[2]
            raise RuntimeError(
                f"ladder: the side network's attention cache holds {have} positions but the model's cache holds "
                f"{past}; a transformer side block supports plain cached decoding only (no cache surgery, no beam "
                "reordering)"
            )
        self.ctx = _Context(attention_mask, past, self.kv)

    def forward(self, final: torch.Tensor) -> torch.Tensor:
        """`final` (batch, seq, hidden), the backbone's normalised last state, plus the side network's output
        (on the rows `set_rows` selects)."""
        if len(self.taps) != len(self.blocks):
            raise RuntimeError(f"ladder: expected {len(self.blocks)} tapped layers, got {len(self.taps)}")
        idx = self._row_index(final.shape[0], final.device)
        if idx is not None and not len(idx):
            self.taps.clear()
            return final
        mu = self.gates()
        s = None
        for j, (tap, version) in enumerate(self.taps):
            if tap._version != version:
                raise RuntimeError(f"ladder: the hidden state tapped for ladder {j} was modified in place")
            if idx is not None:
                tap = tap.index_select(0, idx)
            x = F.rms_norm(tap, (tap.shape[-1],), eps=1e-6)
            z = self.down_b[j](self.down_a[j](x))
            s = mu[j] * z if s is None else torch.lerp(s, z, mu[j])
            s = self.blocks[j](s, self.ctx, j)
        self.taps.clear()
        y = self.up(self.norm(s))
        return final + y if idx is None else final.index_add(0, idx, y.to(final.dtype))

    def _row_index(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """None: every row; else the indices of the gated-in rows (maybe none)."""
        if self.rows is True:
            return None
        if self.rows is False:
            return torch.empty(0, dtype=torch.long, device=device)
        if self.rows.shape[0] != batch:
            raise RuntimeError(
                f"ladder: set_rows gave a mask of {self.rows.shape[0]} rows for a batch of {batch}"
            )
        if bool(self.rows.all()):
            return None
        return self.rows.nonzero().flatten().to(device)
