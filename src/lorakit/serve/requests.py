"""What a generation request is, the events it produces, and how the next token is picked.

    req = GenRequest(prompt_ids, "fr", SamplingParams(max_tokens=16, temperature=0), emit=events.append)

The engine calls `emit` on its own thread: Delta events (new text), then exactly one Done or Failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from lorakit.serve.schema import Grammar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes."""

    max_tokens: int
    """Most tokens to generate."""
    temperature: float = 1.0
    """0 (or anything below `GREEDY_BELOW`) means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Seed of this request's own random generator (None: the engine's global one)."""
    stop: tuple[str, ...] = ()
    """Generation stops before the first of these strings; it is not part of the output."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation, besides end-of-sequence."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence (for benchmarks)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once for each time it was generated already (OpenAI's, in [-2, 2])."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token generated already (OpenAI's, in [-2, 2])."""
    repetition_penalty: float = 1.0
    """Tokens of the prompt or the output so far: a positive logit divided by it, a negative one multiplied
    (Hugging Face's and vLLM's; 1: off)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits (OpenAI's, each in [-100, 100])."""
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: each generated token's, and the k most likely tokens' at its position,
    from the model's logits before penalties, bias and temperature."""
    prompt_logprobs: int | None = None
    """None: none; k >= 0: each prompt token's log-probability given the tokens before it, and the k most likely
    there (a Prompt event before any text). With max_tokens 0 nothing is generated: the prompt is only scored."""

    guide: Grammar | None = None
    """Structured output: every token keeps the output a prefix of a text this grammar allows (a JSON object, a
    JSON Schema's document, one of some choices); the row ends when it is whole (lorakit.serve.guide)."""

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability, and the `top` most likely tokens at its position."""

    token: int
    logprob: float | None
    """None for a prompt's first token: nothing comes before it."""
    top: tuple[tuple[int, float], ...]


@dataclass
class Delta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    """The tokens this text came from (with SamplingParams.logprobs set): text that was held back (a stop string
    might start there, or half a UTF-8 character) comes with a later token's Delta."""


@dataclass
class Prompt:
    """The prompt's tokens with their log-probabilities (SamplingParams.prompt_logprobs), before any Delta."""

    logprobs: tuple[TokenLogprob, ...]


@dataclass
class Done:
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    logprob_sum: float | None = None
    """With SamplingParams.logprobs: the sum of every generated token's log-probability, an end-of-sequence or
    stop token's included (what `best_of` ranks by, per token)."""
    cached_tokens: int = 0
    """Prompt tokens whose KV cache came from the prefix cache instead of being computed (`usage`'s
    prompt_tokens_details.cached_tokens)."""


@dataclass
class Failed:
    status: int  # the HTTP status it maps to
    message: str
    code: str


Event = Prompt | Delta | Done | Failed


@dataclass(eq=False)
class GenRequest:
    """One generation: prompt token ids, the adapter (None: the base model), sampling, and where events go.

    `emit` is called on the engine thread with a Prompt event (if asked for), Delta events, then exactly one Done
    or Failed."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: bool = False  # set by the server when the client goes away; the row leaves at the next step
    lease: ExitStack | None = None
    """A hold on the adapter taken when the server accepted the request (`AdapterBank.hold`), which the engine's row
    takes over, so that nothing (an unload, an eviction, a load in place) changes the adapter a request was accepted
    with; None: the engine takes one when it admits the request."""
    slot: str | None = None
    """The model's adapter that `lease` holds."""


SHUTDOWN = Failed(503, "the server is shutting down", "server_shutdown")


def release(req: GenRequest) -> None:
    """Let go of the hold the request took on its adapter when it was accepted, if no row has taken it over."""
    lease, req.lease = req.lease, None
    if lease is not None:
        lease.close()


def failure(e: BaseException) -> Failed:
    """The event of a request that an exception failed (HTTP 500), naming the exception."""
    return Failed(500, f"generation failed: {type(e).__name__}: {e}", "server_error")


def deliver(req: GenRequest, event: Event) -> None:
    """Hand `event` to the request's callback; a callback that raises cancels its own request, nothing else. A
    request's last event (Done or Failed) lets go of the hold it was accepted with, if no row took it over."""
    if isinstance(event, (Done, Failed)):
        release(req)
    try:
        req.emit(event)
    except Exception:  # noqa: BLE001 - a broken consumer must not stop the engine
        log.exception("a request's event callback failed; cancelling the request")
        req.cancelled = True


GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily, as vLLM does: dividing by them overflows float32 (1e-38 does, and
1e-46 rounds to 0), and their distribution is the argmax's anyway."""


def adjust(
    logits: torch.Tensor, p: SamplingParams, counts: torch.Tensor | None, seen: torch.Tensor | None
) -> torch.Tensor:
    """`logits` (vocab,) float32 with `p`'s repetition penalty over `seen` (a bool mask of the prompt's and the
    output's tokens), frequency and presence penalties over `counts` (how often each token was generated), then
    the logit bias. Returns a new tensor; the model's logits stay as they were (for logprobs)."""
    out = logits.clone()
    if p.repetition_penalty != 1.0 and seen is not None:
        hit = out[seen]
        out[seen] = torch.where(hit > 0, hit / p.repetition_penalty, hit * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and counts is not None:
        out -= counts * p.frequency_penalty + (counts > 0).float() * p.presence_penalty
    for token, bias in p.logit_bias:
        out[token] += bias
    return out


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """The next token from `logits` (vocab,): argmax when temperature is below GREEDY_BELOW, else temperature +
    top-p sampling, in float32 whatever the logits' dtype.

    Safe for any temperature and top_p in range: logits are shifted so that their largest is 0 before the
    division (so nothing overflows to NaN), +inf logits are the sure tokens, and the nucleus always keeps the top
    token (a top_p under float32's smallest number rounds to 0). Raises ValueError if the logits are NaN or all
    -inf: the row that produced them fails, not the batch."""
    logits = logits.float()
    if torch.isnan(logits).any() or not (logits > float("-inf")).any():
        raise ValueError("the model produced NaN or all -inf logits for this request; no token can be picked")
    if temperature < GREEDY_BELOW:
        return int(logits.argmax())
    if torch.isposinf(logits).any():
        logits = torch.where(torch.isposinf(logits), 0.0, float("-inf"))
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus is already full
        drop[0] = False
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
