"""Trainable token rows: PEFT's `trainable_token_indices`. An adapter trains some rows of an embedding (new
special tokens, say) and nothing else of it; the output head tied to that embedding follows them. The rows are
saved as PEFT saves them (`trainable_tokens_delta`: the values themselves, not a difference).

`lorakit.saved` activates, disables and row-splits these wrappers together with its whole-module copies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.walk import Wrapper, base_modules, set_submodule


class TokenRows(Wrapper):
    """An embedding (or the output head tied to it) in which adapters train only some rows: PEFT's
    TrainableTokensWrapper. Each adapter holds the new values of its rows, `trainable_tokens_delta[adapter]`
    (n, dim), as PEFT names and saves them (the values themselves, not a difference).

        embedding: out = base(x), with the positions whose token is one of the rows taking the adapter's row
        tied head: out = base(h), with the logits of those rows computed from the adapter's rows

    Neither form copies the whole weight. A head tied to the embedding shares the embedding's rows (`tied`), so
    training one trains both, and only the embedding's rows are saved. At most one active adapter may have rows
    in one embedding, as in PEFT.
    """

    # not walked by lorakit.walk.base_modules: each adapter's own
    per_adapter: ClassVar[tuple[str, ...]] = ("trainable_tokens_delta",)

    def __init__(self, base_layer: nn.Module, tied: TokenRows | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._tied = (
            [tied] if tied is not None else []
        )  # a list: not a submodule (no second path to its rows)
        self.trainable_tokens_delta = nn.ParameterDict() if tied is None else None
        self.token_indices: dict[str, list[int]] = {} if tied is None else tied.token_indices
        self.active: str | None = None
        self.disabled = False
        self.row_names: Sequence[str | None] | None = None

    @property
    def tied(self) -> TokenRows | None:
        return self._tied[0] if self._tied else None

    def rows(self) -> nn.ParameterDict:
        return self.tied.trainable_tokens_delta if self.tied is not None else self.trainable_tokens_delta

    def add(self, name: str, indices: list[int]) -> None:
        """Adapter `name` trains rows `indices`, starting from their current values."""
        weight = self.base_layer.weight
        idx = torch.tensor(indices, dtype=torch.long, device=weight.device)
        self.token_indices[name] = list(indices)
        self.trainable_tokens_delta[name] = nn.Parameter(weight.detach().index_select(0, idx).clone())

    def remove(self, name: str) -> None:
        if self.tied is None:
            del self.trainable_tokens_delta[name]
            del self.token_indices[name]
        if self.active == name:
            self.active = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        if self.row_names is not None:
            return self._rows_forward(x, out)
        if self.active is None or self.active not in self.token_indices:
            return out
        return self._apply(self.active, x, out)

    def _apply(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        delta = self.rows()[name]
        idx = torch.tensor(self.token_indices[name], dtype=torch.long, device=out.device)
        if isinstance(self.base_layer, nn.Embedding):
            slot = torch.full((self.base_layer.num_embeddings,), -1, dtype=torch.long, device=out.device)
            slot[idx] = torch.arange(len(idx), device=out.device)
            pos = slot[x]
            new = delta.to(out.dtype)[pos.clamp(min=0)]
            scale = getattr(self.base_layer, "embed_scale", None)  # scaled embeddings (Gemma) scale every row
            if scale is not None:
                new = new * torch.as_tensor(scale, dtype=out.dtype, device=out.device)
            return torch.where((pos >= 0).unsqueeze(-1), new, out)
        logits = x.to(delta.dtype) @ delta.t()  # a head tied to the embedding: those rows' logits
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            logits = logits + bias[idx]
        return out.index_copy(-1, idx, logits.to(out.dtype))

    def _rows_forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        names = [n if n in self.token_indices else None for n in self.row_names]
        if len(names) != x.shape[0]:
            raise AdapterError(f"row adapters: {len(names)} row adapters for a batch of {x.shape[0]}")
        for g in dict.fromkeys(n for n in names if n is not None):
            rows = torch.tensor([i for i, n in enumerate(names) if n == g], device=x.device)
            part = self._apply(g, x.index_select(0, rows), out.index_select(0, rows))
            out = out.index_copy(0, rows, part)
        return out

    @torch.no_grad()
    def write_rows(self, name: str) -> None:
        """Write adapter `name`'s rows into the base weight (unload with merge)."""
        weight = self.base_layer.weight
        idx = torch.tensor(self.token_indices[name], dtype=torch.long, device=weight.device)
        weight.index_copy_(0, idx, self.rows()[name].detach().to(weight.dtype))

    def extra_repr(self) -> str:
        rows = {a: len(i) for a, i in self.token_indices.items()}
        return f"rows={rows}, active={self.active!r}" + (", tied to the input embedding" if self.tied else "")


def token_wrappers(model: nn.Module) -> Iterator[tuple[str, TokenRows]]:
    for n, m in base_modules(model):
        if isinstance(m, TokenRows):
            yield n, m


def add_token_rows(model: nn.Module, adapter: str, plan: dict[str, list[int]], tied: list[str]) -> None:
    """Give adapter `adapter` its rows in each module of `plan`; `tied` names output heads that share the rows of
    the model's input embedding (which must be in `plan`)."""
    for m, indices in plan.items():
        wrapper = model.get_submodule(m)
        if not isinstance(wrapper, TokenRows):
            wrapper = TokenRows(wrapper)
            set_submodule(model, m, wrapper)
        wrapper.add(adapter, indices)
    source = model.get_input_embeddings() if tied else None
    for m in tied:
        head = model.get_submodule(m)
        if not isinstance(head, TokenRows):
            set_submodule(model, m, TokenRows(head, tied=source))


def remove_token_rows(model: nn.Module, adapter: str) -> None:
    """Drop adapter `adapter`'s rows; a wrapper left with none is replaced by its base module."""
    for _, wrapper in list(token_wrappers(model)):
        if adapter in wrapper.token_indices:
            wrapper.remove(adapter)
    for n, wrapper in list(token_wrappers(model)):
        if not wrapper.token_indices:
            set_submodule(model, n, wrapper.base_layer)


def unwrap_tokens(model: nn.Module, merge: bool) -> None:
    """Replace every token wrapper by its base module; with `merge`, the active adapter's rows are written first."""
    wrappers = list(token_wrappers(model))
    for _, wrapper in wrappers:
        if merge and wrapper.tied is None and wrapper.active is not None and not wrapper.disabled:
            wrapper.write_rows(wrapper.active)
    for n, wrapper in wrappers:
        set_submodule(model, n, wrapper.base_layer)


def token_parameters(model: nn.Module, adapter: str | None = None) -> Iterator[nn.Parameter]:
    for _, wrapper in token_wrappers(model):
        if wrapper.tied is None:
            for a, p in wrapper.trainable_tokens_delta.items():
                if adapter is None or a == adapter:
                    yield p


def token_rows_of(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """Module name -> adapter `adapter`'s rows, for the modules that own them (not the tied head)."""
    return {
        n: w.trainable_tokens_delta[adapter]
        for n, w in token_wrappers(model)
        if w.tied is None and adapter in w.token_indices
    }
