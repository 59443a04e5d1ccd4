"""vLLM's (and SGLang's) classification route, POST /classify and /v1/classify: the scores of a classifier adapter
(a reward model, a text classifier: task_type SEQ_CLS) served over the same base model as the generation adapters.

    {"model": "sentiment", "input": ["great film", "dull"]}            # texts, token-id lists, or
    {"model": "sentiment", "input": [{"text": "...", "text_pair": "..."}]}      # pairs (lorakit's extension)
    {"model": "rm", "messages": [{"role": "user", ...}, {"role": "assistant", ...}]}   # a conversation's reward
    -> {"id": "classify-...", "object": "list", "created", "model",
        "data": [{"index": 0, "label": "positive", "probs": [...], "num_classes": 2, "logits": [...]}], "usage"}

Inputs are tokenized as training tokenized them, so that the scores are the trained classifier's: a classifier's
(and a regression's) texts as the tokenizer's own classification input (`lorakit.data.labels.encode_labelled`); a
reward model's text
as a text example (the text, then the end-of-text token) and its conversation through the chat template, ending
with the answer to score (`lorakit.data.tokenize.encode_example`); token ids as given. `probs` is the softmax of
the logits (for a head with one output, a reward model's, its sigmoid, as vLLM answers; a multi-label
classifier's, each class's sigmoid, and lorakit's `labels`: the classes whose logit is over 0); `logits` (lorakit's
extension) are the head's raw outputs: a reward model's reward, and a regression's prediction, is `logits[0]`.

A token classifier's adapter (task_type TOKEN_CLS, `lorakit train --objective token_classify`) takes texts only,
tokenized as training tokenized them (`lorakit.data.tagging.token_offsets`), and answers each text's entities as
transformers' token-classification pipeline groups them (`entities`: `entity_group`, `word`, `start`, `end` in
characters, `score`: the mean probability of its tokens' tags) and each token's tag (`tokens`: `id`, `start`,
`end`, `label`, `score`; null for the tokens training tags none of: special tokens, tokens of spaces only):

    {"model": "ner", "input": ["Anna flew to New York."]}
    -> "data": [{"index": 0, "num_classes": 5, "entities": [{"entity_group": "LOC", "word": "New York", ...}],
                 "tokens": [...]}]

The scoring runs on the engine thread between decode steps (`Engine.call`), a chunk of rows at a time (at most
the engine's `max_prefill_tokens` padded tokens), so answers streaming meanwhile pause for one chunk at a time.
The request holds its adapter until it is answered, as a generation request does.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse

from lorakit.classifier_heads import Head, head_scores, token_scores
from lorakit.data.files import DataError
from lorakit.data.tagging import decode_tags, token_offsets
from lorakit.data.tokenize import encode_example
from lorakit.serve import protocol as P
from lorakit.serve import responses as R
from lorakit.serve.adapters import AdapterRoutes
from lorakit.serve.api_errors import boolean
from lorakit.serve.engine import Engine, EngineStopped
from lorakit.serve.metrics import Latency
from lorakit.serve.routing import route

MAX_INPUTS = P.MAX_ROWS
"""Most inputs of one request."""


@dataclass
class Parsed:
    model: str | None
    inputs: list[str | list[int] | tuple[str, str]] | None
    messages: list[dict[str, Any]] | None
    add_special_tokens: bool


def parse_classify(body: dict[str, Any]) -> Parsed:
    """{"model", "input"} or {"model", "messages"}: 400 naming the bad field."""
    has_input, has_messages = body.get("input") is not None, body.get("messages") is not None
    if has_input == has_messages:
        raise P.bad(
            "send 'input' (texts or token ids) or 'messages' (a conversation), one of the two", "input"
        )
    add = True if body.get("add_special_tokens") is None else boolean(body, "add_special_tokens")
    if has_messages:
        messages = P.parse_messages(body["messages"])
        if messages[-1]["role"] != "assistant":
            raise P.bad(
                "'messages' must end with the assistant's answer, which a reward model scores", "messages"
            )
        return Parsed(P.model_of(body), None, messages, add)
    raw = body["input"]
    items = raw if isinstance(raw, list) and raw and not _token_ids(raw) else [raw]
    if len(items) > MAX_INPUTS:
        raise P.bad(f"{len(items)} inputs in one request, over {MAX_INPUTS}: send fewer", "input")
    return Parsed(P.model_of(body), [_item(x, i, len(items)) for i, x in enumerate(items)], None, add)


def _token_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _item(x: Any, i: int, n: int) -> str | list[int] | tuple[str, str]:
    where = f"input[{i}]" if n > 1 else "input"
    if isinstance(x, str):
        if not x:
            raise P.bad(f"{where} is empty", "input")
        return x
    if _token_ids(x):
        return list(x)
    if isinstance(x, dict) and isinstance(x.get("text"), str) and isinstance(x.get("text_pair"), str):
        if set(x) != {"text", "text_pair"}:
            raise P.bad(f"{where}: a pair has the keys text and text_pair only, got {sorted(x)}", "input")
        return x["text"], x["text_pair"]
    raise P.bad(
        f"{where} must be a text, a list of token ids, or a pair {{text, text_pair}}; 'input' is one of these or "
        "a non-empty list of them",
        "input",
    )


class ClassifyRoutes:
    def __init__(self, engine: Engine, adapters: AdapterRoutes, latency: Latency) -> None:
        self.engine, self.adapters, self.bank, self.tok = engine, adapters, engine.bank, engine.tokenizer
        self.latency = latency
        config = engine.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        # the pad id the classifier pooled with in training (transformers' rule): its config's, as here
        self.pad_id = getattr(text, "pad_token_id", None)

    async def classify(self, request: Request) -> JSONResponse:
        started = time.monotonic()
        parsed = parse_classify(await P.read_json(request))
        adapter, hold = await self.adapters.resolve(parsed.model)
        model = parsed.model or self.adapters.base_name
        with hold:
            if adapter is None:
                raise P.bad(
                    f"the base model {model!r} has no classifier head: name a classifier's or reward model's "
                    f"adapter (loaded: {self.bank.names()})",
                    "model",
                )
            ((lease, slot),) = self.adapters.leases(adapter, 1)
        with lease:
            head = self.bank.heads.get(slot)
            if head is None:
                does = (
                    "embeds, at /v1/embeddings"
                    if slot in self.bank.poolings
                    else "generates, at /v1/completions"
                )
                raise P.bad(
                    f"the model {model!r} is not a classifier's adapter (task_type SEQ_CLS or TOKEN_CLS, as lorakit "
                    f"train --objective reward, classify, regression or token_classify saves one): it {does}",
                    "model",
                )
            if head.per_token:
                texts = self._texts(parsed)
                rows, offsets = await asyncio.to_thread(self._encode_tagged, texts)
            else:
                rows = await asyncio.to_thread(self._encode, parsed, head)
            if not self.engine.alive:
                raise P.APIError(503, "the engine is not running", "server_error")
            scores = []
            for chunk in chunks(rows, self.pad_id, self.engine.config.max_prefill_tokens):
                future = self.engine.call(lambda chunk=chunk: self._score(slot, head, chunk))
                try:
                    scores.append(await asyncio.wrap_future(future))
                except EngineStopped:
                    raise P.APIError(503, "the engine has stopped", "server_error") from None
        if head.per_token:
            every = [t for chunk in scores for t in chunk]
            data = [
                {"index": i, "num_classes": head.outputs, **_tagged(head, t, r, o, logits)}
                for i, (t, r, o, logits) in enumerate(zip(texts, rows, offsets, every, strict=True))
            ]
            return self._answer(model, data, rows, started)
        logits = torch.cat(scores)
        multi = head.problem == "multi_label_classification"  # each class a yes or no
        probs = torch.sigmoid(logits) if head.outputs == 1 or multi else torch.softmax(logits, -1)
        data = [
            {
                "index": i,
                "label": head.classes[int(row.argmax())],
                "probs": p.tolist(),
                "num_classes": head.outputs,
                "logits": row.tolist(),
                **({"labels": [head.classes[c] for c in range(head.outputs) if row[c] > 0]} if multi else {}),
            }
            for i, (row, p) in enumerate(zip(logits, probs, strict=True))
        ]
        return self._answer(model, data, rows, started)

    def _answer(
        self, model: str, data: list[dict[str, Any]], rows: list[list[int]], started: float
    ) -> JSONResponse:
        tokens = sum(len(r) for r in rows)
        self.latency.observe("classify", "total", time.monotonic() - started)
        body = {
            "id": R.new_id("classify"),
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": {**R.usage(tokens, 0), "prompt_tokens_details": None},
        }
        return JSONResponse(body)

    def _score(self, slot: str, head: Head, rows: list[list[int]]) -> torch.Tensor | list[torch.Tensor]:
        """On the engine thread: the head's outputs for `rows` with adapter `slot` on the backbone (a token
        classifier's: one tensor of each token's tags per row)."""
        with route(self.engine.model, self.bank, [slot] * len(rows)):
            if head.per_token:
                return [t.cpu() for t in token_scores(self.engine.model, head, rows, self.pad_id)]
            return head_scores(self.engine.model, head, rows, self.pad_id).cpu()

    @staticmethod
    def _texts(parsed: Parsed) -> list[str]:
        """A token classifier's inputs: texts only (its answer is in characters of them); 400 otherwise."""
        if parsed.messages is not None:
            raise P.bad("a token classifier tags texts, not conversations: send 'input'", "messages")
        n = len(parsed.inputs or [])
        for i, x in enumerate(parsed.inputs or []):
            if not isinstance(x, str):
                where = f"input[{i}]" if n > 1 else "input"
                raise P.bad(
                    f"{where}: a token classifier tags texts (its entities are spans of characters), not "
                    f"{'token ids' if isinstance(x, list) else 'pairs'}",
                    "input",
                )
        return list(parsed.inputs or [])

    def _encode_tagged(self, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int] | None]]]:
        """Each text's token ids and their character ranges, as training read a token classifier's texts; 400
        naming an overlong text."""
        limit = self.engine.max_model_len
        rows, offsets = [], []
        with self.engine.tokenizer_lock:
            for i, text in enumerate(texts):
                try:
                    ids, where = token_offsets(self.tok, text)
                except DataError as e:
                    raise P.bad(str(e), "model") from None
                name = f"input[{i}]" if len(texts) > 1 else "input"
                if not ids:
                    raise P.bad(f"{name} has no tokens", "input")
                if len(ids) > limit:
                    raise P.bad(
                        f"{name} is {len(ids)} tokens, over the context length {limit} (--max-model-len)",
                        "input",
                    )
                rows.append(ids)
                offsets.append(where)
        return rows, offsets

    def _encode(self, parsed: Parsed, head: Head) -> list[list[int]]:
        """Each input's token ids, as training encoded the classifier's data; 400 naming a bad or overlong one."""
        tok, reward = self.tok, head.outputs == 1 and head.problem != "regression"
        limit, vocab = self.engine.max_model_len, self.engine.vocab_size
        with self.engine.tokenizer_lock:
            if parsed.messages is not None:
                if not reward:
                    raise P.bad(
                        "this classifier was trained on texts, not conversations: send 'input'", "messages"
                    )
                try:
                    ids = encode_example(tok, {"messages": parsed.messages}, max_len=limit + 1).input_ids
                except Exception as e:  # noqa: BLE001 - the chat template rejects these messages (jinja errors)
                    raise P.bad(f"the chat template rejects these messages: {e}", "messages") from None
                rows, names = [ids], ["messages"]
            else:
                rows, names = [], []
                n = len(parsed.inputs or [])
                for i, x in enumerate(parsed.inputs or []):
                    names.append(f"input[{i}]" if n > 1 else "input")
                    if isinstance(x, list):
                        wrong = [t for t in x if not 0 <= t < vocab]
                        if wrong:
                            raise P.bad(
                                f"{names[-1]}: token ids out of range [0, {vocab}): {wrong[:5]}", "input"
                            )
                        rows.append(x)
                    elif isinstance(x, tuple):
                        if reward:
                            raise P.bad(f"{names[-1]}: a reward model scores one text, not a pair", "input")
                        rows.append(tok(*x, add_special_tokens=parsed.add_special_tokens)["input_ids"])
                    elif reward:
                        rows.append(encode_example(tok, {"text": x}, max_len=limit + 1, chat=False).input_ids)
                    else:
                        rows.append(tok(x, add_special_tokens=parsed.add_special_tokens)["input_ids"])
        for ids, where in zip(rows, names, strict=True):
            if not ids:
                raise P.bad(f"{where} has no tokens", where.split("[")[0])
            if len(ids) > limit:
                raise P.bad(
                    f"{where} is {len(ids)} tokens, over the context length {limit} (--max-model-len)",
                    where.split("[")[0],
                )
        return rows


