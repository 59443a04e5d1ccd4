"""The bank's names and in-place loads: a name is served by one of the model's adapters (its slot), so names may
hold `/`, `.` or `:`, and `load(replace=True)` puts a new file behind a name while leases taken before keep the
old weights (vLLM's `load_inplace`, which `lorakit serve` exposes).

Tolerance: the bank's paths and a fresh load compute the same float32 products in the same order on the tiny
model, so logits are compared exactly, except through a mixed batch (atol 1e-5, as in test_mixed.py).
"""

from __future__ import annotations

import queue
import threading
from contextlib import ExitStack

import pytest
import torch
from fsdp_worker import char_tokenizer

import lorakit
from lorakit import AdapterError, LadderConfig, LoraConfig, attach_ladder
from lorakit.bank import AdapterBank
from lorakit.serve.engine import Engine, EngineConfig
from lorakit.serve.requests import Delta, Done, GenRequest, SamplingParams
from lorakit.variants.ladder import detach_ladder

from tiny import ids, randomize, tiny_gpt2, tiny_llama

ATOL = 1e-5


@pytest.fixture
def files(tmp_path):
    """Adapter folders v1, v2, v3 (one name's successive versions: other ranks, other weights) and other."""
    out = {}
    for i, name in enumerate(["v1", "v2", "v3", "other"]):
        model = tiny_llama()
        lorakit.inject(model, LoraConfig(r=2 + i, alpha=8, targets=["q_proj", "v_proj", "o_proj"]))
        randomize(model, seed=10 + i, std=0.3)
        out[name] = lorakit.save_adapter(model, tmp_path / name)
    return out


@torch.no_grad()
def alone(folder, x: torch.Tensor) -> torch.Tensor:
    """Logits of a fresh tiny model with only `folder` loaded."""
    model = tiny_llama()
    lorakit.load_adapter(model, folder)
    return model(x).logits


@torch.no_grad()
def test_a_lease_keeps_the_old_weights_and_later_ones_get_the_new(files):
    model = tiny_llama()
    x = ids(batch=2)
    bank = AdapterBank(model)
    bank.load("pol", files["v1"])
    bank.load("other", files["other"])
    with bank.use(["pol", "other"]):  # a block routed before the replace runs as it was routed
        before = model(x).logits
        took = bank.load("pol", files["v2"], replace=True)
        assert took >= 0 and bank.names() == ["pol", "other"]
        assert bank.unloading() == ["pol"]  # v1 is kept for this block
        torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)
    assert bank.unloading() == [] and lorakit.adapter_names(model) == ["other", "pol-2"]
    with bank.hold(["pol"]) as (held,):  # a lease fixes the slot: the engine routes its rows by it
        bank.load("pol", files["v3"], replace=True)
        assert held == "pol-2" and bank.slot("pol") == "pol" and bank.unloading() == ["pol"]
        lorakit.set_active(model, held)
        torch.testing.assert_close(model(x).logits, alone(files["v2"], x), atol=0, rtol=0)
        with bank.use(["pol", "pol"]):  # a lease taken now: v3
            torch.testing.assert_close(model(x).logits, alone(files["v3"], x), atol=0, rtol=0)
    bank.load("pol", files["v2"], replace=True)  # nothing in use: v3 goes at once
    assert bank.unloading() == [] and sorted(lorakit.adapter_names(model)) == ["other", "pol-2"]
    assert bank.slot("pol") == "pol-2"  # "pol" was v3's when v2 was planned
    with bank.use(["pol", "other"]):
        mixed = model(x).logits
    torch.testing.assert_close(mixed[0], alone(files["v2"], x)[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], alone(files["other"], x)[1], atol=ATOL, rtol=0)
    bank.load("pol", files["v3"], replace=True)  # and the name's own slot is free again
    assert bank.slot("pol") == "pol" and sorted(lorakit.adapter_names(model)) == ["other", "pol"]
    bank.activate("pol")
    torch.testing.assert_close(model(x).logits, alone(files["v3"], x), atol=0, rtol=0)
    assert str(bank.paths["pol"]) == str(files["v3"])


@torch.no_grad()
def test_replacing_keeps_the_pin_does_not_evict_and_loads_a_new_name(files):
    model = tiny_llama()
    bank = AdapterBank(model, max_adapters=2)
    bank.load("pol", files["v1"], pin=True)
    bank.load("other", files["other"])
    bank.load("pol", files["v2"], replace=True)  # a full bank: the name's count does not change
    assert bank.names() == ["pol", "other"] and bank.pinned == {"pol"}
    bank.load(
        "new", files["v3"], replace=True
    )  # not loaded: a plain load, which evicts other (pol is pinned)
    assert bank.names() == ["pol", "new"]
    with pytest.raises(
        AdapterError, match=r"adapter 'pol' is already loaded .*unload it first, or replace it"
    ):
        bank.load("pol", files["v3"])


