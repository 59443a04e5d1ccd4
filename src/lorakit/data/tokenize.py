"""Turn examples into token ids and labels, with the loss only where the model should learn.

Labels are -100 (ignored by the loss) on prompts, system and user turns, and on assistant messages with
`"weight": 0` (OpenAI's fine-tuning format), unless `train_on_all`. With a chat
template, the learned span of an assistant turn is found by rendering the conversation before and after that turn
and taking the difference, so it includes the template's end-of-turn tokens, whatever the template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorakit.data.jsonl import shape_of
from lorakit.data.toolcalls import has_tools, renders_tools, tool_prompt, tool_specs

IGNORE = -100


@dataclass
class Encoded:
    """Token ids and labels of one example; `truncated` if it was cut to the maximum length."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def _render(tokenizer, messages: list[dict[str, Any]], generation_prompt: bool, extra: dict[str, Any]) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, **extra
    )


def chat_messages(
    tokenizer, ex: dict[str, Any], use_template: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A messages example as the chat template takes it, and the template's extra arguments: its tool calls,
    results and functions offered rendered as `lorakit serve` renders a request's (`lorakit.data.toolcalls`)."""
    if not has_tools(ex):
        return ex["messages"], {}
    native = use_template and renders_tools(tokenizer)
    msgs = tool_prompt(ex["messages"], ex.get("tools", []), native=native)
    return msgs, ({"tools": tool_specs(ex["tools"])} if native and ex.get("tools") else {})


def _segments(tokenizer, ex: dict[str, Any], chat: bool) -> list[tuple[str, bool]]:
    """The example as (text, learn) pieces in order."""
    shape = shape_of(ex)
    eos = tokenizer.eos_token or ""
    if shape == "text":
        return [(ex["text"] + eos, True)]
    use_template = chat and getattr(tokenizer, "chat_template", None)
    if shape == "prompt_completion":
        if not use_template:
            return [(ex["prompt"], False), (ex["completion"] + eos, True)]
        ex = {
            "messages": [
                {"role": "user", "content": ex["prompt"]},
                {"role": "assistant", "content": ex["completion"]},
            ]
        }
    msgs, extra = chat_messages(tokenizer, ex, bool(use_template))
    if not use_template:
        return [
            (
                f"{m['role']}: {m['content']}\n" + (eos if m["role"] == "assistant" else ""),
                _learned(m),
            )
            for m in msgs
        ]
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, msgs[:i], True, extra)
        upto = _render(tokenizer, msgs[: i + 1], False, extra)
        if not (prefix.startswith(done) and upto.startswith(prefix)):
            prefix, upto = (
                done + prefix[len(done) :],
                prefix + (m.get("content") or "") + eos,
            )  # unusual template: best effort
        pieces += [(prefix[len(done) :], False), (upto[len(prefix) :], _learned(m))]
        done = upto
    return pieces


def _learned(message: dict[str, Any]) -> bool:
    """An assistant message is learned unless its OpenAI-style `weight` is 0."""
    return message["role"] == "assistant" and message.get("weight", 1) != 0


def learned_segments(
    tokenizer, ex: dict[str, Any], *, chat: bool = True, train_on_all: bool = False
) -> list[tuple[str, bool]]:
    """The example's text as training sees it (chat template applied), in (text, learned) pieces: what the loss
    learns (completions and assistant turns; everything with `train_on_all`) and what it only reads."""
    return [(text, learn or train_on_all) for text, learn in _segments(tokenizer, ex, chat) if text]


def encode_example(
    tokenizer, ex: dict[str, Any], *, max_len: int, chat: bool = True, train_on_all: bool = False
) -> Encoded:
    """Token ids and labels for one example (see module docstring)."""
    ids: list[int] = []
    labels: list[int] = []
    for text, learn in _segments(tokenizer, ex, chat):
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if (learn or train_on_all) else [IGNORE] * len(piece)
    truncated = len(ids) > max_len
    return Encoded(ids[:max_len], labels[:max_len], truncated)


def encode_dataset(
    tokenizer, examples: list[dict[str, Any]], *, max_len: int, chat: bool = True, train_on_all: bool = False
) -> tuple[list[Encoded], dict[str, int]]:
    """Encode all examples; also returns counts: examples, truncated, tokens, learned_tokens, dropped (nothing left
    to learn after truncation)."""
    out: list[Encoded] = []
    stats = {"examples": len(examples), "truncated": 0, "tokens": 0, "learned_tokens": 0, "dropped": 0}
    for ex in examples:
        enc = encode_example(tokenizer, ex, max_len=max_len, chat=chat, train_on_all=train_on_all)
        stats["truncated"] += enc.truncated
        if all(label == IGNORE for label in enc.labels[1:]):
            stats["dropped"] += 1
            continue
        stats["tokens"] += len(enc.input_ids)
        stats["learned_tokens"] += sum(label != IGNORE for label in enc.labels[1:])
        out.append(enc)
    return out, stats


def pack(encoded: list[Encoded], max_len: int) -> list[Encoded]:
    """Concatenate examples into rows of at most `max_len` tokens (greedy, in order). The first token of each
    example after the first in a row is not learned (it would be predicted from the previous example)."""
    rows: list[Encoded] = []
    ids: list[int] = []
    labels: list[int] = []
    for enc in encoded:
        if ids and len(ids) + len(enc.input_ids) > max_len:
            rows.append(Encoded(ids, labels))
            ids, labels = [], []
        first = [IGNORE] if ids else enc.labels[:1]
        ids = ids + enc.input_ids
        labels = labels + first + enc.labels[1:]
    if ids:
        rows.append(Encoded(ids, labels))
    return rows
