"""A request in the engine's running batch: its adapter lease and sampler, and how each new token becomes text.

`Row.accept` samples the row's next token, emits the text that is safe to send (not the start of a stop string,
not half a UTF-8 character) and finishes the row on end-of-sequence, a stop token or string, or its length.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from lorakit.serve.guide import Guide
from lorakit.serve.prefixes import Hit
from lorakit.serve.requests import Delta, Done, Failed, GenRequest, TokenLogprob, adjust, deliver, sample
from lorakit.serve.scoring import logprob


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
    counts: torch.Tensor | None = None
    """(vocab,) how often each token was generated (frequency and presence penalties only)."""
    seen: torch.Tensor | None = None
    """(vocab,) bool: the prompt's and the output's tokens (repetition penalty only)."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """With SamplingParams.logprobs: each output token's (not an end-of-sequence or stop token's)."""
    ends: list[int] = field(default_factory=list)
    """The output text's length after each of those tokens: where the next one starts."""
    logprobs_sent: int = 0
    guide: Guide | None = None
    """Structured output: what the output may continue with."""
    logprob_sum: float = 0.0
    """With SamplingParams.logprobs: the sum over every sampled token, end-of-sequence and stop tokens included."""
    prefix: Hit | None = None
    """The start of the prompt whose KV cache is ready (from the prefix cache, and the row's own chunks: set when
    admitted and after each chunk, used by the prefill)."""
    chunked: int = 0
    """Prompt tokens this row computed in chunks before its prefill (`EngineConfig.prefill_chunk`)."""
    adapter: str | None = None
    """The model's adapter the row runs with: the one serving the request's model when it was admitted
    (`AdapterBank.hold`), kept by the row's lease even if the name is loaded again meanwhile."""
    failed: bool = False

    @property
    def cached(self) -> int:
        """Prompt tokens whose KV cache is ready before the prefill."""
        return self.prefix.length if self.prefix is not None else 0

    @property
    def reused(self) -> int:
        """Prompt tokens this row did not compute: taken from the prefix cache (OpenAI's cached_tokens)."""
        return max(self.cached - self.chunked, 0)

    def finish(self, event: Done | Failed) -> None:
        self.finished = True
        self.failed = isinstance(event, Failed)
        if isinstance(event, Done):
            event.cached_tokens = self.reused
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
        adjusted = self._adjusted(logits)
        if self.guide is not None:
            tok = self.guide.pick(adjusted, p.temperature, p.top_p, self.generator, eos_ids)
            self.guide.advance(tok, eos_ids)
        else:
            tok = sample(adjusted, p.temperature, p.top_p, self.generator)
        self.out_ids.append(tok)
        if self.counts is not None:
            self.counts[tok] += 1
        if self.seen is not None:
            self.seen[tok] = True
        reason = None
        if (tok in eos_ids and not p.ignore_eos) or tok in self.stop_ids:
            reason = "stop"
        text = decode(self.out_ids)
        if p.logprobs is not None:
            entry = logprob(logits, tok, p.logprobs)
            self.logprob_sum += entry.logprob
            if reason is None:  # an end-of-sequence or stop token is no output text
                self.logprobs.append(entry)
                self.ends.append(len(text))
        cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        if reason is None and (len(self.out_ids) >= p.max_tokens or self.n_real + 1 >= max_model_len):
            reason = "length"
        if reason is not None:
            # the tokens that start before the end of the output (not at or past a stop string)
            lps = self._logprobs_before(len(text) if cut >= 0 else None)
            if len(text) > self.sent or lps:
                deliver(self.req, Delta(text[self.sent :], lps))
            total = self.logprob_sum if p.logprobs is not None else None
            self.finish(Done(reason, len(self.req.prompt_ids), len(self.out_ids), total))
            return
        safe = len(text) - max((len(s) - 1 for s in p.stop), default=0)  # a stop string may be starting
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            safe = min(safe, len(text) - 1)
        if safe > self.sent:
            deliver(self.req, Delta(text[self.sent : safe], self._logprobs_before(safe)))
            self.sent = safe

    def _logprobs_before(self, end: int | None) -> tuple[TokenLogprob, ...]:
        """The log-probabilities not sent yet of the tokens that start before `end` (None: all), marked sent."""
        k = self.logprobs_sent
        while k < len(self.logprobs) and (end is None or (self.ends[k - 1] if k else 0) < end):
            k += 1
        out = tuple(self.logprobs[self.logprobs_sent : k])
        self.logprobs_sent = k
        return out

    def _adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits to sample from: with the request's penalties and bias, if any. Called first for the first
        output token, so the counts start empty and `seen` with the prompt."""
        p = self.req.params
        if not (p.penalized or p.logit_bias):
            return logits
        logits = logits.float()
        vocab = logits.shape[-1]
        if self.counts is None and (p.frequency_penalty or p.presence_penalty):
            self.counts = torch.zeros(vocab)
        if self.seen is None and p.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool)
            ids = [t for t in self.req.prompt_ids if 0 <= t < vocab]
            self.seen[torch.tensor(ids, dtype=torch.long)] = True
        return adjust(logits, p, self.counts, self.seen)


def eos_ids(model, tokenizer) -> set[int]:
    """The token ids that end a sequence: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