@torch.no_grad()
def test_a_refused_replacement_changes_nothing(files, tmp_path):
    model = tiny_llama()
    x = ids(batch=1)
    bank = AdapterBank(model)
    bank.load("pol", files["v1"])
    bank.activate("pol")
    before = model(x).logits
    wrong = tiny_gpt2()  # another architecture: its modules are not in this model
    lorakit.inject(wrong, LoraConfig(r=2, targets=["c_attn"]))
    bad = lorakit.save_adapter(wrong, tmp_path / "gpt2")
    (tmp_path / "empty").mkdir()
    for folder in (bad, tmp_path / "empty", tmp_path / "missing"):
        with bank.hold(["pol"]), pytest.raises(lorakit.LorakitError) as e:
            bank.load("pol", folder, replace=True)
        assert "\n" not in str(e.value)
        assert bank.names() == ["pol"] and bank.slot("pol") == "pol" and bank.unloading() == []
        assert lorakit.adapter_names(model) == ["pol"] and str(bank.paths["pol"]) == str(files["v1"])
        torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)


@torch.no_grad()
def test_the_bank_counts_what_it_did(files, tmp_path):
    """`bank.stats`, which `lorakit serve`'s /metrics exports: loads and their seconds, refusals, loads in place,
    unloads and evictions."""
    bank = AdapterBank(tiny_llama(), max_adapters=2)
    seconds = [bank.load("a", files["v1"]), bank.load("b", files["other"])]
    seconds.append(bank.load("c", files["v2"]))  # evicts a
    seconds.append(bank.load("b", files["v3"], replace=True))
    with pytest.raises(lorakit.LorakitError, match="not an adapter folder"):
        bank.load("d", tmp_path / "missing")
    bank.pin("b")
    with bank.hold(["c"]), pytest.raises(AdapterError, match="every adapter is pinned or in use"):
        bank.load("d", files["v1"])  # no room: refused
    bank.unload("c")
    assert dict(bank.stats) == {
        "loads": 4,
        "load_seconds": pytest.approx(sum(seconds)),
        "replaced": 1,
        "evictions": 1,
        "refused": 2,
        "unloads": 1,
    }


def test_names_the_model_cannot_take_are_served_by_a_slot(files):
    model = tiny_llama()
    x = ids(batch=3)
    bank = AdapterBank(model)
    bank.load("org/pol", files["v1"])
    bank.load("org_pol", files["v2"])  # the first one's slot: this one gets another
    bank.load("sql-lora:v1.0", files["v3"])
    assert bank.names() == ["org/pol", "org_pol", "sql-lora:v1.0"]
    assert [bank.slot(n) for n in bank.names()] == ["org_pol", "org_pol-2", "sql-lora_v1_0"]
    with bank.use(["org/pol", "org_pol", "sql-lora:v1.0"]):
        mixed = model(x).logits
    for i, v in enumerate(["v1", "v2", "v3"]):
        torch.testing.assert_close(mixed[i], alone(files[v], x)[i], atol=ATOL, rtol=0)
    bank.unload("org/pol")
    assert bank.names() == ["org_pol", "sql-lora:v1.0"]
    assert sorted(lorakit.adapter_names(model)) == ["org_pol-2", "sql-lora_v1_0"]
    with pytest.raises(
        AdapterError, match=r"no adapter 'org/pol' in the bank; loaded: \['org_pol', 'sql-lora:v1.0'\]"
    ):
        bank.slot("org/pol")
    with pytest.raises(AdapterError, match="non-empty string"):
        bank.load("", files["v1"])


@torch.no_grad()
def test_a_name_unloaded_in_flight_loads_again_at_once(files):
    model = tiny_llama()
    x = ids(batch=1)
    bank = AdapterBank(model)
    bank.load("pol", files["v1"])
    with bank.hold(["pol"]) as slots:
        assert slots == ["pol"]
        bank.unload("pol")
        assert bank.names() == [] and bank.unloading() == ["pol"]
        bank.load("pol", files["v2"])  # no "retry later": v1 keeps its slot for the lease
        assert bank.slot("pol") == "pol-2" and sorted(lorakit.adapter_names(model)) == ["pol", "pol-2"]
    assert lorakit.adapter_names(model) == ["pol-2"]
    bank.activate("pol")
    torch.testing.assert_close(model(x).logits, alone(files["v2"], x), atol=0, rtol=0)


def test_a_ladder_is_not_replaced_in_place(tmp_path, files):
    model = tiny_llama()
    attach_ladder(model, LadderConfig(reduction=4, rank=4))
    lad = lorakit.save_ladder(model, tmp_path / "lad")
    detach_ladder(model)
    bank = AdapterBank(model)
    bank.load("side", lad)
    with pytest.raises(
        AdapterError, match="ladder adapter 'side' cannot be replaced in place.*unload it, then load"
    ):
        bank.load("side", lad, replace=True)
    assert bank.names() == ["side"] and bank.ladder == "side"
    bank.load("side", files["v1"], replace=True)  # a LoRA file over the ladder's name: the side network goes
    assert bank.ladder is None and lorakit.adapter_names(model) == [bank.slot("side")]


