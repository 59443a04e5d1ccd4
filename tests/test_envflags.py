"""Boolean switches from the environment (lorakit.envflags), as every LORAKIT_* switch reads them."""

from __future__ import annotations

import pytest

from lorakit.envflags import env_flag


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        (" TRUE ", True),
        ("yes", True),
        ("On", True),
        ("0", False),
        ("false", False),
        ("NO", False),
        (" off", False),
        ("", None),
        ("2", None),
        ("maybe", None),
    ],
)
def test_on_off_and_anything_else(monkeypatch, value, expected):
    monkeypatch.setenv("LORAKIT_TEST_FLAG", value)
    assert env_flag("LORAKIT_TEST_FLAG") is expected
    assert env_flag("LORAKIT_TEST_FLAG", True) is (True if expected is None else expected)


def test_unset_gives_the_default(monkeypatch):
    monkeypatch.delenv("LORAKIT_TEST_FLAG", raising=False)
    assert env_flag("LORAKIT_TEST_FLAG") is None and env_flag("LORAKIT_TEST_FLAG", False) is False


def test_the_switches_that_use_it(monkeypatch):
    from torch import nn

    from lorakit.device import cpu_bf16_native
    from lorakit.memory import trim_wanted

    monkeypatch.setenv("LORAKIT_CPU_BF16", "yes")
    assert cpu_bf16_native() is True  # forced: no probe, whatever the CPU
    monkeypatch.setenv("LORAKIT_CPU_BF16", "off")
    assert cpu_bf16_native() is False
    monkeypatch.setenv("LORAKIT_TRIM", "on")
    assert trim_wanted(nn.Linear(2, 2)) is True  # forced on for an unquantized model
    monkeypatch.setenv("LORAKIT_TRIM", "bogus")
    assert trim_wanted(nn.Linear(2, 2)) is False  # not a switch value: the default, off for no quantization
