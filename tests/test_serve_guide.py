"""JSON mode's automaton (`lorakit.serve.guide.JsonPrefix`) against Python's own JSON parser: every prefix of a
valid object is accepted and the object is complete exactly at its end; whatever it accepts as complete,
`json.loads` reads as an object (random documents, and random corruptions of them); hand-picked invalid input is
refused at the first character that makes it so. The model-facing part is tested on a real server in
test_serve_choices.py."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lorakit.serve.guide import CANDIDATES, MAX_SPACE, Guide, JsonPrefix
from lorakit.serve.schema import compile_schema

DOCS = [
    {},
    {"a": []},
    {"a": [[], {}, [[1]], -0.5e10, 0, 12, 1.25, -7, 3e-2, True, False, None]},
    {"name": 'quote " back \\ slash / é ☃ \n tab\t', "k": {"x": {"y": {"z": "deep"}}}},
    {"": "", "emoji": "🙂", "ctl": "\u0001\u001f"},
]


def _accepts(text: str, *, valid: bool = False) -> JsonPrefix | None:
    """The state after `text` fed character by character, or None if a character is refused. `valid`: the text
    is a whole object, so the state must not be complete before its last character."""
    state = JsonPrefix()
    for i, ch in enumerate(text):
        assert not (valid and state.complete), f"complete before the end, at {i}: {text!r}"
        if not state.feed(ch):
            return None
    return state


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] * 2 if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-(10**6), 10**6)
    if kind == "float":
        return rng.uniform(-1e6, 1e6) * 10 ** rng.randint(-30, 30)
    if kind == "str":
        return "".join(rng.choice('ab "\\/\n\té☃🙂\u0007') for _ in range(rng.randint(0, 8)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f"k{i}": _random_value(rng, depth + 1) for i in range(rng.randint(0, 4))}


def _texts(doc, rng: random.Random) -> list[str]:
    return [
        json.dumps(doc),
        json.dumps(doc, separators=(",", ":")),
        json.dumps(doc, indent=2),  # MAX_SPACE caps a run of whitespace: indent 2 at depth <= 1 fits
        json.dumps(doc, ensure_ascii=False),
    ]


@pytest.mark.parametrize("doc", DOCS)
def test_every_prefix_of_a_valid_object_is_accepted(doc):
    for text in _texts(doc, random.Random(0)):
        if "\n" + " " * (MAX_SPACE + 1) in text:
            continue  # deeper indentation than the whitespace cap allows
        state = _accepts(text, valid=True)
        assert state is not None and state.complete, text


def test_random_documents_and_corruptions_agree_with_json_loads():
    rng = random.Random(1234)
    accepted = refused = 0
    for _ in range(300):
        doc = {f"k{i}": _random_value(rng) for i in range(rng.randint(0, 5))}
        text = json.dumps(doc, ensure_ascii=rng.random() < 0.5)
        state = _accepts(text, valid=True)
        assert state is not None and state.complete, text
        for _ in range(5):  # a random character inserted, replaced or deleted
            i = rng.randrange(len(text) + 1)
            ch = rng.choice('{}[]",:0-.eE1tfn \\ua')
            bad = rng.choice(
                [text[:i] + ch + text[i:], text[:i] + ch + text[i + 1 :], text[:i] + text[i + 1 :]]
            )
            state = _accepts(bad)
            if state is not None and state.complete:
                assert isinstance(json.loads(bad), dict), bad  # sound: what it calls whole, json reads
                accepted += 1
            else:
                refused += 1
    assert accepted and refused  # both kinds occurred: the check above was exercised


@pytest.mark.parametrize(
    "text, bad_at",
    [
        ("[", 0),  # the top-level value must be an object
        ('"a"', 0),
        ("1", 0),
        ("{" + " " * (MAX_SPACE + 1), MAX_SPACE + 1),  # the whitespace cap
        ('{\r\n"a": 1}', 1),  # JSON's carriage return: never generated (it splits lines)
        ('{"a": 1,\r"b": 2}', 8),
        ('{"a": 01', 7),  # no leading zero
        ('{"a": 1.}', 8),  # a fraction needs a digit
        ('{"a": -}', 7),
        ('{"a": 1e}', 8),
        ('{"a": [1,]}', 9),  # no trailing comma
        ('{"a": 1,}', 8),
        ('{"a" 1}', 5),  # the colon
        ("{a: 1}", 1),  # keys are strings
        ('{"a": tru}', 9),
        ('{"a": nul', None),  # a prefix: fine so far
        ('{"a": "x\ny"}', 8),  # control characters in strings must be escaped
        ('{"a": "\\x"}', 8),  # not an escape
        ('{"a": "\\u12G4"}', 11),
        # lone surrogates: valid JSON to Python, not to stricter parsers (pydantic's): never generated
        ('{"a": "\\ude42"}', 10),  # a low half alone
        ('{"a": "\\ud83d"}', 13),  # a high half alone
        ('{"a": "\\ud83d\\u0041"}', 15),  # a high half, then no low half
        ('{"a": 1}}', 8),  # nothing after the object
        ('{"a": 1} ', 8),
        ('{"a": 1]', 7),  # brackets must match
        ("{]", 1),
    ],
)
def test_invalid_input_is_refused_where_it_goes_wrong(text, bad_at):
    state = JsonPrefix()
    for i, ch in enumerate(text):
        if not state.feed(ch):
            assert i == bad_at, (text, i)
            return
    assert bad_at is None, text
    assert not state.complete


def test_a_refused_text_leaves_the_state_as_it_was():
    state = JsonPrefix()
    assert state.feed('{"a": [1') and not state.feed("x]}") and state.feed(", 2]}") and state.complete
    assert json.loads('{"a": [1, 2]}') == {"a": [1, 2]}


def test_sampling_follows_the_valid_part_of_the_distribution_beyond_the_candidates():
    """Sampling draws from the model's distribution restricted to the valid tokens, also where that mass lies
    outside the CANDIDATES most likely: here the 256 most likely tokens are invalid but "{" (5 % of the
    probability), and 20 tokens "[" far down the list hold another 5 %. Exactly: half and half."""
    vocab = 2000
    texts = {0: "{"} | {t: "[" for t in range(1, 21)} | {t: "x" for t in range(21, vocab)}  # "x": never valid
    guide = Guide(compile_schema({"anyOf": [{"type": "object"}, {"type": "array"}]}), lambda t: texts[t])
    probs = torch.empty(vocab)
    probs[0] = 0.05
    probs[1:21] = 0.0025  # each less likely than any candidate
    probs[21:276] = 0.0035  # 255 invalid candidates
    probs[276:] = (1 - 0.05 - 20 * 0.0025 - 255 * 0.0035) / (vocab - 276)
    logits = probs.log()
    assert set(logits.topk(CANDIDATES).indices.tolist()) == {0, *range(21, 276)}
    gen = torch.Generator().manual_seed(0)
    n = 3000
    draws = [guide.pick(logits, 1.0, 1.0, gen, {vocab}) for _ in range(n)]
    assert set(draws) <= set(range(21))  # only valid tokens
    share = draws.count(0) / n
    # a binomial frequency of 3000 draws has a standard deviation of at most 0.0091: 0.04 is over 4 of them
    assert abs(share - 0.5) < 0.04, share
    # with top-p the draw stays among the valid candidates
    assert {guide.pick(logits, 1.0, 0.99, gen, {vocab}) for _ in range(50)} == {0}
