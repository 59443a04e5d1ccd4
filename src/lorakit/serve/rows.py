"""A request in the engine's running batch: its adapter lease and sampler, and how each new token becomes text.

`Row.accept` samples the row's next token, emits the text that is safe to send (not the start of a stop string,
not half a UTF-8 character) and finishes the row on end-of-sequence, a stop token or string, or its length.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from lorakit.serve.requests import Delta, Done, Failed, GenRequest, deliver, sample


@dataclass(eq=False)
class Row:
    req: GenRequest
    lease: ExitStack
    generator: torch.Generator | None
    stop_ids: frozenset[int] = frozenset()
    out_ids: list[int] = field(default_factory=list)
    n_real: int = 0  # tokens of this row in the cache (prompt + generated tokens fed back)
    sent: int = 0  # characters of output already emitted
    finished: bool = False

    def finish(self, event: Done | Failed) -> None:
        self.finished = True
        deliver(self.req, event)

    def accept(
        self,
        logits: torch.Tensor,
        decode: Callable[[list[int]], str],
        eos_ids: set[int],
        max_model_len: int,
    ) -> None:
        """Sample the row's next token, emit the new text, and decide whether the row is done."""
        p = self.req.params
        tok = sample(logits, p.temperature, p.top_p, self.generator)
        self.out_ids.append(tok)
        reason = None
        if (tok in eos_ids and not p.ignore_eos) or tok in self.stop_ids:
            reason = "stop"
        text = decode(self.out_ids)
        cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        if reason is None and (len(self.out_ids) >= p.max_tokens or self.n_real + 1 >= max_model_len):
            reason = "length"
        if reason is not None:
            if len(text) > self.sent:
                deliver(self.req, Delta(text[self.sent :]))
            self.finish(Done(reason, len(self.req.prompt_ids), len(self.out_ids)))
            return
        safe = len(text) - max((len(s) - 1 for s in p.stop), default=0)  # a stop string may be starting
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            safe = min(safe, len(text) - 1)
        if safe > self.sent:
            deliver(self.req, Delta(text[self.sent : safe]))
            self.sent = safe


def eos_ids(model, tokenizer) -> set[int]:
    """The token ids that end a sequence: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
