"""Log-probabilities in the serve engine: of each generated token (`logprob`), and of a prompt's tokens
(`prompt_logprobs`, what `echo` with `logprobs` asks), a chunk of positions at a time. With a plain LM head the
prompt's logits come from the backbone's last hidden states (`keep_hidden`, `row_logits`), so the whole prompt's
logits never exist at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorakit.serve.requests import TokenLogprob

SCORE_CHUNK = 256
"""Prompt positions scored at once: 256 x vocabulary floats (50 MB for a 49k vocabulary), whatever the prompt's
length."""


def prompt_logprobs(
    ids: list[int], logits_at: Callable[[int, int], torch.Tensor], top: int
) -> tuple[TokenLogprob, ...]:
    """Each prompt token's log-probability given the ones before it, and the `top` most likely tokens there.
    `logits_at(start, stop)` gives the model's logits (stop - start, vocab) at the prompt's positions start to
    stop - 1 (position i predicts token i + 1; the last one predicts the first generated token and is not used);
    it is asked for SCORE_CHUNK positions at a time."""
    out = [TokenLogprob(ids[0], None, ())]
    for start in range(0, len(ids) - 1, SCORE_CHUNK):
        stop = min(start + SCORE_CHUNK, len(ids) - 1)
        out += _logprobs(logits_at(start, stop), ids[start + 1 : stop + 1], top)
    return tuple(out)


def _logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """For each row of `logits` (n, vocab): its token's log-probability under the model's own distribution
    (before penalties, bias and temperature) and the `top` most likely tokens', in one pass over the rows."""
    lp = torch.log_softmax(logits.float(), dim=-1).clamp_(min=LOGPROB_FLOOR).cpu()
    chosen = lp.gather(1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0].tolist()
    if not top:
        return [TokenLogprob(t, v, ()) for t, v in zip(tokens, chosen, strict=True)]
    values, best = lp.topk(min(top, lp.shape[-1]), dim=-1)
    return [
        TokenLogprob(t, v, tuple(zip(b, w, strict=True)))
        for t, v, b, w in zip(tokens, chosen, best.tolist(), values.tolist(), strict=True)
    ]


LOGPROB_FLOOR = -9999.0
"""A log-probability of -inf (a token the model rules out) is sent as this: JSON has no infinities."""


def logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`_logprobs` of one position."""
    return _logprobs(logits[None], [token], top)[0]


def row_logits(
    first: int, logits: torch.Tensor, hidden: torch.Tensor | None, head: torch.Tensor | None
) -> Callable[[int, int], torch.Tensor]:
    """`prompt_logprobs`'s source for a row whose prompt starts at position `first`: with a plain head, its last
    hidden states times the head's weight, a chunk at a time; else its logits of every position."""
    if hidden is not None and head is not None:
        return lambda a, b: torch.nn.functional.linear(hidden[first + a : first + b].to(head.dtype), head)
    return lambda a, b: logits[first + a : first + b]


def keep_hidden(out: list[torch.Tensor]) -> Callable:
    """A forward hook on the backbone that keeps its last hidden states (batch, T, hidden): the LM head's input."""

    def hook(module, args, output) -> None:
        out.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    return hook
