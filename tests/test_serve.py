"""`lorakit serve`: the real server on loopback, in a subprocess, driven with the official `openai` client.

One server for the module (the real default model, two random adapters a and b, an adapter root, an API key).
References come from `lorakit.generate.generate` in this process, with the same adapter files. Greedy outputs
must match them exactly although the server batches rows of different adapters and prompt lengths together
(left padding, mixed-adapter forward, requests joining between decode steps).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import queue
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

import lorakit
from lorakit.bank import AdapterBank
from lorakit.generate import format_prompt, generate
from lorakit.serve.engine import Engine, EngineConfig
from lorakit.serve.requests import Done, Failed, GenRequest, SamplingParams

from tiny import tiny_llama

pytestmark = pytest.mark.real_model

KEY = "sk-test-lorakit"
MAX_TOKENS = 8
CHAT = "Name a fruit."
PROMPT = "The capital of France is"


# --------------------------------------------------------------------------------------------------------------
# Fixtures: adapters, the server, offline references
# --------------------------------------------------------------------------------------------------------------


def _random_adapter(model, name: str, seed: int) -> None:
    torch.manual_seed(seed)  # the Kaiming init of A
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=16, targets=["q_proj", "v_proj"]), name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model, name):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, default_model_dir) -> dict[str, Path]:
    """root/{a,b} (served), root/wrong (fits another model), root/escape -> outside/c (a symlink out)."""
    tmp = tmp_path_factory.mktemp("serve")
    root, outside = tmp / "root", tmp / "outside"
    model, _ = lorakit.load_model(str(default_model_dir))
    for i, name in enumerate("ab"):
        _random_adapter(model, name, seed=i)
        lorakit.save_adapter(model, root / name, name)
    lorakit.save_adapter(model, outside / "c", "a")
    tiny = tiny_llama()
    lorakit.inject(tiny, lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    lorakit.save_adapter(tiny, root / "wrong")
    (root / "escape").symlink_to(outside / "c", target_is_directory=True)
    return {"tmp": tmp, "root": root, "outside": outside}


@contextlib.contextmanager
def serve_process(args: list[str], log: Path):
    """`python -m lorakit serve ARGS` on a free loopback port (always killed at the end); yields (url, process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lorakit", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    # one thread: the server shares 2 busy cores with this process (OpenMP's spinning threads lose badly there)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_until_up(base: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> str:
    """`base` once /health answers 200; fails the test with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"the server did not come up in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(dirs, default_model_dir):
    """Start `python -m lorakit serve` (always killed at the end); yields (base url, process, log file)."""
    root = dirs["root"]
    args = ["--model", str(default_model_dir), "--adapter", f"a={root / 'a'}", "--adapter", f"b={root / 'b'}"]
    args += ["--adapter-root", str(root), "--api-key", KEY]
    log = dirs["tmp"] / "server.log"
    with serve_process(args, log) as (url, proc):
        yield url, proc, log


@pytest.fixture(scope="module")
def ref_model(server, dirs, default_model_dir):
    """The model with adapters a and b loaded from their files (requests `server` so that it starts first)."""
    model, tok = lorakit.load_model(str(default_model_dir))
    for name in "ab":
        lorakit.load_adapter(model, dirs["root"] / name, name)
    return model, tok


@pytest.fixture(scope="module")
def offline(ref_model) -> dict:
    """Greedy references with lorakit.generate, computed while the server starts: {(adapter, kind): text}."""
    model, tok = ref_model
    out = {}
    for name in (None, "a", "b"):
        if name is not None:
            lorakit.set_active(model, name)
        with lorakit.disabled(model) if name is None else contextlib.nullcontext():
            out[name, "chat"] = generate(model, tok, CHAT, max_new_tokens=MAX_TOKENS)
            out[name, "text"] = generate(model, tok, PROMPT, max_new_tokens=MAX_TOKENS, chat=False)
    return out


@pytest.fixture(scope="module")
def url(server) -> str:
    return wait_until_up(*server)


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def base(client) -> str:
    return next(m.id for m in client.models.list().data if m.parent is None)


def _chat(client, model: str, **kw):
    kw = {"max_tokens": MAX_TOKENS, "temperature": 0, **kw}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": CHAT}], **kw)


def _text(client, model: str, **kw):
    kw = {"max_tokens": MAX_TOKENS, "temperature": 0, **kw}
    return client.completions.create(model=model, prompt=PROMPT, **kw)


def _serves(client, base: str) -> None:
    """The server still answers after whatever the test did."""
    assert _text(client, base, max_tokens=1).choices[0].text


# --------------------------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------------------------


def test_models_lists_base_and_adapters(client, base, dirs, default_model_dir):
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == [base, "a", "b"]
    assert base == default_model_dir.name
    assert cards[base].parent is None and cards[base].root == str(default_model_dir)
    for name in "ab":
        assert cards[name].parent == base and cards[name].root == str((dirs["root"] / name).resolve())
        assert cards[name].owned_by == "lorakit" and cards[name].object == "model"


def test_concurrent_adapters_match_offline(client, http, base, offline):
    """Base, a and b at once, chat and plain completions: batched together, each equals offline generation."""
    jobs = [(name, kind) for name in (None, "a", "b") for kind in ("chat", "text")]

    def run(job):
        name, kind = job
        r = (_chat if kind == "chat" else _text)(client, name or base)
        choice = r.choices[0]
        return (choice.message.content if kind == "chat" else choice.text), choice.finish_reason, r.usage

    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        results = dict(zip(jobs, ex.map(run, jobs), strict=True))
    for job, (text, finish, usage) in results.items():
        assert text.strip() == offline[job], job
        assert finish in ("stop", "length") and 0 < usage.completion_tokens <= MAX_TOKENS
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert offline["a", "chat"] != offline[None, "chat"] or offline["a", "text"] != offline[None, "text"]
    assert offline["b", "chat"] != offline[None, "chat"] or offline["b", "text"] != offline[None, "text"]
    assert http.get("/health").json()["max_rows"] >= 2  # rows of different requests did share a batch


def test_streamed_chat(client, offline):
    stream = _chat(client, "b", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == offline["b", "chat"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed


def test_streamed_completion(client, offline):
    text = "".join(c.choices[0].text for c in _text(client, "a", stream=True))
    assert text.strip() == offline["a", "text"]


def test_stop_string_and_seeded_sampling(client, base, offline):
    word = offline[None, "text"].split()[1]  # a word inside the greedy answer
    r = _text(client, base, stop=[word])
    assert word not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    assert offline[None, "text"].startswith(r.choices[0].text.strip())
    sampled = [_text(client, "a", temperature=0.9, top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_load_and_unload(client, http, offline, base, dirs):
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "a"})
    assert r.status_code == 200, r.text
    cards = {m.id: m for m in client.models.list().data}
    assert cards["a2"].parent == base and cards["a2"].root == str((dirs["root"] / "a").resolve())
    assert _text(client, "a2").choices[0].text.strip() == offline["a", "text"]
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "a2"})
    assert r.status_code == 200, r.text
    assert "a2" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError, match="a2"):
        _text(client, "a2")


def test_unload_while_in_flight(client, http, base):
    """The request in flight finishes; the adapter is gone for new requests at once."""
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "busy", "lora_path": "b"}).status_code == 200
    stream = _text(
        client,
        "busy",
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [next(iter(stream))]  # admitted and generating
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "busy"})
    assert r.status_code == 200, r.text
    assert http.get("/health").json()["unloading"] == ["busy"]  # kept for the request in flight
    with pytest.raises(openai.NotFoundError):
        _text(client, "busy")
    chunks += list(stream)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16
    deadline = time.monotonic() + 10  # and gone once it finished (the engine releases it right after)
    while http.get("/health").json()["unloading"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http.get("/health").json()["unloading"] == []
    assert "busy" not in [m.id for m in client.models.list().data]
    _serves(client, base)


def test_load_inplace_while_in_flight(client, http, base, offline, dirs):
    """vLLM's load_inplace: the request running on the old file finishes on it; requests after get the new."""
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "pol", "lora_path": "a"}).status_code == 200
    stream = _text(client, "pol", max_tokens=32, stream=True, extra_body={"ignore_eos": True})
    chunks = [next(iter(stream))]  # admitted and generating on a
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "pol", "lora_path": "b", "load_inplace": True})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'pol' reloaded in place successfully."
    assert http.get("/health").json()["unloading"] == ["pol"]  # a is kept for the request in flight
    assert _text(client, "pol").choices[0].text.strip() == offline["b", "text"]
    chunks += list(stream)
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed.strip().startswith(offline["a", "text"])
    cards = {m.id: m for m in client.models.list().data}
    assert cards["pol"].root == str((dirs["root"] / "b").resolve())
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "pol"}).status_code == 200
    _serves(client, base)


