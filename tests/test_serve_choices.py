"""Several choices per request on `lorakit serve`: `n` (chat and completions) and `best_of` (completions), on the
real default model, through the official `openai` client against a real server (test_serve's fixtures: its own
server for this module); and the engine's shared prefill, in this process.

The reference for choice i is the same request with n=1 and seed + i (vLLM's rule). A choice decodes in a batch
with the others, a single request alone: their logits differ by float32 rounding (~1e-6), which could flip a
sampled token only if a uniform draw fell within ~1e-6 of a boundary between two tokens: over the few dozen draws
here, that is a chance of about 1e-4.
"""

from __future__ import annotations

import queue

import pytest
import torch
from test_serve import _drain, _random_adapter, base, client, dirs, http, server, url  # noqa: F401 - fixtures

import lorakit
from lorakit.bank import AdapterBank
from lorakit.serve.engine import Engine, EngineConfig
from lorakit.serve.requests import Delta, Done, GenRequest, Prompt, SamplingParams
from lorakit.serve.scoring import SCORE_CHUNK

pytestmark = pytest.mark.real_model

PROMPT = "Once upon a time, there was a little"
CHAT = [{"role": "user", "content": "Tell me a short story about a cat."}]
SEED = 1234
TOKENS = 12


def test_choices_are_the_single_requests_with_seed_plus_i(client):  # noqa: F811
    kw = {"model": "a", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 1.0}
    many = client.completions.create(n=3, seed=SEED, **kw)
    singles = [client.completions.create(seed=SEED + i, **kw) for i in range(3)]
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == [s.choices[0].text for s in singles]
    assert len({c.text for c in many.choices}) == 3, "three seeds drew the same text: this test cannot tell"
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert many.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    # chat, the same rule
    ckw = {"model": "b", "messages": CHAT, "max_tokens": TOKENS, "temperature": 1.0}
    chat = client.chat.completions.create(n=2, seed=SEED, **ckw)
    alone = [client.chat.completions.create(seed=SEED + i, **ckw).choices[0] for i in range(2)]
    assert [c.message.content for c in chat.choices] == [c.message.content for c in alone]
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content
    assert chat.choices[0].message.content != chat.choices[1].message.content


def test_greedy_choices_are_all_the_greedy_answer(client, base):  # noqa: F811
    kw = {"model": base, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
    one = client.completions.create(**kw).choices[0]
    many = client.completions.create(n=4, logprobs=1, **kw).choices
    assert all(c.text == one.text and c.finish_reason == one.finish_reason for c in many)
    assert all(c.logprobs.token_logprobs == many[0].logprobs.token_logprobs for c in many)


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_choices_equal_the_whole_ones(client, chat):  # noqa: F811
    if chat:
        kw = {"model": "a", "messages": CHAT, "max_tokens": TOKENS, "temperature": 1.0, "seed": SEED, "n": 3}
        whole = client.chat.completions.create(**kw)
        chunks = list(
            client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        )
        texts = [c.message.content for c in whole.choices]
    else:
        kw = {"model": "a", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 1.0, "seed": SEED, "n": 3}
        kw["logprobs"] = 1
        whole = client.completions.create(**kw)
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        texts = [c.text for c in whole.choices]
    got, finishes, offsets = ["", "", ""], [None] * 3, [[], [], []]
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        got[choice.index] += (choice.delta.content or "") if chat else choice.text
        if not chat and choice.logprobs:
            offsets[choice.index] += choice.logprobs.text_offset
        if choice.finish_reason:
            assert finishes[choice.index] is None, "two finish chunks for one choice"
            finishes[choice.index] = choice.finish_reason
    assert got == texts and finishes == [c.finish_reason for c in whole.choices]
    if not chat:  # each choice's offsets count within its own text
        assert offsets == [c.logprobs.text_offset for c in whole.choices]
    last = chunks[-1]  # the usage chunk comes after every choice has finished
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens


def test_best_of_returns_the_choices_most_likely_per_token(client):  # noqa: F811
    """ignore_eos: every candidate has TOKENS tokens, all of them returned, so the rule can be checked from the
    returned log-probabilities alone (with an end-of-sequence token, its log-probability counts too)."""
    kw = {
        "model": "a",
        "prompt": PROMPT,
        "max_tokens": TOKENS,
        "temperature": 1.0,
        "extra_body": {"ignore_eos": True},
    }
    every = client.completions.create(n=5, seed=SEED, logprobs=0, **kw)
    score = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every.choices]
    order = sorted(range(5), key=lambda i: -score[i])
    assert order[:2] != [0, 1], "the first two seeds are the best: this test cannot tell best_of from n"
    best = client.completions.create(n=2, best_of=5, seed=SEED, **kw)
    assert [c.text for c in best.choices] == [every.choices[i].text for i in order[:2]]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None  # not asked for
    assert best.usage.completion_tokens == 5 * TOKENS  # every candidate was generated
    with_lps = client.completions.create(n=1, best_of=5, seed=SEED, logprobs=2, **kw).choices[0]
    assert with_lps.text == every.choices[order[0]].text
    assert with_lps.logprobs.token_logprobs == pytest.approx(every.choices[order[0]].logprobs.token_logprobs)


