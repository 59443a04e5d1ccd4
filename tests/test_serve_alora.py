"""Serving aLoRA adapters (`lorakit serve`, the engine): rows of an aLoRA adapter, a plain adapter and the base in
one running batch, joining between decode steps and prefilled in chunks, each equal to offline greedy generation;
and an aLoRA request that starts with a conversation the base model already answered takes the base model's
cache of it, up to its invocation (the prefix cache), with the answer it gets without that cache.

The engine gives the rows' tokens to the aLoRA hook (`row_sequences`), since its batches join and split rows.
"""

from __future__ import annotations

import queue
import time

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.bank import AdapterBank
from lorakit.generate import format_prompt
from lorakit.serve.engine import Engine, EngineConfig
from lorakit.serve.requests import Done, Failed, GenRequest, SamplingParams

from tiny import randomize, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

INV = [5, 6, 7]


def _model():
    model = tiny_llama()
    model.generation_config.eos_token_id = model.config.eos_token_id = 1
    model.generation_config.pad_token_id = model.config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """root/al (aLoRA, invoked by INV) and root/a (plain LoRA), random and large enough to change greedy tokens."""
    root = tmp_path_factory.mktemp("serve_alora")
    for name, invocation, seed in (("al", INV, 1), ("a", None, 2)):
        model = _model()
        lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear", alora_invocation_tokens=invocation), name)
        randomize(model, std=0.3, seed=seed)
        lorakit.save_adapter(model, root / name, name)
    return root


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n, at in ((20, 12), (9, 6), (30, 3), (24, None)):
        ids = torch.randint(10, 100, (n,), generator=g).tolist()
        if at is not None:
            ids[at : at + 3] = INV
        out.append(ids)
    return out


def _offline(folders, name: str | None, prompt: list[int], tokens: int) -> list[int]:
    model = _model()
    if name is not None:
        lorakit.load_adapter(model, folders / name, name)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
    return out[0, len(prompt) :].tolist()


def _submit(eng: Engine, prompt: list[int], adapter: str | None, tokens: int) -> queue.Queue:
    events: queue.Queue = queue.Queue()
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, logprobs=0)
    eng.submit(GenRequest(list(prompt), adapter, params, events.put))
    return events


def _ids(eng: Engine, events: queue.Queue) -> list[int]:
    out = []
    while not isinstance(ev := events.get(timeout=120), (Done, Failed)):
        out += [e.token for e in getattr(ev, "logprobs", ())]
    assert isinstance(ev, Done), ev
    return out


def _engine(folders, **config) -> Engine:
    model = _model()
    bank = AdapterBank(model)
    bank.load("al", folders / "al")
    bank.load("a", folders / "a")
    eng = Engine(model, _tokenizer(), bank, EngineConfig(max_batch=8, wait_ms=0, **config))
    eng.start()
    return eng


def _tokenizer():
    from fsdp_worker import char_tokenizer

    return char_tokenizer()


@pytest.mark.parametrize("chunk", [0, 8], ids=["whole-prompts", "chunks-of-8"])
def test_mixed_batches_equal_offline_generation(folders, chunk):
    """aLoRA, LoRA and base rows together (the aLoRA rows with the invocation early, late, and not at all), some
    joining while others decode: each row's tokens are offline greedy generation's with its adapter."""
    tokens = 24
    prompts = _prompts()
    jobs = [("al", p) for p in prompts] + [("a", prompts[0]), (None, prompts[1])]
    want = [_offline(folders, name, p, tokens) for name, p in jobs]
    assert want[3] == _offline(folders, None, prompts[3], tokens)  # no invocation: the base model's tokens
    assert want[0] != _offline(folders, None, prompts[0], tokens)  # the adapter does change the tokens
    eng = _engine(folders, prefill_chunk=chunk, prefix_cache_bytes=0)
    try:
        first = [_submit(eng, p, name, tokens) for name, p in jobs[:3]]
        deadline = time.monotonic() + 60
        while eng.stats["steps"] < 2 and time.monotonic() < deadline:  # the first rows are decoding
            time.sleep(0.001)
        later = [_submit(eng, p, name, tokens) for name, p in jobs[3:]]
        got = [_ids(eng, q) for q in first + later]
    finally:
        eng.stop()
    assert got == want
    assert eng.stats["prefills"] >= 2  # rows did join a running batch


