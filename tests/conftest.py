"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # rule: nothing downloads at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `--dtype auto` on the CPU is bf16 where the CPU has native bf16 (lorakit.device.cpu_bf16_native). The suite pins
# it to float32, so that the same tests check the same numbers on CPUs with and without it; the bf16 path and the
# choice itself are tested explicitly (tests/test_cpu_bf16.py), and CI's newcomer run uses the real default.
os.environ.setdefault("LORAKIT_CPU_BF16", "0")


def pytest_report_header(config):
    import torch

    if torch.cuda.is_available():
        return f"gpu: {torch.cuda.get_device_name(0)}: the `gpu` tests run"
    return "gpu: no CUDA GPU: the `gpu` tests are deselected (on a machine with one: pytest -m gpu)"


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where torch sees a CUDA GPU: elsewhere they are deselected, which pytest's summary
    counts, and the header says why. `llama_cpp` tests need llama-cpp-python (bash scripts/setup.sh test
    installs it), `browser` tests Playwright and Chromium (the same). Where they are missing they are skipped
    with the reason shown, never in silence; CI installs them, so there they always run."""
    import torch

    if not torch.cuda.is_available():
        gpu = [item for item in items if "gpu" in item.keywords]
        if gpu:
            config.hook.pytest_deselected(items=gpu)
            items[:] = [item for item in items if "gpu" not in item.keywords]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        skip = pytest.mark.skip(reason="llama-cpp-python is not installed: bash scripts/setup.sh test")
        for item in items:
            if "llama_cpp" in item.keywords:
                item.add_marker(skip)
    from uiserver import browser_missing

    missing = browser_missing()
    if missing:
        skip = pytest.mark.skip(reason=f"{missing}: bash scripts/setup.sh test installs it")
        for item in items:
            if "browser" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """Hugging Face folder of the default model (SmolLM2-135M-Instruct), cached in the default location.

    The first run converts the bundled GGUF (~30 s); later runs and test files reuse the cache.
    """
    from lorakit.models import resolve_model_dir

    return resolve_model_dir(None)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny matmuls only pay overhead for more (and CI has 2 shared cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TRAINED_STEPS, TRAINED_EVAL, TRAINED_SAVE_EVERY = 20, 40, 10


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One real run of the main job, shared by the tests that need a trained adapter on the default model
    (test_train_real, the llama.cpp comparison): `lorakit train` for TRAINED_STEPS steps in a subprocess,
    evaluated on TRAINED_EVAL held-out examples, checkpointing every TRAINED_SAVE_EVERY. (run folder, stdout)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("run")
    args = [
        "--train.out_dir",
        str(out),
        "--train.steps",
        str(TRAINED_STEPS),
        "--data.n_eval",
        str(TRAINED_EVAL),
    ]
    args += ["--eval.limit", str(TRAINED_EVAL), "--train.save_every", str(TRAINED_SAVE_EVERY)]
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, proc.stdout
