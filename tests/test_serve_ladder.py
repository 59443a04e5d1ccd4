"""Serving a ladder adapter: its side output reaches only its own rows of a mixed batch.

Tiny models check the row gate (`SideNetwork.set_rows`, `ladder_rows`) and the bank's refusals; the real default
model checks the engine in process (ladder, LoRA and base rows in one batch, joining between decode steps,
unloading in flight) and the real server on loopback with the `openai` client. References are offline greedy
generations: `lorakit generate --adapter LADDER_DIR` (the CLI, in a subprocess) and `lorakit.generate.generate`.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import io
import time

import httpx
import openai
import pytest
import torch
from test_serve import (
    CHAT,
    KEY,
    MAX_TOKENS,
    PROMPT,
    _chat,
    _drain,
    _error,
    _random_adapter,
    _serves,
    _submit,
    _text,
    serve_process,
    wait_until_up,
)

import lorakit
from lorakit import LadderConfig, attach_ladder
from lorakit.bank import AdapterBank
from lorakit.cli import main as cli_main
from lorakit.generate import generate
from lorakit.serve.engine import Engine, EngineConfig
from lorakit.serve.requests import Done, Failed
from lorakit.variants.ladder import detach_ladder, ladder_of, ladder_rows

from tiny import tiny_llama


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here: the server runs beside this process on 2 shared cores, where two threads that wait
    on each other made each offline generation ~6x slower (measured; restored after the module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomise_up(model, seed: int, std: float) -> None:
    """A nonzero up-projection, so the ladder changes the model's outputs (it starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        up = ladder_of(model).up.weight
        up.copy_(torch.randn(up.shape, generator=g) * std)


# --------------------------------------------------------------------------------------------------------------
# The row gate and the bank, on a tiny model
# --------------------------------------------------------------------------------------------------------------


