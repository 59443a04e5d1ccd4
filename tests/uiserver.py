"""A real `lorakit ui` in a subprocess on a tiny model, shared by test_ui (HTTP) and test_ui_browser (Chromium).

The tiny model is a 2-layer Llama with hidden size 32 and the default model's own tokenizer and chat template
(random weights, 1.6M parameters): training, chat, evaluation and export all run in seconds, with real text in
and out.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

KEY = "sk-ui-test"
UPLOAD_LIMIT_MB = (
    0.02  # the shared server's (conftest's `ui`) upload limit, 20 KB: a test can exceed it cheaply
)
SMALL_RUN = {"data": {"n_train": "64", "n_eval": "4"}, "eval": {"limit": "2", "max_new_tokens": "4"}}
"""Form values for a run that takes seconds on the tiny model."""


def error(r: httpx.Response, status: int) -> str:
    """The one-line message of an OpenAI-shaped error answer with `status`."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    message = r.json()["error"]["message"]
    assert "\n" not in message
    return message


def tiny_chat_model(folder: Path, default_model_dir: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, written to `folder` (an HF folder)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def ui_process(args: list[str], log: Path, timeout: float = 180) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m lorakit ui ARGS` on a free loopback port, up (its /health answers); killed at the end, its
    runs with it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lorakit", "ui", *args, "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"lorakit ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"lorakit ui did not come up in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()  # uvicorn stops; the UI stops its runs (a checkpoint each) on the way out
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_for(http: httpx.Client, path: str, done, timeout: float = 180, every: float = 0.3) -> dict:
    """GET `path` until `done(body)`; fails naming the last body if it never is."""
    deadline, body = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        body = http.get(path).json()
        if done(body):
            return body
        time.sleep(every)
    pytest.fail(f"{path} never got there in {timeout:.0f} s; last: {json.dumps(body)[:2000]}")


def events(http: httpx.Client, name: str, *, until, timeout: float = 180) -> list[tuple[str, dict]]:
    """(event, data) pairs of a run's SSE stream, read until `until(pairs)` or the stream's end."""
    pairs: list[tuple[str, dict]] = []
    deadline = time.monotonic() + timeout
    with http.stream("GET", f"/api/runs/{name}/events", timeout=timeout) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                pairs.append((kind, json.loads(line.removeprefix("data: "))))
                if kind == "end" or until(pairs):
                    return pairs
            if time.monotonic() > deadline:
                break
    return pairs


@contextlib.contextmanager
def browser_page(shots: Path, wait_ms: int = 120_000) -> Iterator:
    """A page of a headless Chromium (Playwright driving Debian's browser), 1280x900, `wait_ms` for every wait.
    A JavaScript error on the page fails the test at the end, and an exception inside saves a screenshot to
    `shots`/failure.png first."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.set_default_timeout(wait_ms)
        try:
            yield page
        except BaseException:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
            raise
        finally:
            if errors:
                page.screenshot(path=str(shots / "failure.png"))
            browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def browser_missing() -> str | None:
    """Why the `browser` tests cannot run here (None: Playwright and a Chromium are installed)."""
    import importlib.util

    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed"
    if chromium_path() is None:
        return "no chromium on PATH (Debian's chromium package)"
    return None


def chromium_path() -> str | None:
    """Debian's Chromium (Playwright's own browser download is not reachable from here)."""
    import shutil

    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
