"""Chunked prefill (`EngineConfig.prefill_chunk`): while rows decode, a prompt longer than a chunk is computed a
chunk per engine step, between their decode steps, and gets the answer it gets when prefilled whole; while none
decodes, prompts are prefilled whole (in chunks of `max_prefill_tokens` only when longer).

On the real default model, against an engine that prefills whole prompts and keeps no prefix cache. Tests of
chunks keep the engine busy with a row that decodes meanwhile (`_busy`); requests meant to arrive together are
submitted from the engine's thread between two steps (`_together`). Two engines must not run on one model at
once (each routes the model's adapters for its own forwards), so the references are computed first.
"""

from __future__ import annotations

import contextlib
import queue

import pytest
from test_serve_prefix import SYSTEM, _engine, _ids, _result, _same, _submit, bank, model  # noqa: F401

from lorakit.serve.engine import Engine, EngineConfig
from lorakit.serve.requests import Done, Failed, GenRequest, SamplingParams

CHUNK = 64

LONG = [
    {"role": "system", "content": SYSTEM * 3},
    {"role": "user", "content": "Which river flows through Paris, and where does it reach the sea?"},
]


@contextlib.contextmanager
def _busy_engine(model, bank, cache_bytes: int, **kw):  # noqa: F811
    """An engine (`_engine`) with a row decoding all along (without end), so that its prompts run in chunks."""
    eng = _engine(model, bank, cache_bytes, **kw)
    try:
        ids = _ids(model[1], [{"role": "user", "content": "Count from one to a thousand."}])
        events: queue.Queue = queue.Queue()
        params = SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)
        eng.submit(GenRequest(ids, None, params, events.put))
        assert not isinstance(events.get(timeout=120), (Done, Failed))  # its first token: it decodes
        yield eng
    finally:
        eng.stop()


def _together(eng: Engine, *submits: tuple) -> list[queue.Queue]:
    """Submit requests (`_submit`'s positional arguments, then its keywords, each) from the engine's thread between
    two steps, so that one step admits them all."""
    return eng.call(lambda: [_submit(eng, *args, **kw) for args, kw in submits]).result(timeout=120)


@pytest.fixture(scope="module")
def whole(model, bank):  # noqa: F811
    """Whole prompts at once, no prefix cache: the reference."""
    eng = _engine(model, bank, 0, prefill_chunk=0)
    yield eng
    eng.stop()


LONG_CASES = ((None, {}), ("a", {}), ("a", {"temperature": 0.8, "seed": 4}))
SCORED = {"prompt_logprobs": 1, "max_tokens": 2}


@pytest.fixture(scope="module")
def long_wanted(model, whole):  # noqa: F811
    """LONG's ids, and what the whole-prompt engine answers to it in each of LONG_CASES and when scoring it: the
    references of both parametrizations below, computed once."""
    ids = _ids(model[1], LONG)
    want = [_result(_submit(whole, ids, adapter, **params)) for adapter, params in LONG_CASES]
    return ids, want, _result(_submit(whole, ids, "a", **SCORED))


@pytest.mark.real_model
@pytest.mark.parametrize("cache_bytes", [0, 1 << 30])
def test_a_long_prompt_prefilled_in_chunks_answers_as_prefilled_whole(model, bank, long_wanted, cache_bytes):  # noqa: F811
    """Base and adapter, greedy and sampled, with the prefix cache and without: the same answers; the prompt's
    own chunks are not reported as cached; a prompt to score runs whole."""
    ids, want, want_scored = long_wanted
    assert len(ids) > 4 * CHUNK
    with _busy_engine(model, bank, cache_bytes, prefill_chunk=CHUNK) as eng:
        for (adapter, params), w in zip(LONG_CASES, want, strict=True):
            chunks = eng.stats["prefill_chunks"]
            got = _result(_submit(eng, ids, adapter, **params))
            _same(got, w)
            if adapter is None or not cache_bytes:  # nothing of this prompt was cached: it ran in chunks
                assert eng.stats["prefill_chunks"] - chunks == (len(ids) - 1) // CHUNK
                assert got[3].cached_tokens == 0
        chunks = eng.stats["prefill_chunks"]
        _same(_result(_submit(eng, ids, "a", **SCORED)), want_scored)
        assert eng.stats["prefill_chunks"] == chunks


@pytest.mark.real_model
def test_rows_keep_decoding_while_a_long_prompt_is_prefilled(model, bank, whole):  # noqa: F811
    """A row decoding when a long prompt arrives gets a token between each two chunks of it; prefilled whole, the
    long prompt would pause it for its whole prefill."""
    tok = model[1]
    order: queue.Queue = queue.Queue()  # (which, event), in the order the engine emits them
    short = _ids(tok, [{"role": "user", "content": "Count from one to a hundred."}])
    long = _ids(tok, LONG)
    want = _result(_submit(whole, long, "a", max_tokens=2))[0]  # (before: one model, one engine at a time)
    m, _ = model
    eng = Engine(m, tok, bank, EngineConfig(max_batch=8, prefill_chunk=CHUNK, prefix_cache_bytes=0))
    eng.start()
    try:
        params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
        eng.submit(GenRequest(short, None, params, lambda e: order.put(("short", e))))
        assert order.get(timeout=120)[0] == "short"  # it decodes
        sp = SamplingParams(max_tokens=2, temperature=0)
        eng.submit(GenRequest(long, "a", sp, lambda e: order.put(("long", e))))
        between = 0
        while (item := order.get(timeout=120))[0] == "short":
            assert not isinstance(item[1], (Done, Failed)), item  # the short one is still running
            between += 1
        chunks = (len(long) - 1) // CHUNK
        assert eng.stats["prefill_chunks"] == chunks
        assert between >= chunks - 1  # a decode step after (nearly) every chunk
        events = [item[1]]
        while not isinstance(events[-1], (Done, Failed)):
            which, event = order.get(timeout=120)
            if which == "long":
                events.append(event)
        assert isinstance(events[-1], Done)
        text = "".join(e.text for e in events if hasattr(e, "text"))
        assert text == want
    finally:
        eng.stop()


