"""`lorakit serve`'s sampling controls and log-probabilities, on the real default model, through the official
`openai` client against a real server (test_serve's fixtures: its own server for this module).

References come from a plain loop in this process: the model's forward over the whole sequence so far (no cache,
no batch), then the penalties as OpenAI (frequency, presence, logit_bias) and Hugging Face
(`RepetitionPenaltyLogitsProcessor`) define them, then argmax. The server decodes with a KV cache in a mixed batch,
so its logits differ from the loop's by float32 rounding: log-probabilities are compared at 2e-4 nats (observed
differences are ~1e-5; a wrong position or a wrong token is off by > 0.1).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import inspect

import pytest
import torch
from test_serve import base, client, dirs, http, ref_model, server, url  # noqa: F401 - fixtures

import lorakit

pytestmark = pytest.mark.real_model

CHAT = [{"role": "user", "content": "List three colours, then list them again."}]
PROMPT = "Once upon a time, there was a little"
LOGPROB_ATOL = 2e-4


def _prompt_ids(tok, messages=None, prompt=None) -> list[int]:
    if messages is not None:  # as the server encodes a chat
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(prompt, add_special_tokens=True)["input_ids"]


_REFERENCES: dict = {}


def _reference(model, tok, ids: list[int], n: int, *, freq=0.0, presence=0.0, repetition=1.0, bias=None):
    """Greedy decoding of the base (`ref_model` holds adapters: they are switched off) with the penalties applied
    to the model's logits, up to `n` tokens or end-of-sequence: (token ids, each one's log-probability under the
    model's own logits, the model's log-softmax at each position). Hugging Face's own KV cache, one sequence, no
    batch. Remembered: several tests ask for the same one."""
    from transformers import RepetitionPenaltyLogitsProcessor

    key = (tuple(ids), n, freq, presence, repetition, tuple(sorted((bias or {}).items())))
    if key in _REFERENCES:
        return _REFERENCES[key]
    eos = {tok.eos_token_id, *([model.generation_config.eos_token_id] if model.generation_config else [])}
    from transformers import DynamicCache

    seq, out, lps, dists = torch.tensor([ids]), [], [], []
    step, cache = seq, DynamicCache()
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad(), lorakit.disabled(model):
        for _ in range(n):
            logits = (
                model(step, use_cache=True, **{kw: cache}).logits[0, -1].float()
            )  # the cache grows in place
            dist = logits.log_softmax(-1)
            adjusted = logits.clone()
            if repetition != 1.0:
                adjusted = RepetitionPenaltyLogitsProcessor(repetition)(seq, adjusted[None])[0]
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
            adjusted -= counts * freq + (counts > 0).float() * presence
            for token, b in (bias or {}).items():
                adjusted[int(token)] += b
            nxt = int(adjusted.argmax())
            if nxt in eos:
                break
            out.append(nxt)
            lps.append(float(dist[nxt]))
            dists.append(dist)
            step = torch.tensor([[nxt]])
            seq = torch.cat([seq, step], dim=1)
    _REFERENCES[key] = out, lps, dists
    return out, lps, dists


def test_chat_logprobs_are_the_models_own(client, base, ref_model):  # noqa: F811
    model, tok = ref_model
    r = client.chat.completions.create(
        model=base, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    ids, lps, dists = _reference(model, tok, _prompt_ids(tok, CHAT), 8)
    assert [c.token for c in content] == [tok.decode([t]) for t in ids], (content, ids)
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c, lp, dist in zip(content, lps, dists, strict=True):
        assert abs(c.logprob - lp) < LOGPROB_ATOL, (c.token, c.logprob, lp)
        assert c.bytes == list(c.token.encode())
        values, top_ids = dist.topk(3)
        assert [t.token for t in c.top_logprobs] == [tok.decode([t]) for t in top_ids.tolist()]
        assert (
            max(abs(t.logprob - v) for t, v in zip(c.top_logprobs, values.tolist(), strict=True))
            < LOGPROB_ATOL
        )
    # without top_logprobs: the chosen tokens only; without logprobs: none
    plain = client.chat.completions.create(
        model=base, messages=CHAT, max_tokens=8, temperature=0, logprobs=True
    )
    assert (
        all(c.top_logprobs == [] for c in plain.choices[0].logprobs.content)
        and plain.choices[0].logprobs.content
    )
    assert client.chat.completions.create(model=base, messages=CHAT, max_tokens=2).choices[0].logprobs is None


def test_completion_logprobs_streamed_and_whole_agree(client, base, ref_model):  # noqa: F811
    model, tok = ref_model
    kw = {"model": base, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logprobs": 2}
    whole = client.completions.create(**kw).choices[0]
    lp = whole.logprobs
    ids, lps, _ = _reference(model, tok, _prompt_ids(tok, prompt=PROMPT), 10)
    assert lp.tokens == [tok.decode([t]) for t in ids] and "".join(lp.tokens) == whole.text
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs, lps, strict=True)) < LOGPROB_ATOL
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, top in zip(lp.tokens, lp.top_logprobs, strict=True):
        assert token in top and len(top) <= 3  # the 2 most likely and the chosen one (greedy: among them)
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
    streamed = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert (
        "".join(c.text for c in chunks) == whole.text and streamed == lp.tokens and offsets == lp.text_offset
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"frequency_penalty": 1.5},
        {"presence_penalty": 2.0},
        {"repetition_penalty": 1.5},
        {"frequency_penalty": 0.7, "presence_penalty": -0.5, "repetition_penalty": 1.2},
    ],
    ids=["frequency", "presence", "repetition", "all"],
)
def test_penalties_match_the_reference_and_change_the_output(client, base, ref_model, kw):  # noqa: F811
    model, tok = ref_model
    n = 24
    ref_kw = {"freq": kw.get("frequency_penalty", 0.0), "presence": kw.get("presence_penalty", 0.0)}
    ids, _, _ = _reference(
        model, tok, _prompt_ids(tok, CHAT), n, **ref_kw, repetition=kw.get("repetition_penalty", 1.0)
    )
    plain, _, _ = _reference(model, tok, _prompt_ids(tok, CHAT), n)
    assert ids != plain, "the penalty changed nothing here: this test cannot tell"
    extra = {"repetition_penalty": kw["repetition_penalty"]} if "repetition_penalty" in kw else None
    openai_kw = {k: v for k, v in kw.items() if k != "repetition_penalty"}
    r = client.chat.completions.create(
        model=base, messages=CHAT, max_tokens=n, temperature=0, extra_body=extra, **openai_kw
    )
    assert r.choices[0].message.content == tok.decode(ids, skip_special_tokens=True)


def test_logit_bias_bans_and_forces_tokens(client, base, ref_model):  # noqa: F811
    model, tok = ref_model
    ids = _prompt_ids(tok, prompt=PROMPT)
    plain, _, dists = _reference(model, tok, ids, 4)
    banned = {str(plain[0]): -100}
    got = client.completions.create(model=base, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias=banned)
    want, _, _ = _reference(model, tok, ids, 4, bias={plain[0]: -100})
    assert want[0] == int(dists[0].topk(2).indices[1]) and plain[0] not in want
    assert got.choices[0].text == tok.decode(want)
    forced = tok(" banana", add_special_tokens=False)["input_ids"][0]
    got = client.completions.create(
        model=base, prompt=PROMPT, max_tokens=3, temperature=0, logit_bias={str(forced): 100}, logprobs=0
    )
    assert got.choices[0].text == tok.decode([forced] * 3)
    # logprobs are the model's own, before the bias: the forced token is not what the model expected
    assert all(lp < -1 for lp in got.choices[0].logprobs.token_logprobs), got.choices[0].logprobs


def test_rows_with_and_without_controls_share_a_batch_unchanged(client, base):  # noqa: F811
    """Penalties, bias and logprobs belong to their row: a plain request decoded beside them answers as alone."""
    alone = client.chat.completions.create(model=base, messages=CHAT, max_tokens=12, temperature=0)
    kws = [
        {},
        {"frequency_penalty": 2.0, "logit_bias": {"30": 5}},
        {"logprobs": True, "top_logprobs": 5},
        {"extra_body": {"repetition_penalty": 2.0}},
    ]
    with cf.ThreadPoolExecutor(len(kws)) as pool:
        futures = [
            pool.submit(
                client.chat.completions.create, model=base, messages=CHAT, max_tokens=12, temperature=0, **kw
            )
            for kw in kws
        ]
        answers = [f.result() for f in futures]
    assert answers[0].choices[0].message.content == alone.choices[0].message.content
    assert (
        answers[2].choices[0].message.content == alone.choices[0].message.content
    )  # logprobs change no token


def test_a_stop_string_ends_the_logprobs_where_it_ends_the_text(client, base):  # noqa: F811
    kw = {"model": base, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 0}
    full = client.completions.create(**kw).choices[0]
    stop = " " + full.text.split()[2]  # a word in the middle of the greedy continuation: a token starts there
    cut = client.completions.create(**kw, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    assert len(cut.text) in full.logprobs.text_offset, (
        "no token starts at the stop string: this test cannot tell"
    )
    # the tokens that start before the stop string, and none from it on
    kept = sum(1 for offset in full.logprobs.text_offset if offset < len(cut.text))
    assert cut.logprobs.tokens == full.logprobs.tokens[:kept] and 0 < kept < len(full.logprobs.tokens)
    assert cut.logprobs.text_offset == full.logprobs.text_offset[:kept]


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty", "in [-2.0, 2.0]"),
        ({"presence_penalty": "1"}, "presence_penalty", "in [-2.0, 2.0]"),
        ({"repetition_penalty": 0}, "repetition_penalty", "in (0, 100]"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "not a token id"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "in [-100, 100]"),
        ({"logit_bias": {"999999999": 1}}, "logit_bias", "out of range"),
        ({"logit_bias": [1]}, "logit_bias", "must be an object"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "in [0, 20]"),
        ({"top_logprobs": 3}, "top_logprobs", "needs 'logprobs': true"),
        ({"logprobs": 2}, "logprobs", "must be a boolean"),
    ],
)
def test_bad_sampling_values_are_one_line_400s(http, base, body, param, message):  # noqa: F811
    r = http.post("/v1/chat/completions", json={"model": base, "messages": CHAT, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"] and "\n" not in err["message"], err


def test_bad_completion_logprobs_are_refused(http, base):  # noqa: F811
    for value, message in [(-1, "in [0, 20]"), (21, "in [0, 20]"), (True, "must be an integer")]:
        r = http.post("/v1/completions", json={"model": base, "prompt": PROMPT, "logprobs": value})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    r = http.post("/v1/completions", json={"model": base, "prompt": PROMPT, "suffix": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter", r.text


@torch.no_grad()
def _scored(model, ids: list[int], adapter: str | None) -> list[float]:
    """Each token's log-probability given the ones before it, from one forward pass over the whole prompt."""
    if adapter is not None:
        lorakit.set_active(model, adapter)
    with lorakit.disabled(model) if adapter is None else contextlib.nullcontext():
        dist = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [float(dist[i - 1, ids[i]]) for i in range(1, len(ids))]


