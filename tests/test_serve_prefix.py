"""The serve engine's prefix cache: a prompt that starts like a finished request skips computing that start, and
gets the answer it gets without the cache.

The store's rules are checked on small tensors; the engine's use of it on the real default model, against an
engine without the cache (`prefix_cache_bytes=0`) as the reference.
"""

from __future__ import annotations

import queue

import pytest
import torch
from test_serve import _random_adapter

import lorakit
from lorakit.bank import AdapterBank
from lorakit.serve.engine import Engine, EngineConfig
from lorakit.serve.prefixes import MIN_MATCH, SHARE_MIN, PrefixStore, Start, shared_starts
from lorakit.serve.requests import Done, Failed, GenRequest, SamplingParams

# Log-probabilities with and without the cache differ by float32 rounding only: the cached keys and values were
# computed in another batch shape, so sums run in another order (seen: up to 2e-5 nats). An off-by-one position
# or a wrong row's cache moves them by far more than 1e-3.
TOL = 1e-3

SYSTEM = (
    "You are a helpful assistant who answers questions about geography, history and science in detail. " * 6
)


# --------------------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------------------


def _kv(tokens: list[int], layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fake cache whose values tell which token each position holds."""
    t = torch.tensor(tokens, dtype=torch.float32)[None, None, :, None].expand(1, 1, len(tokens), 4)
    return [(t.clone(), -t.clone()) for _ in range(layers)]


def _bytes(tokens: list[int]) -> int:
    return sum(k.numel() * 4 + v.numel() * 4 for k, v in _kv(tokens))


def test_lookup_finds_the_longest_common_start_of_any_entry_under_its_key():
    store = PrefixStore(1 << 20)
    a = list(range(100))
    b = list(range(40)) + [999] * 60  # shares 40 tokens with a
    assert store.add("k", a, _kv(a)) and store.add("k", b, _kv(b))
    hit = store.lookup("k", list(range(60)) + [5, 6])  # a's first 60
    assert hit.length == 60 and hit.entry.tokens.tolist() == a
    assert [k[0, 0, :, 0].tolist() for k, _ in hit.kv()] == [list(map(float, range(60)))] * 2
    hit = store.lookup("k", list(range(40)) + [999] * 10 + [1])
    assert hit.length == 50 and hit.entry.tokens.tolist() == b
    # never the whole prompt: its last token must run to give the next token's logits
    assert store.lookup("k", a).length == 99 and store.lookup("k", a[:50]).length == 49
    assert store.lookup("other key", a) is None  # another adapter's cache never matches
    assert store.lookup("k", [7] + a) is None  # a common start must start at the start
    assert store.lookup("k", a[: MIN_MATCH - 1] + [5000] * 30) is None  # too short to be worth it
    assert store.lookup("k", a[:MIN_MATCH] + [5000] * 30).length == MIN_MATCH


def test_add_keeps_one_entry_per_line_of_a_conversation():
    store = PrefixStore(1 << 20)
    turn1, turn2 = list(range(50)), list(range(80))
    assert store.add("k", turn1, _kv(turn1))
    assert store.add("k", turn2, _kv(turn2))  # extends turn1: turn1 goes
    assert len(store) == 1 and store.nbytes == _bytes(turn2)
    assert not store.add("k", turn1, _kv(turn1))  # already there, as turn2's start
    assert store.add("other", turn1, _kv(turn1))  # under another key it is another cache
    assert len(store) == 2 and store.nbytes == _bytes(turn2) + _bytes(turn1)
    assert not store.add("k", list(range(MIN_MATCH)), _kv(list(range(MIN_MATCH))))  # too short to match
    store.retain({"other"})
    assert len(store) == 1 and store.lookup("k", turn2 + [1]) is None and store.nbytes == _bytes(turn1)


def test_eviction_keeps_the_bytes_under_the_limit_least_recently_used_first():
    size = _bytes(list(range(40)))
    store = PrefixStore(3 * size)
    seqs = [[s * 1000 + i for i in range(40)] for s in range(4)]
    for s in seqs[:3]:
        store.add("k", s, _kv(s))
    assert store.lookup("k", seqs[0] + [1]).length == 40  # seqs[0] used: seqs[1] is now the oldest
    store.add("k", seqs[3], _kv(seqs[3]))
    assert store.nbytes == 3 * size and store.stats["evicted"] == 1
    assert store.lookup("k", seqs[1] + [1]) is None
    assert all(store.lookup("k", seqs[i] + [1]).length == 40 for i in (0, 2, 3))
    assert not store.add("k", list(range(200)), _kv(list(range(200))))  # bigger than the store: not kept
    assert len(store) == 3
    off = PrefixStore(0)
    assert not off.enabled and not off.add("k", seqs[0], _kv(seqs[0])) and off.lookup("k", seqs[0]) is None
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixStore(-1)


def test_shared_starts_are_the_long_common_starts_of_one_prefills_prompts():
    system = list(range(1000, 1000 + 2 * SHARE_MIN))  # a long system prompt
    more = list(range(5000, 5000 + SHARE_MIN))  # a long example that two of the prompts add
    a, b = system + [1, 2], system + [3, 4, 5]
    c, d = system + more + [6], system + more + [7, 8]
    other = list(range(9000, 9000 + 3 * SHARE_MIN))
    got = shared_starts([("k", a, 0), ("k", c, 0), ("k", other, 0), ("k", b, 0), ("k", d, 0)])
    # c and d share system + more; a, b (and c, d) share system, which system + more extends: one start serves all
    assert [(s.key, list(s.tokens)) for s in got] == [("k", system + more)]
    assert got[0].prompt in (1, 4)  # computed as the start of c or d
    # per key: the same prompts under two adapters are two starts
    got = shared_starts([("x", a, 0), ("y", a, 0), ("x", b, 0), ("y", b, 0)])
    assert sorted((s.key, list(s.tokens)) for s in got) == [("x", system), ("y", system)]
    # what the cache holds already does not count: the shared part must go SHARE_MIN beyond it
    assert shared_starts([("k", a, len(system) - SHARE_MIN + 1), ("k", b, 0)]) == []
    got = shared_starts([("k", a, 0), ("k", b, len(system) - SHARE_MIN)])
    assert [list(s.tokens) for s in got] == [system] and got[0].prompt == 1  # b's cached start is the longer
    # never a whole prompt: its last token must run in the prefill
    assert [list(s.tokens) for s in shared_starts([("k", system, 0), ("k", a, 0)])] == [system[:-1]]
    shortest = [("k", system[:SHARE_MIN] + [1], 0), ("k", system[:SHARE_MIN] + [2], 0)]
    assert shared_starts(shortest) == [Start("k", tuple(system[:SHARE_MIN]), 0)]
    assert (
        shared_starts([("k", system[: SHARE_MIN - 1] + [1], 0), ("k", system[: SHARE_MIN - 1] + [2], 0)])
        == []
    )
    assert shared_starts([("k", a, 0)]) == [] and shared_starts([]) == []


# --------------------------------------------------------------------------------------------------------------
# The engine, on the real default model
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(default_model_dir):
    """The default model with a random adapter "a"."""
    model, tok = lorakit.load_model(str(default_model_dir))
    _random_adapter(model, "a", seed=0)
    return model, tok


@pytest.fixture(scope="module")
def bank(model):
    return AdapterBank(model[0])


def _engine(model, bank, cache_bytes: int, **kw) -> Engine:
    m, tok = model
    eng = Engine(m, tok, bank, EngineConfig(max_batch=8, prefix_cache_bytes=cache_bytes, **kw))
    eng.start()
    return eng


@pytest.fixture(scope="module")
def reference(model, bank):
    """An engine without a prefix cache."""
    eng = _engine(model, bank, 0)
    yield eng
    eng.stop()


def _ids(tok, messages) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _submit(eng, ids, adapter, **params) -> queue.Queue:
    events: queue.Queue = queue.Queue()
    sp = SamplingParams(**{"max_tokens": 12, "temperature": 0, "logprobs": 0, **params})
    eng.submit(GenRequest(list(ids), adapter, sp, events.put))
    return events


def _result(events: queue.Queue):
    """(text, each output token's log-probability, prompt log-probabilities, Done)."""
    parts, lps, prompt = [], [], []
    while not isinstance(ev := events.get(timeout=180), (Done, Failed)):
        if hasattr(ev, "text"):
            parts.append(ev.text)
            lps += [e.logprob for e in ev.logprobs]
        else:
            prompt = [e.logprob for e in ev.logprobs if e.logprob is not None]
    assert isinstance(ev, Done), ev
    return "".join(parts), lps, prompt, ev


def _same(got, want) -> None:
    assert got[0] == want[0]
    assert abs(got[3].logprob_sum - want[3].logprob_sum) < TOL
    for mine, theirs in ((got[1], want[1]), (got[2], want[2])):  # output tokens, prompt tokens
        assert len(mine) == len(theirs)
        assert all(abs(a - b) < TOL for a, b in zip(mine, theirs, strict=True))


@pytest.mark.real_model
def test_a_chat_continues_from_its_cache_with_the_answers_it_gets_without(model, bank, reference):
    tok = model[1]
    eng = _engine(model, bank, 1 << 30)
    totals = []
    try:
        for adapter in (None, "a"):
            messages = [{"role": "system", "content": SYSTEM}]
            before, reported = None, 0
            for question in ("What is the capital of France?", "And of Germany?", "Which one is bigger?"):
                messages.append({"role": "user", "content": question})
                ids = _ids(tok, messages)
                got = _result(_submit(eng, ids, adapter))
                _same(got, _result(_submit(reference, ids, adapter)))
                done = got[3]
                reported += done.cached_tokens
                if before is None:  # the first turn: nothing of this adapter's is cached
                    assert done.cached_tokens == 0
                else:  # the whole previous prompt (and its reply) was cached; the new question was not
                    assert len(before) <= done.cached_tokens < len(ids)
                before = ids
                messages.append({"role": "assistant", "content": got[0]})
            totals.append(reported)
        assert eng.stats["cached_prompt_tokens"] == sum(totals) and all(
            totals
        )  # the engine's count is theirs
        assert eng.call(lambda: eng.prefixes.nbytes).result() > 0
    finally:
        eng.stop()


@pytest.mark.real_model
def test_rows_with_different_cached_starts_share_one_prefill(model, bank, reference):
    """In one prefill: two prompts continuing different cached sequences (base and adapter), a prompt that shares
    only the chat template's start with one, a prompt to score (which runs whole), and two equal requests: each
    as it is alone."""
    tok = model[1]
    eng = _engine(model, bank, 1 << 30, wait_ms=300)
    try:
        first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a river."}]
        other = [{"role": "user", "content": "Tell me about the moon. " * 12}]
        x, y = _ids(tok, first), _ids(tok, other)
        for ids, adapter in ((x, None), (y, "a")):
            _result(_submit(eng, ids, adapter, max_tokens=3))  # prime the cache
        more = [{"role": "assistant", "content": "The Nile."}, {"role": "user", "content": "And a mountain?"}]
        x2, y2 = _ids(tok, first + more), _ids(tok, other + more)
        x3 = _ids(tok, [*first, more[0], {"role": "user", "content": "And a lake?"}])
        assert x2[: len(x)] == x and y2[: len(y)] == y and x3[: len(x)] == x
        hello = _ids(tok, [{"role": "user", "content": "Hello there, who are you?"}])
        # y and hello share the chat template's default system prompt, which y cached under adapter a
        common = next(i for i, (p, q) in enumerate(zip(hello, y, strict=False)) if p != q)
        assert common >= MIN_MATCH
        jobs = [
            (x2, None, {}),
            (y2, "a", {}),
            (hello, "a", {}),
            (x3, None, {"prompt_logprobs": 1, "max_tokens": 2}),
            (y2, "a", {}),
        ]
        prefills = eng.stats["prefills"]
        queues = [_submit(eng, ids, adapter, **p) for ids, adapter, p in jobs]
        got = [_result(q) for q in queues]
        assert eng.stats["prefills"] == prefills + 1  # they did join one prefill
        for (ids, adapter, p), g in zip(jobs, got, strict=True):
            _same(g, _result(_submit(reference, ids, adapter, **p)))
        cached = [g[3].cached_tokens for g in got]
        assert cached[0] >= len(x) and cached[1] >= len(y) and cached[4] == cached[1]
        assert cached[2] == common  # only the template's start
        assert cached[3] == 0  # a prompt to score runs whole
        assert len(got[3][2]) == len(x3) - 1  # (the first prompt token has no log-probability)
        assert all(g[1] for g in got)  # every answer has tokens to compare
    finally:
        eng.stop()


@pytest.mark.real_model
def test_an_adapter_loaded_again_never_meets_its_old_cache(model, tmp_path, reference):
    """Unloading an adapter and loading another under its name: the old cache is dropped, not used."""
    m, tok = model
    _random_adapter(m, "b", seed=3)
    lorakit.save_adapter(m, tmp_path / "b3", name="b")
    lorakit.delete_adapter(m, "b")
    _random_adapter(m, "b", seed=4)
    lorakit.save_adapter(m, tmp_path / "b4", name="b")
    lorakit.delete_adapter(m, "b")
    bank = AdapterBank(m)
    bank.load("b", tmp_path / "b3")
    eng = _engine(model, bank, 1 << 30)
    try:
        ids = _ids(tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi!"}])
        _result(_submit(eng, ids, "b", max_tokens=2))
        assert eng.call(lambda: len(eng.prefixes)).result() == 1  # (on the engine thread: after it kept it)
        eng.call(lambda: (bank.unload("b"), bank.load("b", tmp_path / "b4"))).result()
        again = ids + tok(" Hello?", add_special_tokens=False)["input_ids"]
        got = _result(_submit(eng, again, "b"))
        assert got[3].cached_tokens == 0
        alone = _engine(model, AdapterBank(m), 0)  # the model as it is now, b being b4
        try:
            _same(got, _result(_submit(alone, again, "b")))
        finally:
            alone.stop()
        keys = eng.call(lambda: [e.key for e in eng.prefixes._entries.values()]).result()
        assert keys == [("b", bank.serials["b"])]  # the old one went
    finally:
        eng.stop()
        if "b" in bank:
            bank.unload("b")


@pytest.mark.real_model
def test_prompts_of_one_prefill_compute_their_common_start_once(model, bank, reference):
    """Requests behind one long system prompt arriving together (two per adapter): the system prompt is computed
    once per adapter, before their prefill, and each answer is the one it gets alone."""
    tok = model[1]
    eng = _engine(model, bank, 1 << 30, wait_ms=300)
    try:
        questions = ["Name a river.", "Name a mountain in Europe.", "Which ocean is the largest?", "Hi!"]
        prompts = [
            _ids(tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
            for q in questions
        ]
        adapters = [None, None, "a", "a"]

        def common(x, y):
            return next(i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q)

        shared = [common(*prompts[:2])] * 2 + [common(*prompts[2:])] * 2  # base, then a
        assert min(shared) >= SHARE_MIN
        prefills = eng.stats["prefills"]
        queues = [_submit(eng, ids, adapter) for ids, adapter in zip(prompts, adapters, strict=True)]
        got = [_result(q) for q in queues]
        assert eng.stats["prefills"] == prefills + 1 and eng.stats["shared_starts"] == 2  # one per adapter
        for ids, adapter, g in zip(prompts, adapters, got, strict=True):
            _same(g, _result(_submit(reference, ids, adapter)))
        # each found the start computed for its pair
        assert [g[3].cached_tokens for g in got] == shared
    finally:
        eng.stop()


@pytest.mark.real_model
def test_a_prompt_is_shared_while_its_request_runs(model, bank, reference):
    """A request arriving while another with the same system prompt decodes uses that prompt's cache at once."""
    tok = model[1]
    eng = _engine(model, bank, 1 << 30)
    try:
        first = _ids(
            tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell a long story."}]
        )
        later = _ids(
            tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a lake."}]
        )
        common = next(i for i, (p, q) in enumerate(zip(first, later, strict=False)) if p != q)
        running = _submit(eng, first, "a", max_tokens=2000, ignore_eos=True)
        running.get(timeout=180)  # its first token: it has been prefilled, and decodes on
        got = _result(_submit(eng, later, "a"))
        assert got[3].cached_tokens == common
        events = []
        while not running.empty():
            events.append(running.get())
        assert events and not any(isinstance(e, (Done, Failed)) for e in events)  # the first still runs
        _same(got, _result(_submit(reference, later, "a")))
    finally:
        eng.stop()
