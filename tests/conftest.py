"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # rule: nothing downloads at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