@pytest.mark.real_model
def test_equal_prompts_share_their_chunks(model, bank, whole):  # noqa: F811
    """n requests of one long prompt (and no prefix cache): each chunk is computed once for all of them."""
    tok = model[1]
    ids = _ids(tok, LONG)
    want = [_result(_submit(whole, ids, "a", temperature=0.9, seed=s)) for s in range(3)]
    with _busy_engine(model, bank, 0, prefill_chunk=CHUNK) as eng:
        queues = _together(eng, *[((ids, "a"), {"temperature": 0.9, "seed": s}) for s in range(3)])
        got = [_result(q) for q in queues]
        assert eng.stats["prefill_chunks"] == (len(ids) - 1) // CHUNK
        assert [g[3].cached_tokens for g in got] == [0, 0, 0]  # computed, once, not taken from a cache
        for g, w in zip(got, want, strict=True):
            _same(g, w)


@pytest.mark.real_model
def test_while_nothing_decodes_prompts_are_prefilled_whole(model, bank, whole):  # noqa: F811
    """On an idle engine no answer waits for a long prompt: it runs whole, no chunk; one longer than
    max_prefill_tokens runs in chunks of that many tokens. The answers are those of whole prompts."""
    tok = model[1]
    ids = _ids(tok, LONG)
    want = _result(_submit(whole, ids, "a"))
    eng = _engine(model, bank, 0, prefill_chunk=CHUNK)
    try:
        got = _result(_submit(eng, ids, "a"))
        assert eng.stats["prefill_chunks"] == 0 and eng.stats["prefills"] == 1
        _same(got, want)
    finally:
        eng.stop()
    most = 2 * CHUNK + 10  # more than a chunk, less than the prompt
    eng = _engine(model, bank, 0, prefill_chunk=CHUNK, max_prefill_tokens=most)
    try:
        got = _result(_submit(eng, ids, "a"))
        assert eng.stats["prefill_chunks"] == (len(ids) - 1) // most
        _same(got, want)
    finally:
        eng.stop()


def test_a_negative_chunk_is_refused(model, bank):  # noqa: F811
    with pytest.raises(ValueError, match="prefill_chunk must be at least 0"):
        Engine(model[0], model[1], bank, EngineConfig(prefill_chunk=-1))


@pytest.mark.real_model
def test_small_chunks_and_a_short_prompt_behind_a_long_one(model, bank, whole):  # noqa: F811
    """Chunks smaller than MIN_CHUNK still make progress (one per step); a short prompt waiting behind a long one
    is prefilled once the long one's rest fits, with what is left of that step's chunk."""
    tok = model[1]
    long = _ids(tok, [{"role": "user", "content": SYSTEM}])
    short = _ids(tok, [{"role": "user", "content": "Hi!"}])
    want = [
        _result(_submit(whole, long, None, max_tokens=3)),
        _result(_submit(whole, short, "a", max_tokens=3)),
    ]
    with _busy_engine(model, bank, 0, prefill_chunk=16) as eng:
        queues = _together(eng, ((long, None), {"max_tokens": 3}), ((short, "a"), {"max_tokens": 3}))
        got = [_result(q) for q in queues]
        assert eng.stats["prefill_chunks"] >= (len(long) - 1) // 16
        _same(got[0], want[0])
        _same(got[1], want[1])


@pytest.mark.real_model
def test_a_failing_chunk_fails_its_request_alone(model, bank, whole):  # noqa: F811
    """A long prompt whose first chunk raises (a token id outside the vocabulary: the embedding lookup fails)
    fails alone, with its copies (n > 1); a request beside it is untouched and the engine goes on."""
    tok = model[1]
    long = _ids(tok, LONG)
    bad = long[:10] + [model[0].get_input_embeddings().weight.shape[0] + 5] + long[11:]
    short = _ids(tok, [{"role": "user", "content": "Hi!"}])
    want = [_result(_submit(whole, short, "a")), _result(_submit(whole, long, "a"))]
    with _busy_engine(model, bank, 1 << 30, prefill_chunk=CHUNK) as eng:
        queues = _together(eng, ((bad, "a"), {}), ((bad, "a"), {}), ((short, "a"), {}))
        for q in queues[:2]:
            while not isinstance(event := q.get(timeout=120), (Done, Failed)):
                pass
            assert isinstance(event, Failed) and event.status == 500 and "generation failed" in event.message
        _same(_result(queues[2]), want[0])
        assert eng.stats["prefill_chunks"] == 0 and eng.stats["errors"] == 1  # one failure, of both copies
        _same(_result(_submit(eng, long, "a")), want[1])  # and it goes on
