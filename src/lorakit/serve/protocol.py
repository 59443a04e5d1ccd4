"""The OpenAI wire format of requests: parsing (with clear 400s) into sampling parameters, and errors. The
answers' shapes: lorakit.serve.responses.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the HTTP status set.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request

from lorakit.serve.requests import SamplingParams
from lorakit.serve.schema import (
    JSON_OBJECT,
    Grammar,
    SchemaError,
    compile_choices,
    compile_pattern,
    compile_schema,
)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes (negatives wrap around)
MAX_BODY = 16 * 2**20  # bytes of request body; a prompt filling a 128k context is ~1 MB of text
MAX_LOGPROBS = 20  # most top_logprobs (chat) or logprobs (completions): OpenAI's chat limit
MAX_LOGIT_BIAS = 1024  # most entries of logit_bias
MAX_N = 128  # most choices (`n`, and `best_of`) of one request: OpenAI's limit for `n`
MAX_ROWS = 1024  # most sequences (prompts x best_of) of one completions request


class APIError(Exception):
    """An error answered as HTTP `status` with an OpenAI-shaped JSON body."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_request") -> APIError:
    return APIError(400, message, code, param)


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
    echo = _bool(body, "echo")
    max_tokens = _int(body, "max_tokens", default=COMPLETION_DEFAULT_MAX_TOKENS, low=0 if echo else 1)
    logprobs = _int(body, "logprobs", default=None, low=0, high=MAX_LOGPROBS)
    params = {**_sampling(body), "logprobs": logprobs, "prompt_logprobs": logprobs if echo else None}
    stream = _stream(body)
    n = _n(body)
    best_of = _int(body, "best_of", default=n, low=1, high=MAX_N)
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
    top = _int(body, "top_logprobs", default=None, low=0, high=MAX_LOGPROBS)
    logprobs = _bool(body, "logprobs")
    if top is not None and not logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    messages = [_message(m, i) for i, m in enumerate(raw)]
    max_tokens = _int(body, "max_completion_tokens", default=None, low=1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", default=None, low=1)
    params = {**_sampling(body), "logprobs": (top or 0) if logprobs else None}
    return Parsed(_model(body), None, messages, max_tokens, params, *_stream(body), n=_n(body))


def _n(body: dict[str, Any]) -> int:
    return _int(body, "n", default=1, low=1, high=MAX_N)


def parse_tokenize(body: dict[str, Any]) -> Parsed:
    """vLLM's /tokenize: {"prompt": text} (`add_special_tokens`, default true) or {"messages": [...]} through the
    chat template (`add_generation_prompt`, default true)."""
    if body.get("messages") is not None:
        raw = body["messages"]
        if not isinstance(raw, list) or not raw:
            raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
        messages = [_message(m, i) for i, m in enumerate(raw)]
        add = body.get("add_generation_prompt")
        params = {"add_generation_prompt": True if add is None else _bool(body, "add_generation_prompt")}
        return Parsed(_model(body), None, messages, None, params, False, False)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise bad("'prompt' must be a string (or send 'messages')", "prompt")
    add = body.get("add_special_tokens")
    params = {"add_special_tokens": True if add is None else _bool(body, "add_special_tokens")}
    return Parsed(_model(body), [prompt], None, None, params, False, False)


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
    return stream, _bool(opts, "include_usage", "stream_options.")


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    temperature = _num(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _num(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise bad("'top_p' must be in (0, 1]", "top_p")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise bad("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in stop_ids
    ):
        raise bad("'stop_token_ids' must be a list of token ids", "stop_token_ids")
    seed = body.get("seed")
    if seed is not None and (
        not isinstance(seed, int) or isinstance(seed, bool) or not SEED_MIN <= seed <= SEED_MAX
    ):
        raise bad(f"'seed' must be a 64-bit integer, in [-2**63, 2**64 - 1], got {seed!r}", "seed")
    guide = _guide(body)
    if guide is not None and _bool(body, "ignore_eos"):
        raise bad(
            "'ignore_eos' cannot be used with structured output (response_format, guided_json, guided_choice): "
            "the output's end ends it",
            "ignore_eos",
        )
    return {
        "guide": guide,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "stop": tuple(stop),
        "stop_token_ids": tuple(stop_ids),
        "ignore_eos": _bool(body, "ignore_eos"),
        "frequency_penalty": _num(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "presence_penalty": _num(body, "presence_penalty", 0.0, -2.0, 2.0),
        "repetition_penalty": _repetition_penalty(body),
        "logit_bias": _logit_bias(body),
    }


def _guide(body: dict[str, Any]) -> Grammar | None:
    """What the output must be, if anything: OpenAI's response_format (`json_object`: any JSON object;
    `json_schema`: a document its schema allows), or vLLM's guided_json (a schema), guided_choice (one of a list
    of strings) or guided_regex (a text a regular expression fullmatches). At most one of them."""
    given = [
        k
        for k in ("response_format", "guided_json", "guided_choice", "guided_regex")
        if body.get(k) is not None
    ]
    given = [k for k in given if k != "response_format" or _format_kind(body[k]) != "text"]
    if len(given) > 1:
        raise bad(f"give one of {given[0]!r} and {given[1]!r}, not both", given[1])
    if not given:
        return None
    key = given[0]
    try:
        if key == "guided_choice":
            return compile_choices(body[key])
        if key == "guided_regex":
            return compile_pattern(body[key])
        if key == "guided_json":
            schema = body[key]
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError:
                    raise bad(
                        "'guided_json' is a string but not JSON: give the schema as an object", key
                    ) from None
            return compile_schema(schema)
        value = body[key]
        if _format_kind(value) == "json_object":
            return JSON_OBJECT
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict | bool):
            raise bad(
                'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}', key
            )
        return compile_schema(spec["schema"])
    except SchemaError as e:
        where = "response_format.json_schema.schema" if key == "response_format" else key
        raise bad(f"{where}: {e}"[:500], key) from None


def _format_kind(value: Any) -> str:
    """The type of a response_format: text, json_object or json_schema; 400 for anything else."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise bad(
            '\'response_format\' must be {"type": "text"}, {"type": "json_object"} or '
            f'{{"type": "json_schema", "json_schema": {{...}}}}, got {value!r}'[:200],
            "response_format",
        )
    return kind


def _repetition_penalty(body: dict[str, Any]) -> float:
    value = body.get("repetition_penalty")
    if value is None:
        return 1.0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 100:
        raise bad(
            f"'repetition_penalty' must be a number in (0, 100] (1: off), got {value!r}", "repetition_penalty"
        )
    return float(value)


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    """{"token id": bias} as sorted (id, bias) pairs; the ids' range is checked against the vocabulary later."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise bad(
            f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids to biases", "logit_bias"
        )
    out = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise bad(f"'logit_bias': {key[:40]!r} is not a token id (a non-negative integer)", "logit_bias")
        if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not -100 <= bias <= 100:
            raise bad(f"'logit_bias'[{key!r}] must be a number in [-100, 100], got {bias!r}", "logit_bias")
        out.append((int(key), float(bias)))
    return tuple(sorted(out))


def _bool(body: dict[str, Any], key: str, prefix: str = "") -> bool:
    """A JSON boolean (missing or null: false); 400 for anything else ("false" as a string is truthy in Python)."""
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{prefix}{key}' must be a boolean (true or false), got {value!r}", prefix + key)
    return value


def _int(
    body: dict[str, Any], key: str, *, default: int | None, low: int, high: int | None = None
) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or high is not None
        and value > high
    ):
        within = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad(f"{key!r} must be an integer {within}, got {value!r}", key)
    return value


def _num(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise bad(f"{key!r} must be a number in [{low}, {high}], got {value!r}", key)
    return float(value)


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