@pytest.mark.parametrize("adapter", [None, "a"])
def test_echo_scores_the_prompt_as_lm_eval_asks(client, base, ref_model, adapter):  # noqa: F811
    """lm-evaluation-harness's local-completions loglikelihood request: token ids, echo, logprobs 1, max_tokens 1
    (and 0, which scores only)."""
    model, tok = ref_model
    ids = _prompt_ids(tok, prompt=PROMPT)
    want = _scored(model, ids, adapter)
    kw = {"model": adapter or base, "echo": True, "logprobs": 1, "temperature": 0}
    for max_tokens in (0, 1):
        got = client.completions.create(prompt=[ids], max_tokens=max_tokens, **kw).choices[0]
        lp = got.logprobs
        assert (
            lp.tokens[: len(ids)] == [tok.decode([t]) for t in ids]
            and len(lp.tokens) == len(ids) + max_tokens
        )
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        diff = max(abs(a - b) for a, b in zip(lp.token_logprobs[1 : len(ids)], want, strict=True))
        assert diff < LOGPROB_ATOL, diff
        for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:], strict=True):
            assert token in top and len(top) <= 2
        assert got.text.startswith(tok.decode(ids)) and (max_tokens or got.text == tok.decode(ids))
    if adapter is not None:  # the adapter's own scores: they differ from the base's
        assert max(abs(a - b) for a, b in zip(want, _scored(model, ids, None), strict=True)) > 1e-3


def test_echo_streamed_and_whole_agree(client, base):  # noqa: F811
    kw = {"model": base, "prompt": PROMPT, "echo": True, "max_tokens": 4, "temperature": 0}
    for logprobs in (None, 2):
        whole = client.completions.create(**kw, logprobs=logprobs).choices[0]
        assert whole.text.startswith(PROMPT) and len(whole.text) > len(PROMPT)
        chunks = [
            c.choices[0] for c in client.completions.create(**kw, logprobs=logprobs, stream=True) if c.choices
        ]
        assert "".join(c.text for c in chunks) == whole.text
        if logprobs:
            assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == whole.logprobs.tokens


def test_max_tokens_zero_needs_echo(http, base):  # noqa: F811
    r = http.post("/v1/completions", json={"model": base, "prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400 and "'max_tokens' must be an integer >= 1" in r.json()["error"]["message"], (
        r.text
    )