def test_names_with_slashes_dots_and_colons(client, http, base, offline):
    """Served names are the bank's, not the model's: `org/a:v1.0` serves as given, its card at its own URL."""
    name = "org/a:v1.0"
    r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "a"})
    assert r.status_code == 200, r.text
    assert http.get(f"/v1/models/{name}").json()["parent"] == base
    assert _text(client, name).choices[0].text.strip() == offline["a", "text"]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    _error(http.get(f"/v1/models/{name}"), 404)


# --------------------------------------------------------------------------------------------------------------
# Bad input, security, limits: a clear JSON error each, and the server keeps serving
# --------------------------------------------------------------------------------------------------------------


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert {"message", "type", "code"} <= set(err) and err["message"]
    return err


def test_malformed_json(http, client, base):
    _error(http.post("/v1/chat/completions", content=b'{"model": "a", "messages": [', headers=_ct()), 400)
    _error(http.post("/v1/completions", content=b"[1, 2]", headers=_ct()), 400)
    _error(http.post("/v1/completions", json={"model": "a", "prompt": 3}), 400)
    _error(http.post("/v1/completions", json={"model": "a", "prompt": "x", "temperature": "hot"}), 400)
    _error(http.post("/v1/load_lora_adapter", content=b"nope", headers=_ct()), 400)
    _serves(client, base)