def test_an_alora_request_takes_the_base_models_cache_of_the_conversation(folders):
    """The base model answers a long prompt; an aLoRA request on that prompt, the answer and its invocation finds
    the base's cache of all of it before the invocation (cached_prompt_tokens), and answers as without the
    cache. A plain adapter's request on the same text takes none of the base's cache."""
    g = torch.Generator().manual_seed(3)
    talk = torch.randint(10, 100, (40,), generator=g).tolist()
    eng = _engine(folders, prefix_cache_bytes=1 << 24)
    try:
        answer = _ids(eng, _submit(eng, talk, None, 8))
        follow = talk + answer[:-1] + INV + [42]
        before = eng.stats["cached_prompt_tokens"]
        got = _ids(eng, _submit(eng, follow, "al", 6))
        reused = eng.stats["cached_prompt_tokens"] - before
        plain = eng.stats["cached_prompt_tokens"]
        _ids(eng, _submit(eng, follow, "a", 2))
        assert eng.stats["cached_prompt_tokens"] == plain
    finally:
        eng.stop()
    assert reused == len(talk) + len(answer) - 1  # every token before the invocation
    assert got == _offline(folders, "al", follow, 6)


@pytest.mark.real_model
def test_real_model_alora_rows_in_a_batch_with_the_base(default_model_dir, tmp_path):
    """SmolLM2 with an aLoRA adapter invoked by "<|im_start|>assistant" (which ends every chat prompt): in the
    engine beside base rows, its chat answers are `lorakit.generate.generate`'s with the adapter loaded; a text
    prompt without the invocation gets the base model's answer."""
    from lorakit.generate import generate

    model, tok = lorakit.load_model(str(default_model_dir))
    invocation = tok.encode("<|im_start|>assistant", add_special_tokens=False)
    lorakit.inject(model, LoraConfig(r=8, alpha=16, targets="all-linear", alora_invocation_tokens=invocation), "al")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model, "al"):
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    lorakit.save_adapter(model, tmp_path / "al", "al")
    chats = ["Name a fruit.", "What is the capital of France?"]
    want = {q: generate(model, tok, q, max_new_tokens=8) for q in chats}
    with lorakit.disabled(model):
        base = {q: generate(model, tok, q, max_new_tokens=8) for q in chats}
        text = generate(model, tok, "The capital of France is", max_new_tokens=8, chat=False)
    assert want != base  # the adapter changes the answers

    served, _ = lorakit.load_model(str(default_model_dir))
    bank = AdapterBank(served)
    bank.load("al", tmp_path / "al")
    eng = Engine(served, tok, bank, EngineConfig(max_batch=8, wait_ms=0))
    eng.start()
    try:
        jobs = [(q, "al", True) for q in chats] + [(q, None, True) for q in chats]
        jobs.append(("The capital of France is", "al", False))
        queues = []
        for q, name, chat in jobs:
            ids = tok(format_prompt(tok, q, chat=chat), add_special_tokens=not chat)["input_ids"]
            events: queue.Queue = queue.Queue()
            eng.submit(GenRequest(ids, name, SamplingParams(max_tokens=8, temperature=0), events.put))
            queues.append(events)
        got = []
        for events in queues:
            parts = []
            while not isinstance(ev := events.get(timeout=180), (Done, Failed)):
                parts.append(ev.text)
            assert isinstance(ev, Done), ev
            got.append("".join(parts).strip())
    finally:
        eng.stop()
    assert got == [want[q] for q in chats] + [base[q] for q in chats] + [text]