PROMPTS = [PROMPT, "The capital of France is", "1, 2, 3, 4,"]


def test_a_batch_of_prompts_answers_each_as_alone(client, base):  # noqa: F811
    """OpenAI's order: the n choices of prompt 0, then prompt 1's, ...; each as the prompt alone would get them."""
    kw = {"model": "a", "max_tokens": TOKENS, "temperature": 1.0, "seed": SEED}
    batch = client.completions.create(prompt=PROMPTS, n=2, **kw)
    alone = [client.completions.create(prompt=p, n=2, **kw) for p in PROMPTS]
    assert [c.index for c in batch.choices] == list(range(6))
    assert [c.text for c in batch.choices] == [c.text for r in alone for c in r.choices]
    assert batch.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in alone)
    assert batch.usage.completion_tokens == sum(r.usage.completion_tokens for r in alone)
    # streamed, the same choices by index; with echo, each choice starts with its own prompt
    chunks = [c.choices[0] for c in client.completions.create(prompt=PROMPTS, n=2, stream=True, **kw)]
    assert ["".join(c.text for c in chunks if c.index == i) for i in range(6)] == [
        c.text for c in batch.choices
    ]
    # best_of picks within each prompt's candidates
    best = client.completions.create(prompt=PROMPTS, n=1, best_of=3, **kw)
    assert [c.text for c in best.choices] == [
        client.completions.create(prompt=p, n=1, best_of=3, **kw).choices[0].text for p in PROMPTS
    ]
    echoed = client.completions.create(prompt=PROMPTS, echo=True, max_tokens=2, temperature=0, model=base)
    assert [c.text[: len(p)] for c, p in zip(echoed.choices, PROMPTS, strict=True)] == PROMPTS


def test_a_batch_of_token_id_prompts(client, base):  # noqa: F811
    tok_ids = [[1, 2, 3], [504, 3458, 282]]
    whole = client.completions.create(prompt=tok_ids, model=base, max_tokens=4, temperature=0)
    alone = [client.completions.create(prompt=[t], model=base, max_tokens=4, temperature=0) for t in tok_ids]
    assert [c.text for c in whole.choices] == [r.choices[0].text for r in alone]
    assert whole.usage.prompt_tokens == 6


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([PROMPT, [1, 2]], "non-empty list of strings or of token-id lists"),
        ([], "non-empty list"),
        ([[1, 2], []], "non-empty list"),
        ([PROMPT, ""], "prompt[1] is empty"),
        ([PROMPT, "hello " * 9000], "prompt[1]: this model's maximum context length"),
        ([[1, 2], [3, 10**9]], "prompt[1]: token ids out of range"),
        (["x"] * 9, "9 prompts x 128 choices is 1152 sequences, over 1024"),
    ],
)
def test_bad_prompt_batches_are_one_line_400s(http, base, prompt, message):  # noqa: F811
    body = {"model": base, "prompt": prompt, "max_tokens": 2}
    if len(prompt) == 9:
        body["n"] = 128
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and "\n" not in err["message"], err
    assert http.get("/health").json()["running"] == 0  # nothing of a refused batch was started


