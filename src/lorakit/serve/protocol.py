"""The OpenAI wire format of requests: parsing (with clear 400s) into sampling parameters. The errors and the
field readers: lorakit.serve.api_errors (`APIError` and `bad` are named here too, as handlers use them); the
sampling fields: lorakit.serve.sampling_fields; the answers' shapes: lorakit.serve.responses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request

from lorakit.serve.api_errors import APIError, bad, boolean, integer
from lorakit.serve.requests import SamplingParams
from lorakit.serve.sampling_fields import SEED_MAX, sampling

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_BODY = 16 * 2**20  # bytes of request body; a prompt filling a 128k context is ~1 MB of text
MAX_LOGPROBS = 20  # most top_logprobs (chat) or logprobs (completions): OpenAI's chat limit
MAX_N = 128  # most choices (`n`, and `best_of`) of one request: OpenAI's limit for `n`
MAX_ROWS = 1024  # most sequences (prompts x best_of) of one completions request


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object; 413 past MAX_BODY bytes (read no further), 400 if not JSON."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise APIError(413, f"the request body is over {MAX_BODY // 2**20} MiB", "request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
    except RecursionError:
        raise APIError(
            400, "the request body is nested too deeply (over ~1000 levels of [ or {)", "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_json")
    _no_surrogates(body, raw)
    return body


_MAYBE_SURROGATE = re.compile(
    rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]"
)  # "\ud800" escaped, or raw (surrogatepass)


def _no_surrogates(body: dict[str, Any], raw: bytes) -> None:
    """400 naming the field if a string holds a lone UTF-16 surrogate ("\ud800"): JSON allows the escape, but it is
    no character, and the tokenizer (and any UTF-8 encoder) fails on it."""
    if json.detect_encoding(raw) == "utf-8" and not _MAYBE_SURROGATE.search(raw):
        return  # the common case: no string can hold one, skip the walk
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:  # iterative: the body may be nested deep
        value, where = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                sub = f"{where}.{key}" if where else str(key)
                stack += [(key, sub), (item, sub)]
        elif isinstance(value, list):
            stack += [(item, f"{where}[{i}]") for i, item in enumerate(value)]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                char = f"\\u{ord(value[e.start]):04x}"
                raise bad(
                    f"{where!r} holds a lone UTF-16 surrogate ({char}) at character {e.start}, which is not valid "
                    "Unicode; send the character's surrogate pair or UTF-8",
                    where,
                    "invalid_unicode",
                ) from None


@dataclass
class Parsed:
    """A validated generation request: the model named, the prompt (text or token ids) and sampling."""

    model: str | None
    prompts: list[str | list[int]] | None  # completions: each prompt, text or token ids (a batch, or one)
    messages: list[dict[str, Any]] | None  # chat
    max_tokens: int | None  # None: whatever context is left
    params: dict[str, Any]  # SamplingParams fields except max_tokens
    stream: bool
    include_usage: bool
    echo: bool = False  # completions: the prompt comes first in the text (and its tokens in the logprobs)
    n: int = 1  # choices returned
    best_of: int = 1  # completions: choices generated, of which the n best (per-token log-probability) return
    tools: Any = None  # chat: lorakit.serve.tools.Tools, when functions are offered or earlier calls rendered


def parse_completion(body: dict[str, Any]) -> Parsed:
    if body.get("suffix"):
        raise bad("'suffix' is not supported by lorakit serve", "suffix", "unsupported_parameter")
    prompts = _prompts(body.get("prompt"))
    echo = boolean(body, "echo")
    max_tokens = integer(body, "max_tokens", default=COMPLETION_DEFAULT_MAX_TOKENS, low=0 if echo else 1)
    logprobs = integer(body, "logprobs", default=None, low=0, high=MAX_LOGPROBS)
    params = {**sampling(body), "logprobs": logprobs, "prompt_logprobs": logprobs if echo else None}
    stream = _stream(body)
    n = _n(body)
    best_of = integer(body, "best_of", default=n, low=1, high=MAX_N)
    if best_of < n:
        raise bad(f"'best_of' must be at least 'n' ({n}), got {best_of}", "best_of")
    if best_of > n and stream[0]:
        raise bad("'best_of' greater than 'n' cannot stream: the best are known only at the end", "best_of")
    if len(prompts) * best_of > MAX_ROWS:
        raise bad(
            f"{len(prompts)} prompts x {best_of} choices is {len(prompts) * best_of} sequences, over {MAX_ROWS} "
            "in one request: send fewer",
            "prompt",
        )
    return Parsed(_model(body), prompts, None, max_tokens, params, *stream, echo=echo, n=n, best_of=best_of)


def _prompts(prompt: Any) -> list[str | list[int]]:
    """A prompt (text, or token ids), or a batch of them: all texts or all token-id lists."""

    def ids(x: Any) -> bool:
        return (
            isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        )

    if isinstance(prompt, str) or ids(prompt):
        return [prompt]
    if (
        isinstance(prompt, list)
        and prompt
        and (all(isinstance(p, str) for p in prompt) or all(map(ids, prompt)))
    ):
        return list(prompt)
    raise bad(
        "'prompt' must be a string, a list of token ids, or a non-empty list of strings or of token-id lists",
        "prompt",
    )


def parse_chat(body: dict[str, Any]) -> Parsed:
    for key in ("audio",):
        if body.get(key):
            raise bad(f"{key!r} is not supported by lorakit serve", key, "unsupported_parameter")
    top = integer(body, "top_logprobs", default=None, low=0, high=MAX_LOGPROBS)
    logprobs = boolean(body, "logprobs")
    if top is not None and not logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    messages = parse_messages(body.get("messages"))
    max_tokens = integer(body, "max_completion_tokens", default=None, low=1)
    if max_tokens is None:
        max_tokens = integer(body, "max_tokens", default=None, low=1)
    params = {**sampling(body), "logprobs": (top or 0) if logprobs else None}
    return Parsed(_model(body), None, messages, max_tokens, params, *_stream(body), n=_n(body))


def _n(body: dict[str, Any]) -> int:
    return integer(body, "n", default=1, low=1, high=MAX_N)


def parse_tokenize(body: dict[str, Any]) -> Parsed:
    """vLLM's /tokenize: {"prompt": text} (`add_special_tokens`, default true) or {"messages": [...]} through the
    chat template (`add_generation_prompt`, default true)."""
    if body.get("messages") is not None:
        messages = parse_messages(body["messages"])
        add = body.get("add_generation_prompt")
        params = {"add_generation_prompt": True if add is None else boolean(body, "add_generation_prompt")}
        return Parsed(_model(body), None, messages, None, params, False, False)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise bad("'prompt' must be a string (or send 'messages')", "prompt")
    add = body.get("add_special_tokens")
    params = {"add_special_tokens": True if add is None else boolean(body, "add_special_tokens")}
    return Parsed(_model(body), [prompt], None, None, params, False, False)


def parse_messages(raw: Any) -> list[dict[str, Any]]:
    """A request's chat `messages`: each {role, content} with text content; 400 naming the bad one."""
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    return [_message(m, i) for i, m in enumerate(raw)]


