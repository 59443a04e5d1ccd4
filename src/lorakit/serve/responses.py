"""The OpenAI wire format's answers: response bodies, stream chunks (server-sent events), usage, log-probability
objects, and the choice of `best_of`'s best. Requests and errors: lorakit.serve.protocol."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from lorakit.serve.requests import TokenLogprob


def sse(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n"


def best(logprob_sums: Sequence[float], lengths: Sequence[int], n: int) -> list[int]:
    """The indices of the `n` choices with the highest log-probability per generated token (OpenAI's `best_of`
    rule), best first; ties keep the earlier choice first. A choice of no token ranks last."""
    score = [s / k if k else float("-inf") for s, k in zip(logprob_sums, lengths, strict=True)]
    return sorted(range(len(score)), key=lambda i: -score[i])[:n]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens the prefix cache spared computing."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_logprobs(
    entries: Sequence[TokenLogprob], token_text: Callable[[int], str], offset: int = 0
) -> dict[str, Any]:
    """The legacy completions `logprobs` object: each token's text, its log-probability, the top ones (with the
    chosen token's, so up to k + 1) and where it starts, counting from `offset` (the text already sent)."""
    tokens, top, offsets = [], [], []
    for e in entries:
        text = token_text(e.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        # a prompt's first token has no log-probability, nor alternatives
        top.append(
            None if e.logprob is None else {token_text(t): lp for t, lp in (*e.top, (e.token, e.logprob))}
        )
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: Callable[[int], str]) -> dict[str, Any]:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": None}."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def completion_choice(
    index: int, text: str, finish: str | None, logprobs: dict | None = None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def completion_body(rid: str, model: str, choices: list[dict[str, Any]], use: dict | None) -> dict[str, Any]:
    """A /v1/completions response, or (use None) one stream chunk of it."""
    body = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if use is not None:
        body["usage"] = use
    return body


def chat_choice(
    index: int, text: str, finish: str, logprobs: dict | None = None, calls: list[dict] | None = None
) -> dict[str, Any]:
    """A chat choice: its text as content, or (`calls`) the tool calls it made (finish_reason "tool_calls")."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message, finish = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def chat_body(rid: str, model: str, choices: list[dict[str, Any]], use: dict) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
    }


def chat_chunk(
    rid: str,
    model: str,
    delta: dict[str, str],
    finish: str | None,
    logprobs: dict | None = None,
    index: int = 0,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
    }


def usage_chunk(rid: str, model: str, chat: bool, use: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, only usage."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": use,
    }
