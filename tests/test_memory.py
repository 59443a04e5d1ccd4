"""lorakit.memory: the heap trimmed after each decoder layer in training, for quantized bases.

What can be checked exactly here: where it is on (a quantized base, or LORAKIT_TRIM=1) and off, that the hooks
change no output and no gradient (bitwise), that removing the handle removes every hook, and that trimming gives
freed heap pages back (RSS after freeing many small-heap tensors drops once trimmed). The memory figures on a 7B
model are in docs/scale.md (benchmarks, not timed tests).
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.memory import trim, trim_between_layers, trim_wanted

from tiny import SEVEN, randomize, tiny_llama

glibc = pytest.mark.skipif(not trim(), reason="the C library has no malloc_trim (not glibc)")


def test_on_for_a_quantized_base_or_when_asked(monkeypatch):
    monkeypatch.delenv("LORAKIT_TRIM", raising=False)
    model = tiny_llama(hidden=64)
    assert not trim_wanted(model)
    lorakit.quantize(model)
    assert trim_wanted(model)
    monkeypatch.setenv("LORAKIT_TRIM", "0")
    assert not trim_wanted(model) and len(trim_between_layers(model)) == 0
    monkeypatch.setenv("LORAKIT_TRIM", "1")
    assert trim_wanted(tiny_llama(hidden=64))


@glibc
def test_hooks_change_nothing_and_go_away():
    model = tiny_llama(hidden=64)
    lorakit.quantize(model)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=SEVEN))
    randomize(model)
    model.train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = run()
    handle = trim_between_layers(model)
    assert len(handle) == 2  # the two decoder layers
    hooked = run()
    assert torch.equal(plain[0], hooked[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], hooked[1], strict=True))
    handle.remove()
    assert all(not layer._forward_hooks for layer in model.model.layers)


@glibc
def test_trim_gives_freed_heap_pages_back():
    from lorakit.bench import rss_now_gb

    keep, hold = [], []
    for _ in range(3200):  # 3200 x 64 kB, under glibc's smallest mmap threshold: from the heap, each pinned
        hold.append(torch.ones(1 << 14))  # by a small tensor after it, so the heap cannot shrink from its top
        keep.append(torch.ones(16))
    del hold
    before = rss_now_gb()
    assert trim()
    after = rss_now_gb()
    assert after < before - 0.05, (before, after)  # most of the 0.2 GB freed goes back


def test_checkpointing_is_turned_on_under_transformers_current_name_and_recomputes_exactly():
    """`enable_checkpointing` calls transformers 5's `activation_checkpointing_enable` (the older name warns that
    it goes in v6), and the gradients of the adapter are the same as without checkpointing (non-reentrant, the
    same kernels run again: exact in float32)."""
    import warnings

    from lorakit.memory import enable_checkpointing

    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=SEVEN))
    randomize(model, std=0.1)
    model.train()
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad(set_to_none=True)
        model(x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert enable_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and plain
    for n, g in plain.items():
        assert torch.equal(g, checkpointed[n]), n
    assert not enable_checkpointing(torch.nn.Linear(2, 2))  # no transformers model: nothing to turn on
