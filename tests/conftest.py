"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """Hugging Face folder of the default model (SmolLM2-135M-Instruct), cached in the default location.

    The first run converts the bundled GGUF (~30 s); later runs and test files reuse the cache.
    """
    from lorakit.models import resolve_model_dir

    return resolve_model_dir(None)