def _ct() -> dict[str, str]:
    return {"Content-Type": "application/json"}


def test_unknown_adapter_404_lists_available(client, base):
    with pytest.raises(openai.NotFoundError) as e:
        _chat(client, "no-such-adapter")
    assert "'a'" in e.value.message and "'b'" in e.value.message and base in e.value.message
    assert e.value.body["code"] == "model_not_found"


def test_prompt_over_context_length(client, base):
    with pytest.raises(openai.BadRequestError, match="maximum context length") as e:
        client.completions.create(model=base, prompt="hello " * 9000, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        _text(client, base, max_tokens=10**6)
    _serves(client, base)


def test_api_key(url, client, base):
    assert httpx.get(f"{url}/health").status_code == 200  # health needs no key
    _error(httpx.get(f"{url}/v1/models"), 401)
    _error(httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "a"}), 401)
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        _text(wrong, base)
    _serves(client, base)


@pytest.mark.parametrize(
    "path, status",
    [
        pytest.param("OUTSIDE/c", 403, id="absolute-outside-root"),
        pytest.param("../outside/c", 403, id="dotdot"),
        pytest.param("ROOT/../outside/c", 403, id="absolute-with-dotdot"),
        pytest.param("escape", 403, id="symlink-out-of-root"),
        pytest.param("wrong", 400, id="does-not-fit-base"),
        pytest.param("missing", 400, id="no-such-folder"),
    ],
)
def test_load_refused(http, client, base, dirs, path, status):
    before = [m.id for m in client.models.list().data]
    path = path.replace("OUTSIDE", str(dirs["outside"])).replace("ROOT", str(dirs["root"]))
    err = _error(http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path}), status)
    assert ("refused" in err["message"]) == (status == 403)
    assert [m.id for m in client.models.list().data] == before  # nothing half-loaded
    _serves(client, base)


