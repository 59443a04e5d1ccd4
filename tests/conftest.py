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
# Under pytest-xdist (`pytest -n auto`, the README's test command) each worker, and every process it starts,
# computes on one thread: two workers of two threads each on CI's 2 cores spin against each other (measured: a
# unit-test subset took 64 s on 2 workers of 2 threads, 25 s on 2 workers of 1 thread, 34 s serially).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

# Test files that share a session fixture run on one worker, so that the fixture is built once: the real
# training run (trained_run) and the playground server (ui).
SHARED_SCOPES = {
    "tests/test_train_real.py": "trained_run",
    "tests/test_gguf_llamacpp.py": "trained_run",
    "tests/test_ui.py": "ui",
    "tests/test_ui_adapters.py": "ui",
    "tests/test_ui_jobs.py": "ui",
    "tests/test_ui_dpo.py": "ui",
    "tests/test_ui_browser.py": "ui",
    "tests/test_ui_browser_stop.py": "ui",
}
# Marks of tests that take seconds, not milliseconds: their files are handed out first, so that the last file a
# worker gets is a quick one.
HEAVY = ("slow", "real_model", "llama_cpp", "browser")
# Below this much free space in the temp folder, the run's header says so: a full disk otherwise shows as
# hundreds of setup errors far from their cause.
MIN_FREE_GIB = 5


def pytest_report_header(config):
    import shutil
    import tempfile

    import torch

    if torch.cuda.is_available():
        gpu = f"gpu: {torch.cuda.get_device_name(0)}: the `gpu` tests run"
    else:
        gpu = "gpu: no CUDA GPU: the `gpu` tests are deselected (on a machine with one: pytest -m gpu)"
    tmp = tempfile.gettempdir()
    free = shutil.disk_usage(tmp).free / 2**30
    disk = f"disk: {free:.1f} GiB free in {tmp}"
    if free < MIN_FREE_GIB:
        disk += f" (under {MIN_FREE_GIB} GiB: the real-model tests write GB of files there and may fail for room)"
    return [gpu, disk]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (each may hold the real model and start servers)."""
    return max(1, min(os.cpu_count() or 1, 4))


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Hand out whole test files (and SHARED_SCOPES' groups of files), in the order the workers collected them."""
    from xdist.scheduler import LoadScopeScheduling

    class Scheduler(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return _scope(nodeid)

    config.option.loadscopereorder = False  # keep collection's order: the heavy files first (below)
    return Scheduler(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist's controller collects nothing: it counts the tests its first worker deselected, which every worker
    deselects alike, so that the summary says "16 deselected" as a serial run's does."""
    config = node.config
    deselected = getattr(node, "workeroutput", {}).get("deselected")
    if deselected and not getattr(config, "_lorakit_deselected", False):
        config._lorakit_deselected = True
        config.hook.pytest_deselected(items=deselected)


def _scope(nodeid: str) -> str:
    """The unit of work of a test: its file, or its SHARED_SCOPES group."""
    path = nodeid.split("::", 1)[0]
    return SHARED_SCOPES.get(path, path)


def _heavy_first(items):
    """Reorder ``items`` by file, the files with the most HEAVY tests first (only under xdist: a serial run keeps
    the files' own order)."""
    weight: dict[str, int] = {}
    for item in items:
        scope = _scope(item.nodeid)
        weight[scope] = weight.get(scope, 0) + any(mark in item.keywords for mark in HEAVY)
    first = {scope: i for i, scope in enumerate(weight)}
    items.sort(key=lambda item: (-weight[_scope(item.nodeid)], first[_scope(item.nodeid)]))  # stable


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
            if hasattr(config, "workeroutput"):  # an xdist worker: the controller's summary counts them
                config.workeroutput["deselected"] = [item.nodeid for item in gpu]
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
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _heavy_first(items)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """Hugging Face folder of the default model (SmolLM2-135M-Instruct), cached in the default location.

    The first run converts the bundled GGUF (~30 s); later runs and test files reuse the cache.
    """
    from lorakit.models import resolve_model_dir

    return resolve_model_dir(None)


@pytest.fixture(scope="session")
def tok(default_model_dir):
    """The default model's tokenizer, with its chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny matmuls only pay overhead for more (and CI has 2 shared cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TRAINED_STEPS, TRAINED_EVAL, TRAINED_SAVE_EVERY = 12, 40, 10


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


# -- one real `lorakit ui` (tests/uiserver.py) for the HTTP tests of the playground (test_ui, test_ui_jobs) -------


@pytest.fixture(scope="session")
def ui(tmp_path_factory, default_model_dir):
    """`lorakit ui` on a tiny model with the real tokenizer, an API key and a small upload limit, with a folder
    outside its workspace holding a file it must never serve. {url, proc, ws, tmp}."""
    from uiserver import KEY, UPLOAD_LIMIT_MB, tiny_chat_model, ui_process

    tmp = tmp_path_factory.mktemp("ui")
    model = tiny_chat_model(tmp / "tiny", default_model_dir)
    ws = tmp / "ws"
    (tmp / "outside").mkdir()
    (tmp / "outside" / "secret.jsonl").write_text('{"text": "secret"}\n')
    args = ["--model", str(model), "--workspace", str(ws), "--api-key", KEY]
    args += ["--max-upload-mb", str(UPLOAD_LIMIT_MB), "--dtype", "float32"]
    with ui_process(args, tmp / "ui.log") as (url, proc):
        yield {"url": url, "proc": proc, "ws": ws, "tmp": tmp}


@pytest.fixture(scope="session")
def http(ui):
    """An HTTP client of `ui` with its key."""
    import httpx
    from uiserver import KEY

    with httpx.Client(base_url=ui["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def trained(http):
    """A finished 30-step run "t1" of `ui` on the built-in task, its adapter loaded as "t1"."""
    from uiserver import SMALL_RUN, wait_for

    values = {**SMALL_RUN, "train": {"steps": "30", "batch_size": "2", "lr": "0.01"}}
    assert http.post("/api/runs", json={"name": "t1", "values": values}).status_code == 200
    state = wait_for(http, "/api/runs/t1", lambda s: s["status"] not in ("starting", "running"))
    assert state["status"] == "finished", state
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "t1", "lora_path": "runs/t1/adapter"})
    assert r.status_code == 200, r.text
    return "t1"