# --------------------------------------------------------------------------------------------------------------
# The serve engine: a request running when its adapter is replaced finishes on the old weights
# --------------------------------------------------------------------------------------------------------------


def _offline(folder, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of a fresh tiny model with only `folder` loaded (eos 1, pad 0, as the engine's)."""
    model = tiny_llama()
    model.generation_config.eos_token_id = model.config.eos_token_id = 1
    model.generation_config.pad_token_id = model.config.pad_token_id = 0
    lorakit.load_adapter(model, folder)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def _drain(events: queue.Queue) -> tuple[list[int], Done]:
    tokens = []
    while not isinstance(ev := events.get(timeout=120), Done):
        tokens += [e.token for e in getattr(ev, "logprobs", ())]
    return tokens, ev


@pytest.mark.parametrize("cache", [0, 1 << 20], ids=["no-prefix-cache", "prefix-cache"])
def test_the_engine_finishes_running_rows_on_the_old_weights(files, cache):
    prompt = torch.randint(10, 100, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    n = 12
    old, new = _offline(files["v1"], prompt, n), _offline(files["v2"], prompt, n)
    assert old != new, "the two versions must answer differently, or the test proves nothing"
    model = tiny_llama()
    model.config.eos_token_id, model.config.pad_token_id = 1, 0
    bank = AdapterBank(model)
    bank.load("pol", files["v1"])
    eng = Engine(
        model, char_tokenizer(), bank, EngineConfig(max_batch=4, wait_ms=0, prefix_cache_bytes=cache)
    )
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)
    gate, running = threading.Event(), queue.Queue()

    def hold_first_token(
        ev,
    ):  # the engine thread waits here after the first token, until the replace is queued
        running.put(ev)
        if isinstance(ev, Delta) and running.qsize() == 1:
            gate.wait(60)

    eng.start()
    try:
        warm = queue.Queue()  # a finished request on v1: with the prefix cache on, its KV cache is kept
        eng.submit(GenRequest(list(prompt), "pol", params, warm.put))
        assert _drain(warm)[0] == old
        assert eng.call(lambda: eng.prefixes.nbytes > 0).result() == bool(cache)  # v1's prompt is cached
        eng.submit(GenRequest(list(prompt), "pol", params, hold_first_token))
        first = running.get(timeout=120)
        assert isinstance(first, Delta)
        replaced = eng.call(lambda: (bank.load("pol", files["v2"], replace=True), bank.unloading())[1])
        gate.set()
        assert replaced.result(timeout=120) == ["pol"]  # v1 kept: a row runs on it
        later = queue.Queue()
        eng.submit(GenRequest(list(prompt), "pol", params, later.put))
        tokens, done = _drain(later)
        assert tokens == new and done.cached_tokens == 0  # never v1's cache
        assert [*(e.token for e in first.logprobs), *_drain(running)[0]] == old
        assert eng.call(lambda: (bank.unloading(), lorakit.adapter_names(model))).result() == ([], ["pol-2"])
    finally:
        eng.stop()


def test_a_request_holds_the_adapter_it_was_accepted_with(files):
    """The server takes a hold when it accepts a request (`GenRequest.lease`), which the engine's row takes over:
    a load in place between acceptance and admission does not change its weights, and a request cancelled before
    admission lets go of its hold."""
    prompt = torch.randint(10, 100, (20,), generator=torch.Generator().manual_seed(6)).tolist()
    n = 10
    old, new = _offline(files["v1"], prompt, n), _offline(files["v2"], prompt, n)
    assert old != new
    model = tiny_llama()
    model.config.eos_token_id, model.config.pad_token_id = 1, 0
    bank = AdapterBank(model)
    bank.load("pol", files["v1"])
    eng = Engine(model, char_tokenizer(), bank, EngineConfig(max_batch=4, wait_ms=0, prefix_cache_bytes=0))
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)

    def accepted(**kw) -> tuple[GenRequest, queue.Queue]:
        lease = ExitStack()
        (slot,) = lease.enter_context(bank.hold(["pol"]))
        events = queue.Queue()
        return GenRequest(list(prompt), "pol", params, events.put, lease=lease, slot=slot, **kw), events

    before, events = accepted()
    gone, _ = accepted(cancelled=True)
    bank.load("pol", files["v2"], replace=True)  # before the engine saw either
    assert bank.unloading() == ["pol"]
    eng.start()
    try:
        eng.submit(gone)
        eng.submit(before)
        assert _drain(events)[0] == old
        after = queue.Queue()
        eng.submit(GenRequest(list(prompt), "pol", params, after.put))
        assert _drain(after)[0] == new
        assert eng.call(lambda: (bank.unloading(), lorakit.adapter_names(model))).result() == ([], ["pol-2"])
    finally:
        eng.stop()