def test_load_and_unload_errors(http, base):
    err = _error(
        http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "b"}), 400
    )  # duplicate
    assert 'already been loaded; unload it first, or pass "load_inplace": true' in err["message"]
    bad = {"lora_name": "a", "lora_path": "b", "load_inplace": "yes"}
    assert _error(http.post("/v1/load_lora_adapter", json=bad), 400)["param"] == "load_inplace"
    _error(http.post("/v1/load_lora_adapter", json={"lora_name": base, "lora_path": "b"}), 400)
    _error(http.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400)
    err = _error(http.post("/v1/load_lora_adapter", json={"lora_name": "my x", "lora_path": "b"}), 400)
    assert (
        "'my x': use 1 to 256 letters, digits and _ - . : / @ +" in err["message"]
        and err["param"] == "lora_name"
    )
    _error(http.post("/v1/unload_lora_adapter", json={"lora_name": "never-loaded"}), 404)
    _error(http.get("/v1/no-such-route"), 404)


def test_client_going_away_frees_its_row(http, client, base):
    body = {"model": "a", "prompt": PROMPT, "max_tokens": 500, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 30  # far less than 500 decode steps
    while http.get("/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert http.get("/health").json()["running"] == 0
    _serves(client, base)


def test_body_too_large(http):
    _error(http.post("/v1/completions", content=b" " * (17 * 2**20), headers=_ct()), 413)


# --------------------------------------------------------------------------------------------------------------
# The engine in this process: joining between decode steps, stop strings while streaming, a failing step
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def engine(ref_model):
    model, tok = ref_model
    eng = Engine(model, tok, AdapterBank(model), EngineConfig(max_batch=4, wait_ms=0))
    eng.start()
    yield eng
    eng.stop()


def _submit(engine, name, kind, **kw) -> queue.Queue:
    tok = engine.tokenizer
    text = format_prompt(tok, CHAT) if kind == "chat" else PROMPT
    ids = tok(text, add_special_tokens=kind != "chat")["input_ids"]
    events: queue.Queue = queue.Queue()
    params = SamplingParams(**{"max_tokens": MAX_TOKENS, "temperature": 0, **kw})
    engine.submit(GenRequest(ids, name, params, events.put))
    return events


def _drain(events: queue.Queue) -> tuple[str, Done | Failed]:
    parts = []
    while not isinstance(ev := events.get(timeout=120), (Done, Failed)):
        parts.append(ev.text)
    return "".join(parts), ev


def test_engine_requests_join_a_running_batch(engine, offline):
    first = _submit(engine, "a", "chat")
    deadline = time.monotonic() + 60
    while engine.stats["steps"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    later = {(n, k): _submit(engine, n, k) for n, k in [("b", "text"), (None, "chat"), (None, "text")]}
    got = {("a", "chat"): _drain(first), **{job: _drain(q) for job, q in later.items()}}
    for job, (text, done) in got.items():
        assert isinstance(done, Done) and text.strip() == offline[job], job
    assert engine.stats["prefills"] >= 2 and engine.stats["max_rows"] >= 3


def test_engine_stop_string_is_never_streamed(engine, offline):
    full = " " + offline[None, "text"]
    stop = " ".join(full.split()[-2:])  # spans tokens: streaming must hold back its start
    text, done = _drain(_submit(engine, None, "text", stop=(stop,)))
    assert text == full[: full.index(stop)] and done.finish_reason == "stop"


def test_engine_failed_step_fails_its_rows_and_goes_on(engine, dirs, offline):
    bank, model = engine.bank, engine.model
    engine.call(lambda: bank.load("c", dirs["root"] / "a")).result()
    forward, calls = engine.runner.forward, []

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    engine.runner.forward = boom
    text, failed = _drain(_submit(engine, "c", "text"))
    assert isinstance(failed, Failed) and failed.status == 500 and "boom" in failed.message
    engine.call(lambda: bank.unload("c")).result()
    assert "c" not in lorakit.adapter_names(model)  # the failed row released its adapter
    text, done = _drain(_submit(engine, "a", "text"))
    assert isinstance(done, Done) and text.strip() == offline["a", "text"]
