"""`lorakit serve` under attack: one request must never hurt another, and bad input gets a one-line 400.

Against real code: `sample` on hand-made logits; the engine in this process on the real default model (requests
that fail while being admitted, prefilled or decoded, next to requests that must not notice); and the private
copy of an adapter folder while a symlink flips. The real server over HTTP: test_serve_http_faults.py.
"""

from __future__ import annotations

import os
import queue
import threading
import time

import pytest
import torch
from test_serve import PROMPT, _drain, _random_adapter

import lorakit
from lorakit.bank import AdapterBank
from lorakit.generate import generate
from lorakit.serve.confine import PathRefused, private_copy
from lorakit.serve.engine import Engine, EngineConfig, EngineStopped
from lorakit.serve.requests import Done, Failed, GenRequest, SamplingParams, sample

pytestmark = pytest.mark.real_model

TOKENS = 8
FILES = ("adapter_config.json", "adapter_model.safetensors")


# --------------------------------------------------------------------------------------------------------------
# Sampling: numerically safe for any temperature the API accepts
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 5e-324, 1e-7, 9.9e-6])
def test_tiny_temperature_is_argmax(temperature):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 10
    g = torch.Generator().manual_seed(1)
    assert sample(logits, temperature, 1.0, g) == int(logits.argmax())
    assert sample(logits.half(), temperature, 0.5, g) == int(logits.half().argmax())


def test_sampling_edge_cases():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    assert sample(logits, 1.0, 1e-300, g) == int(logits.argmax())  # top_p under float32's smallest: top token
    hot = logits.clone()
    hot[7] = float("inf")
    assert sample(hot, 0.7, 1.0, g) == 7  # +inf is the sure token, not a NaN softmax
    cold = logits.clone()
    cold[:999] = float("-inf")
    assert sample(cold, 1.0, 0.9, g) == 999
    counts = torch.bincount(torch.tensor([sample(logits[:4], 2.0, 1.0, g) for _ in range(400)]), minlength=4)
    assert (counts > 0).all()  # real sampling still samples
    for bad in (torch.full((10,), float("nan")), torch.full((10,), float("-inf"))):
        with pytest.raises(ValueError, match="logits"):
            sample(bad, 1.0, 1.0, g)


# --------------------------------------------------------------------------------------------------------------
# The engine in this process: a request that fails takes no other with it
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_a(tmp_path_factory, default_model_dir):
    """The default model with adapter a (random), and a's greedy offline continuation of PROMPT."""
    model, tok = lorakit.load_model(str(default_model_dir))
    _random_adapter(model, "a", seed=0)
    lorakit.set_active(model, "a")
    want = generate(model, tok, PROMPT, max_new_tokens=TOKENS, chat=False)
    return model, tok, want


@pytest.fixture
def engine(model_a):
    model, tok, _ = model_a
    eng = Engine(model, tok, AdapterBank(model), EngineConfig(max_batch=4, wait_ms=200))
    eng.start()
    yield eng
    eng.stop()


def _request(engine, *, ids=None, **params) -> tuple[GenRequest, queue.Queue]:
    events: queue.Queue = queue.Queue()
    ids = ids if ids is not None else engine.tokenizer(PROMPT)["input_ids"]
    sp = SamplingParams(**{"max_tokens": TOKENS, "temperature": 0, **params})
    return GenRequest(ids, "a", sp, events.put), events


def _good_and_bad(engine, want: str, bad: GenRequest, bad_events: queue.Queue, match: str) -> None:
    """Submitted together (one prefill: wait_ms is 200): the good request is untouched, the bad fails alone."""
    good, good_events = _request(engine)
    engine.submit(good)
    engine.submit(bad)
    text, done = _drain(good_events)
    assert isinstance(done, Done) and text.strip() == want
    _, failed = _drain(bad_events)
    assert isinstance(failed, Failed) and failed.status == 500 and match in failed.message, failed
    assert engine.alive
    text, done = _drain(_submit_one(engine))
    assert isinstance(done, Done) and text.strip() == want  # and it keeps serving


def _submit_one(engine) -> queue.Queue:
    req, events = _request(engine)
    engine.submit(req)
    return events


def test_engine_failing_admission_fails_alone(engine, model_a):
    bad, events = _request(engine, seed=2**70, temperature=1.0)  # torch refuses it in manual_seed
    _good_and_bad(engine, model_a[2], bad, events, "Overflow")


def test_engine_failing_prefill_fails_alone(engine, model_a):
    bad, events = _request(engine, ids=[engine.vocab_size + 5])  # the embedding lookup raises
    _good_and_bad(engine, model_a[2], bad, events, "generation failed")


def test_engine_failing_row_fails_alone(engine, model_a):
    bad, events = _request(engine, stop=(5,))  # type: ignore[arg-type]  # str.find(5) raises in that row only
    _good_and_bad(engine, model_a[2], bad, events, "TypeError")


def test_engine_row_done_in_its_prefill_takes_no_decode_step(engine):
    """max_tokens=1 ends in the prefill: the row leaves before the next decode and emits nothing after Done."""
    req, events = _request(engine, max_tokens=1)
    engine.submit(req)
    _, done = _drain(events)
    assert isinstance(done, Done) and done.completion_tokens == 1
    time.sleep(0.5)  # the engine would decode the finished row right after the prefill
    assert events.empty() and engine.stats["steps"] == 0 and engine.load()["running"] == 0


def test_engine_stopped_fails_work_instead_of_hanging(model_a):
    model, tok, _ = model_a
    eng = Engine(model, tok, AdapterBank(model), EngineConfig(wait_ms=0))
    eng.start()
    eng.stop()
    with pytest.raises(EngineStopped):
        eng.call(lambda: 1).result(timeout=5)
    req, events = _request(eng)
    eng.submit(req)
    failed = events.get(timeout=5)
    assert isinstance(failed, Failed) and failed.status == 503


# --------------------------------------------------------------------------------------------------------------
# Root confinement: what is read is what was checked
# --------------------------------------------------------------------------------------------------------------


def test_private_copy_never_reads_outside_while_a_link_flips(tmp_path):
    """A thread swaps root/x/adapter_config.json (atomically) between a link inside the root and one out of it:
    every copy is either the inside file or refused, never the outside one (checked on the open descriptor)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "x").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("SECRET")
    (root / "inside").write_text("inside")
    target, spare = root / "x" / FILES[0], root / "x" / "spare"
    target.symlink_to(root / "inside")
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            for src in (outside / "secret", root / "inside"):
                spare.unlink(missing_ok=True)
                spare.symlink_to(src)
                os.replace(spare, target)

    flipper = threading.Thread(target=flip)
    flipper.start()
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline and not (seen.get("inside") and seen.get("refused", 0) > 10):
            try:
                with private_copy(root, "x") as (real, copy):
                    assert real == (root / "x").resolve()
                    got = (copy / FILES[0]).read_text()
            except PathRefused:
                got = "refused"
            seen[got] = seen.get(got, 0) + 1
    finally:
        stop.set()
        flipper.join()
    assert set(seen) == {"inside", "refused"}, seen
    with private_copy(root, "x") as (_, copy):
        kept = copy
    assert not kept.exists()  # the private copy goes at the end