def test_row_gate_on_a_tiny_model():
    """Gated-out rows equal the base exactly; gated-in rows equal the ladder on every row (same per-token maths
    on a smaller batch: 1e-6, float32 rounding of differently shaped matmuls)."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (4, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
        attach_ladder(model, LadderConfig(reduction=4, rank=4))
        _randomise_up(model, seed=0, std=0.5)
        full = model(ids).logits
        assert (full - base).abs().max() > 0.1  # the ladder does change the output
        with ladder_rows(model, [True, False, True, False]):
            mixed = model(ids).logits
        with ladder_rows(model, False):
            assert torch.equal(model(ids).logits, base)
        assert torch.equal(model(ids).logits, full)  # the gate is restored: all rows again
    assert torch.equal(mixed[[1, 3]], base[[1, 3]])
    torch.testing.assert_close(mixed[[0, 2]], full[[0, 2]], rtol=0, atol=1e-6)
    with (
        ladder_rows(model, [True, False]),
        pytest.raises(RuntimeError, match="mask of 2 rows for a batch of 4"),
    ):
        model(ids)


def test_bank_routes_a_ladder_and_refuses_what_it_cannot_serve(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
    attach_ladder(model, LadderConfig(reduction=4, rank=4))
    _randomise_up(model, seed=1, std=0.5)
    lad = lorakit.save_ladder(model, tmp_path / "lad")
    with torch.no_grad():
        ladder_out = model(ids).logits
    detach_ladder(model)
    attach_ladder(model, LadderConfig(reduction=4, rank=4, block="transformer"))
    tlad = lorakit.save_ladder(model, tmp_path / "tlad")
    detach_ladder(model)

    bank = AdapterBank(model)
    with pytest.raises(lorakit.AdapterError, match="transformer side blocks cannot be served.*KV cache"):
        bank.load("t", tlad)
    assert ladder_of(model) is None and bank.names() == []
    bank.load("lad", lad)
    with pytest.raises(lorakit.AdapterError, match="ladder adapter 'lad' is already loaded"):
        bank.load("lad2", lad)
    assert bank.names() == ["lad"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # loaded, but plain calls stay the base until routed
        with bank.use(["lad", None, "lad"]):
            mixed = model(ids).logits
        bank.activate("lad")
        assert torch.equal(model(ids).logits, ladder_out)
        bank.activate(None)
        assert torch.equal(model(ids).logits, base)
    assert torch.equal(mixed[1], base[1])
    torch.testing.assert_close(mixed[[0, 2]], ladder_out[[0, 2]], rtol=0, atol=1e-6)
    with bank.hold(["lad"]):  # unloaded while in use: kept until the lease ends, then detached
        bank.unload("lad")
        assert bank.names() == [] and ladder_of(model) is not None
        with pytest.raises(lorakit.AdapterError, match="still being unloaded"):
            bank.load("other", lad)
    assert ladder_of(model) is None and bank.ladder is None
    bank.load("other", lad)  # and a ladder loads again
    assert bank.names() == ["other"]


# --------------------------------------------------------------------------------------------------------------
# The real default model: files, offline references, the engine in process
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, default_model_dir):
    """root/lad (an mlp ladder with a random up-projection), root/tlad (a transformer ladder), root/a (a LoRA)."""
    root = tmp_path_factory.mktemp("serve_ladder") / "root"
    model, _ = lorakit.load_model(str(default_model_dir))
    torch.manual_seed(0)
    attach_ladder(model, LadderConfig(reduction=8, rank=8, every=10))
    _randomise_up(model, seed=0, std=0.05)
    lorakit.save_ladder(model, root / "lad")
    detach_ladder(model)
    attach_ladder(model, LadderConfig(reduction=8, rank=8, every=30, block="transformer"))
    lorakit.save_ladder(model, root / "tlad")
    detach_ladder(model)
    _random_adapter(model, "a", seed=0)
    lorakit.save_adapter(model, root / "a", "a")
    return root


def _cli_generate(*args: str) -> str:
    """`lorakit generate ARGS` (the CLI's own code, in this process): what it prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["generate", *args, "--max-new-tokens", str(MAX_TOKENS)]) == 0
    return out.getvalue().strip()


@pytest.fixture(scope="module")
def offline(files, default_model_dir) -> dict:
    """Greedy references: {(model, kind): text}; the ladder's from `lorakit generate --adapter root/lad`."""
    lad = ["--model", str(default_model_dir), "--adapter", str(files / "lad")]
    out = {
        ("lad", "chat"): _cli_generate(CHAT, *lad),
        ("lad", "text"): _cli_generate(PROMPT, "--no-chat", *lad),
    }
    model, tok = lorakit.load_model(str(default_model_dir))
    for name in (None, "a"):
        if name is not None:
            lorakit.load_adapter(model, files / name, name)
        out[name, "chat"] = generate(model, tok, CHAT, max_new_tokens=MAX_TOKENS)
        out[name, "text"] = generate(model, tok, PROMPT, max_new_tokens=MAX_TOKENS, chat=False)
    assert out["lad", "chat"] != out[None, "chat"] and out["lad", "text"] != out[None, "text"]
    return out


@pytest.fixture
def engine(files, offline, default_model_dir):
    model, tok = lorakit.load_model(str(default_model_dir))
    bank = AdapterBank(model)
    bank.load("a", files / "a")
    bank.load("lad", files / "lad")
    eng = Engine(model, tok, bank, EngineConfig(max_batch=6, wait_ms=0))
    eng.start()
    yield eng
    eng.stop()


def test_engine_mixed_batch_ladder_lora_and_base(engine, offline):
    """Ladder rows equal offline generation with the ladder, base and LoRA rows are untouched by it; rows join
    a running batch between decode steps."""
    first = _submit(engine, "lad", "chat")
    deadline = time.monotonic() + 60
    while engine.stats["steps"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    jobs = [("lad", "text"), (None, "chat"), (None, "text"), ("a", "text"), ("a", "chat")]
    later = {job: _submit(engine, *job) for job in jobs}
    got = {("lad", "chat"): _drain(first), **{job: _drain(q) for job, q in later.items()}}
    for job, (text, done) in got.items():
        assert isinstance(done, Done) and text.strip() == offline[job], job
    assert engine.stats["prefills"] >= 2 and engine.stats["max_rows"] >= 4


def test_engine_unloads_a_ladder_in_flight(engine, offline):
    """The request in flight finishes; new ones fail with 404; the side network goes when the last one ends."""
    running = _submit(engine, "lad", "text", max_tokens=16, ignore_eos=True)
    deadline = time.monotonic() + 60
    while engine.stats["steps"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.call(lambda: engine.bank.unload("lad")).result()
    text, failed = _drain(_submit(engine, "lad", "text"))
    assert isinstance(failed, Failed) and failed.status == 404
    text, done = _drain(running)
    assert isinstance(done, Done) and done.completion_tokens == 16
    assert text.strip().startswith(offline["lad", "text"])
    assert engine.call(lambda: ladder_of(engine.model)).result() is None
    text, done = _drain(_submit(engine, None, "text"))
    assert text.strip() == offline[None, "text"]


def test_startup_refuses_a_second_or_a_transformer_ladder(files, default_model_dir):
    from lorakit.serve import ServeConfig, build

    model = str(default_model_dir)
    with pytest.raises(lorakit.AdapterError, match="ladder adapter 'l1' is already loaded"):
        build(ServeConfig(model=model, adapters={"l1": str(files / "lad"), "l2": str(files / "lad")}))
    with pytest.raises(lorakit.AdapterError, match="transformer side blocks cannot be served"):
        build(ServeConfig(model=model, adapters={"t": str(files / "tlad")}))


# --------------------------------------------------------------------------------------------------------------
# The real server, driven with the openai client
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url(files, default_model_dir):
    args = [
        "--model",
        str(default_model_dir),
        "--adapter",
        f"lad={files / 'lad'}",
        "--adapter",
        f"a={files / 'a'}",
    ]
    args += ["--adapter-root", str(files), "--api-key", KEY]
    log = files.parent / "server.log"
    with serve_process(args, log) as (base_url, proc):
        yield wait_until_up(base_url, proc, log)


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def test_server_serves_a_ladder_next_to_base_and_lora(client, http, offline, files):
    cards = {m.id: m for m in client.models.list().data}
    base = next(m for m in cards if cards[m].parent is None)
    assert list(cards) == [base, "lad", "a"]
    assert cards["lad"].parent == base and cards["lad"].root == str((files / "lad").resolve())
    jobs = [(name, kind) for name in ("lad", None, "a") for kind in ("chat", "text")]

    def run(job):
        name, kind = job
        r = (_chat if kind == "chat" else _text)(client, name or base)
        return r.choices[0].message.content if kind == "chat" else r.choices[0].text

    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        results = dict(zip(jobs, ex.map(run, jobs), strict=True))
    for job, text in results.items():
        assert text.strip() == offline[job], job
    assert http.get("/health").json()["max_rows"] >= 2  # rows of different requests did share a batch

    # runtime loading: a second ladder, or one with attention side blocks, is refused with a JSON error
    err = _error(http.post("/v1/load_lora_adapter", json={"lora_name": "lad2", "lora_path": "lad"}), 400)
    assert "ladder adapter 'lad' is already loaded" in err["message"]
    err = _error(http.post("/v1/load_lora_adapter", json={"lora_name": "t", "lora_path": "tlad"}), 400)
    assert "transformer side blocks cannot be served" in err["message"]
    assert [m.id for m in client.models.list().data] == [base, "lad", "a"]

    # unloading in flight: the stream finishes, new requests get 404; then the ladder loads again at runtime
    stream = _text(client, "lad", max_tokens=16, stream=True, extra_body={"ignore_eos": True})
    chunks = [next(iter(stream))]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "lad"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        _text(client, "lad")
    chunks += list(stream)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    deadline = time.monotonic() + 10
    while http.get("/health").json()["unloading"] and time.monotonic() < deadline:
        time.sleep(0.05)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "lad3", "lora_path": "lad"})
    assert r.status_code == 200, r.text
    assert _text(client, "lad3").choices[0].text.strip() == offline["lad", "text"]
    _serves(client, base)