def _tagged(
    head: Head, text: str, ids: list[int], offsets: list[tuple[int, int] | None], logits: torch.Tensor
) -> dict[str, Any]:
    """A token classifier's answer for one text: its entities (transformers' pipeline's grouping: each a span of
    tokens that `decode_tags` reads from the tags, scored by the mean probability of those tokens' tags) and each
    token's tag (null, with its score and characters, for a token that carries none: a special token, or one of
    spaces only, which training did not tag either)."""
    probs = torch.softmax(logits, -1)
    tags = logits.argmax(-1).tolist()
    score = [float(probs[i, t]) for i, t in enumerate(tags)]
    entities = []
    for start, end, kind in decode_tags(tags, offsets, list(head.classes), text):
        inside = [score[i] for i, o in enumerate(offsets) if o is not None and start <= o[0] and o[1] <= end]
        entities.append(
            {
                "entity_group": kind,
                "word": text[start:end],
                "start": start,
                "end": end,
                "score": sum(inside) / max(len(inside), 1),
            }
        )
    tokens = [
        {
            "id": t,
            "start": None if o is None else o[0],
            "end": None if o is None else o[1],
            "label": None if o is None else head.classes[tag],
            "score": None if o is None else s,
        }
        for t, o, tag, s in zip(ids, offsets, tags, score, strict=True)
    ]
    return {"entities": entities, "tokens": tokens}


def chunks(rows: list[list[int]], pad_id: int | None, budget: int) -> list[list[list[int]]]:
    """Consecutive rows, as many per forward as fit a padded-token `budget` (the engine's max_prefill_tokens; at
    least one; one at a time where the model has no pad token to pad them with)."""
    if pad_id is None:
        return [[r] for r in rows]
    out: list[list[list[int]]] = []
    longest = 0
    for r in rows:
        longest_if = max(longest, len(r))
        if out and out[-1] and longest_if * (len(out[-1]) + 1) <= budget:
            out[-1].append(r)
            longest = longest_if
        else:
            out.append([r])
            longest = len(r)
    return out