def _message(m: Any, i: int) -> dict[str, Any]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise bad(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
    out = {"role": m["role"], "content": content}
    for key in ("tool_calls", "tool_call_id", "name"):  # checked by lorakit.serve.tools
        if m.get(key) is not None:
            out[key] = m[key]
    return out


def model_of(body: dict[str, Any]) -> str | None:
    """The request's `model` (None: the base); 400 if it is not a string."""
    return _model(body)


def _model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    return model


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    return stream, boolean(opts, "include_usage", "stream_options.")


def choice_params(parsed: Parsed, max_tokens: int) -> list[SamplingParams]:
    """The sampling of each choice generated (`best_of` of them where set, else `n`).

    Choice i draws from seed + i (wrapped into 64 bits), as vLLM does: a request is reproducible, and its first
    choice is what the same request with n=1 gives. Ranking `best_of` needs each choice's log-probabilities, so
    they are computed even when the request does not ask for them (they are not returned then)."""
    base = SamplingParams(max_tokens=max_tokens, **parsed.params)
    if parsed.best_of > parsed.n and base.logprobs is None:
        base = replace(base, logprobs=0)
    out = []
    for i in range(max(parsed.n, parsed.best_of)):
        seed = base.seed
        if seed is not None and i:
            seed += i
            if seed > SEED_MAX:
                seed -= 2**64  # the same seed to torch.Generator, which takes it modulo 2**64
        out.append(replace(base, seed=seed))
    return out