@pytest.mark.parametrize(
    "path, body, param, message",
    [
        ("/v1/completions", {"n": 0}, "n", "in [1, 128]"),
        ("/v1/completions", {"n": 129}, "n", "in [1, 128]"),
        ("/v1/chat/completions", {"n": "2"}, "n", "in [1, 128]"),
        ("/v1/completions", {"n": 3, "best_of": 2}, "best_of", "at least 'n' (3)"),
        ("/v1/completions", {"best_of": 2, "stream": True}, "best_of", "cannot stream"),
        ("/v1/completions", {"best_of": 200}, "best_of", "in [1, 128]"),
    ],
)
def test_bad_choice_counts_are_one_line_400s(http, base, path, body, param, message):  # noqa: F811
    prompt = {"messages": CHAT} if "chat" in path else {"prompt": PROMPT}
    r = http.post(path, json={"model": base, "max_tokens": 2, **prompt, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"] and "\n" not in err["message"], err


def test_choice_seeds_wrap_around_64_bits(client, base):  # noqa: F811
    """The last seed's second choice draws from seed 0 (torch takes seeds modulo 2**64)."""
    kw = {"model": base, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 1.0}
    top = client.completions.create(n=2, seed=2**64 - 1, **kw).choices
    assert top[1].text == client.completions.create(seed=0, **kw).choices[0].text
    assert top[0].text == client.completions.create(seed=-1, **kw).choices[0].text  # -1 is 2**64 - 1 to torch


# --------------------------------------------------------------------------------------------------------------
# The engine: equal prompts are prefilled once
# --------------------------------------------------------------------------------------------------------------


def _collect(events: queue.Queue) -> tuple[list, Done]:
    got = []
    while not isinstance(ev := events.get(timeout=120), Done):
        assert isinstance(ev, (Prompt, Delta)), ev
        got.append(ev)
    return got, ev


def test_equal_prompts_share_one_prefill(default_model_dir):
    """Five requests, three of them with one prompt and adapter, queued before the engine starts (so they share a
    prefill): the forward runs over three rows, within a token budget for three, and every request gets what it
    gets alone, prompt scores included."""
    model, tok = lorakit.load_model(str(default_model_dir))
    _random_adapter(model, "a", seed=0)
    ids = tok(PROMPT)["input_ids"]
    other = tok("The capital of France is")["input_ids"]
    plans = [(ids, "a", 2), (ids, "a", None), (other, "a", None), (ids, "a", 1), (ids, None, None)]

    def run(plans, start_first: bool) -> list:
        # room for three distinct prompts only: the five rows fit in one prefill because equal ones count once
        budget = 3 * max(len(ids), len(other))
        eng = Engine(
            model, tok, AdapterBank(model), EngineConfig(max_batch=8, wait_ms=0, max_prefill_tokens=budget)
        )
        if start_first:
            eng.start()
        queues = []
        for prompt, adapter, scored in plans:
            q: queue.Queue = queue.Queue()
            p = SamplingParams(max_tokens=6, temperature=0, logprobs=scored, prompt_logprobs=scored)
            eng.submit(GenRequest(list(prompt), adapter, p, q.put))
            queues.append(q)
            if start_first:  # one at a time: no sharing
                queues[-1] = _collect(q)
        if not start_first:
            eng.start()
            queues = [_collect(q) for q in queues]
        stats = dict(eng.stats)
        eng.stop()
        return queues, stats

    together, stats = run(plans, start_first=False)
    alone, alone_stats = run(plans, start_first=True)
    # three rows of (ids, "a") computed once; the base row has the same prompt but not the same adapter
    assert stats["prefills"] == 1 and stats["shared_prefills"] == 2 and alone_stats["shared_prefills"] == 0
    for (events, done), (ref_events, ref_done) in zip(together, alone, strict=True):
        assert done.completion_tokens == ref_done.completion_tokens
        assert "".join(e.text for e in events if isinstance(e, Delta)) == "".join(
            e.text for e in ref_events if isinstance(e, Delta)
        )
        scores = [lp for e in events for lp in e.logprobs]
        ref = [lp for e in ref_events for lp in e.logprobs]
        assert [s.token for s in scores] == [s.token for s in ref]
        # batched vs alone: float32 rounding only (a wrong position is off by > 0.1)
        for s, r in zip(scores, ref, strict=True):
            assert (s.logprob is None) == (r.logprob is None)
            assert s.logprob is None or abs(s.logprob - r.logprob) < 2e-4
    assert torch.equal(torch.tensor(ids), torch.tensor(plans[0][0]))  # the prompts were not touched


def test_long_prompts_are_scored_a_chunk_at_a_time(default_model_dir):
    """Prompt scoring with a plain LM head runs from the last hidden states, SCORE_CHUNK positions at a time;
    with another head (adapted, softcapped) from the whole batch's logits. Both paths, on a 600-token prompt (three
    chunks) prefilled beside a short one (so the long row has no padding and the short one much), give the same
    scores within float32 rounding (1e-4 nats; a position off by one is off by > 0.1)."""
    model, tok = lorakit.load_model(str(default_model_dir))
    _random_adapter(model, "a", seed=0)
    long_ids = tok(" ".join(["The cat sat on the mat, and then it slept."] * 80))["input_ids"][:600]
    plans = [(long_ids, "a", 2), (tok(PROMPT)["input_ids"], None, 0)]
    assert len(long_ids) == 600 > 2 * SCORE_CHUNK

    def scores(plain: bool) -> list[list]:
        # (whole prompts: with a prefill chunk, a prompt to score longer than it runs alone)
        eng = Engine(model, tok, AdapterBank(model), EngineConfig(max_batch=4, wait_ms=0, prefill_chunk=0))
        assert eng.runner.head is not None  # the default model's head is plain
        if not plain:
            eng.runner.head = None  # the engine's other path, as for a head that is not plain
        queues = []
        for prompt, adapter, top in plans:
            q: queue.Queue = queue.Queue()
            p = SamplingParams(max_tokens=0, prompt_logprobs=top)
            eng.submit(GenRequest(list(prompt), adapter, p, q.put))
            queues.append(q)
        eng.start()
        got = [[lp for e in _collect(q)[0] for lp in e.logprobs] for q in queues]
        assert eng.stats["prefills"] == 1  # together, in one batch
        eng.stop()
        return got

    chunked, whole = scores(plain=True), scores(plain=False)
    for a, b, (prompt, _, top) in zip(chunked, whole, plans, strict=True):
        assert [e.token for e in a] == [e.token for e in b] == prompt
        assert a[0].logprob is None and b[0].logprob is None
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a[1:], b[1:], strict=True)) < 1e-4
        for x, y in zip(a[1:], b[1:], strict=True):
            assert len(x.top) == len(y.top) == top
            assert max((abs(u[1] - v[1]) for u, v in zip(x.top, y.top, strict=True)), default=0.0) < 1e-4
