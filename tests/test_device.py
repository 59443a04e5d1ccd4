"""Where a model runs and in what precision (lorakit.device), tested on whatever machine runs the suite.

On a machine without CUDA, `auto` must mean the CPU and `cuda` must fail in one line; tests/test_gpu.py checks
the numerics again on CUDA where there is a GPU.
"""

from __future__ import annotations

import pytest
import torch
import yaml

import lorakit
from lorakit.device import autocast, dtype_name, resolve_device, resolve_dtype, to_device
from lorakit.errors import ConfigError
from lorakit.train.config import load_config

from runs import addition_run
from tiny import tiny_llama

HAS_CUDA = torch.cuda.is_available()


def test_auto_picks_cuda_where_torch_sees_a_gpu_else_the_cpu():
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(HAS_CUDA, reason="a machine without CUDA: this is the refusal it must give")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_a_gpu_is_one_clear_line(spec):
    with pytest.raises(
        ConfigError, match=rf"device '{spec}': this torch \(.*\) sees no CUDA GPU; use cpu"
    ) as e:
        resolve_device(spec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "gpu", "cuda:-1"])
def test_unknown_devices_are_refused(spec):
    with pytest.raises(
        ConfigError, match=rf"device '{spec}' is not one lorakit knows: auto, cpu, cuda or cuda:N"
    ):
        resolve_device(spec)


def test_under_torchrun_each_process_takes_its_local_rank(monkeypatch):
    # torch's view of the machine is replaced (4 GPUs), not lorakit's logic
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"there are 4 CUDA device\(s\), cuda:0 to cuda:3"):
        resolve_device("cuda:4")


@pytest.mark.parametrize(
    "spec, device, bf16, want",
    [
        pytest.param("auto", "cpu", None, torch.float32, id="auto-cpu"),
        pytest.param("auto", "cuda", True, torch.bfloat16, id="auto-gpu-bf16"),
        pytest.param("auto", "cuda", False, torch.float16, id="auto-gpu-no-bf16"),
        pytest.param("bfloat16", "cpu", None, torch.bfloat16, id="asked"),
        pytest.param("float16", "cuda", True, torch.float16, id="asked-gpu"),
    ],
)
def test_the_base_dtype(monkeypatch, spec, device, bf16, want):
    if bf16 is not None:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_dtype(spec, torch.device(device)) == want
    assert resolve_dtype(dtype_name(want), torch.device(device)) == want


def test_bad_dtypes_are_refused():
    with pytest.raises(ConfigError, match="dtype 'fp8' is not one lorakit knows"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_autocast_only_in_16_bits():
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(torch.device("cpu"), torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    assert type(autocast(torch.device("cuda"), torch.float32)).__name__ == "nullcontext"


def test_to_device_keeps_tensors_where_they_are():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "n": 3}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["input_ids"] is batch["input_ids"] and moved["n"] == 3


@pytest.mark.parametrize(
    "override, match",
    [
        (["--model.device", "tpu"], "model.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--model.dtype", "fp8"], "model.dtype must be auto, float32, bfloat16 or float16, got 'fp8'"),
        (["--model.adapter_dtype", "bf16"], "model.adapter_dtype must be float32 or same, got 'bf16'"),
    ],
)
def test_train_settings_are_checked_at_config_load(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override)


def test_a_run_records_the_device_and_dtype_it_chose(tmp_path, one_thread):
    summary, model = addition_run(tmp_path, "--train.steps", "2")
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["model"]["device"] == "cpu" and cfg["model"]["dtype"] == "float32"
    assert summary["peak_gpu_gb"] is None  # the CPU reports RSS
    assert (
        load_config(tmp_path / "run" / "config.yaml", []).model.dtype == "float32"
    )  # and reruns as a config


@pytest.mark.parametrize("adapter_dtype, want", [("float32", torch.float32), ("same", torch.bfloat16)])
def test_a_16_bit_base_trains_fp32_adapters_by_default(tmp_path, one_thread, adapter_dtype, want):
    # the adapters are the optimizer's master weights: in bf16 (8 significant bits) AdamW's small updates would
    # mostly round away. The frozen base stays in bf16; "same" keeps the adapters in it too.
    from fsdp_worker import char_tokenizer

    from lorakit.train.run import run_training

    model = tiny_llama().to(torch.bfloat16)
    overrides = ["--train.steps", "1", "--model.adapter_dtype", adapter_dtype, "--data.n_train", "8"]
    cfg = load_config(
        None, [*overrides, "--train.out_dir", str(tmp_path), "--data.n_eval", "2", "--eval.limit", "1"]
    )
    run_training(cfg, model=model, tokenizer=char_tokenizer())
    assert {p.dtype for p in lorakit.adapter_parameters(model)} == {want}
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["dtype"] == "bfloat16"
