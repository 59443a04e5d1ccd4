"""`--dtype auto` on the CPU: bf16 where the CPU multiplies it natively and a timed probe confirms it, else fp32.

The suite pins LORAKIT_CPU_BF16=0 (conftest); these tests lift the pin. They hold on both kinds of machine: on a
CPU without AVX512-BF16/AMX the verdict is fp32 without a probe, on one with them the probe decides and is cached.
"""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.device import BF16_FLAGS, PROBE_MIN_SPEEDUP, cpu_bf16_native, cpu_flags, resolve_dtype

CPU = torch.device("cpu")


@pytest.fixture
def unpinned(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAKIT_CPU_BF16", raising=False)
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    return tmp_path / "cpu_bf16.json"


def test_auto_follows_the_verdict_and_the_verdict_is_cached(unpinned):
    native = cpu_bf16_native()
    assert resolve_dtype("auto", CPU) == (torch.bfloat16 if native else torch.float32)
    if not cpu_flags() & set(BF16_FLAGS):
        assert not native and not unpinned.exists()  # no bf16 instructions: no probe at all
        return
    (entry,) = json.loads(unpinned.read_text()).values()
    assert entry["native"] == native == (entry["speedup"] >= PROBE_MIN_SPEEDUP)
    before = unpinned.stat().st_mtime_ns
    assert (
        cpu_bf16_native() == native and unpinned.stat().st_mtime_ns == before
    )  # read back, not probed again
    cache = json.loads(unpinned.read_text())
    (key,) = cache
    cache[key] = {"native": not native, "speedup": 0.0}
    unpinned.write_text(json.dumps(cache))
    assert cpu_bf16_native() == (not native)  # the cache decides while it is there
    assert cpu_bf16_native(refresh=True) == native


@pytest.mark.parametrize("value, want", [("1", torch.bfloat16), ("0", torch.float32), ("off", torch.float32)])
def test_the_environment_decides_instead(monkeypatch, unpinned, value, want):
    monkeypatch.setenv("LORAKIT_CPU_BF16", value)
    assert resolve_dtype("auto", CPU) == want
    assert not unpinned.exists()


def test_an_unwritable_cache_costs_only_the_probe(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAKIT_CPU_BF16", raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LORAKIT_CACHE", str(blocker / "sub"))  # a folder under a file cannot be made
    assert cpu_bf16_native() in (True, False)


def test_explicit_dtypes_are_kept_whatever_the_cpu():
    assert resolve_dtype("float32", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
