"""`lorakit serve --load-on-demand`: a request naming a folder under --adapter-root that is not loaded loads it first.

One real server (the default model, `--max-adapters 2`, so that loads evict) on loopback. Every served folder but
`wrong` holds the same adapter file, so one offline reference (`lorakit.generate.generate` with that file) checks
every answer exactly.
"""

from __future__ import annotations

import concurrent.futures as cf
import shutil
from pathlib import Path

import httpx
import pytest
from test_serve import KEY, PROMPT, _random_adapter, serve_process, wait_until_up

import lorakit
from lorakit.generate import generate

from tiny import tiny_llama

pytestmark = pytest.mark.real_model

TOKENS = 8
SAME = ["a", "org/c", "team/v1.2:x", "d1", "d2", "d3", "p", "q", "r", "t", "m1", "m2", "m3"]
"""Folders under the root, each holding adapter a's file."""


@pytest.fixture(scope="module")
def odirs(tmp_path_factory, default_model_dir) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("on_demand")
    root, outside = tmp / "root", tmp / "outside"
    model, _ = lorakit.load_model(str(default_model_dir))
    _random_adapter(model, "a", seed=0)
    saved = lorakit.save_adapter(model, outside / "a", "a")
    for name in SAME:
        shutil.copytree(saved, root / name)
    tiny = tiny_llama()
    lorakit.inject(tiny, lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    lorakit.save_adapter(tiny, root / "wrong")  # fits another model
    (root / "escape").symlink_to(outside / "a", target_is_directory=True)
    return {"tmp": tmp, "root": root, "file": saved}


@pytest.fixture(scope="module")
def url(odirs, default_model_dir):
    args = ["--model", str(default_model_dir), "--adapter-root", str(odirs["root"]), "--load-on-demand"]
    args += ["--max-adapters", "2", "--api-key", KEY]
    log = odirs["tmp"] / "server.log"
    with serve_process(args, log) as (base, proc):
        yield wait_until_up(base, proc, log)


@pytest.fixture(scope="module")
def offline(url, odirs, default_model_dir) -> str:
    """The greedy answer with adapter a's file (computed while the server starts)."""
    model, tok = lorakit.load_model(str(default_model_dir))
    lorakit.load_adapter(model, odirs["file"], "a")
    return generate(model, tok, PROMPT, max_new_tokens=TOKENS, chat=False)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def _ask(http, model: str, **body) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, **body}
    return http.post("/v1/completions", json=body)


def _text(http, model: str) -> str:
    r = _ask(http, model)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"].strip()


def _loads(http) -> int:
    return http.get("/health").json()["on_demand_loads"]


def _served(http) -> list[str]:
    return [m["id"] for m in http.get("/v1/models").json()["data"] if m["parent"] is not None]


def test_a_request_loads_its_adapter_and_the_next_one_finds_it(http, offline):
    before = _loads(http)
    assert "org/c" not in _served(http)
    assert _text(http, "org/c") == offline
    assert "org/c" in _served(http) and _loads(http) == before + 1
    assert _text(http, "org/c") == offline and _loads(http) == before + 1  # loaded already
    assert _text(http, "team/v1.2:x") == offline  # a name with '/', '.' and ':'


def test_requests_arriving_together_share_one_load(http, offline):
    before = _loads(http)
    with cf.ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda _: _text(http, "d1"), range(4)))
    assert texts == [offline] * 4
    assert _loads(http) == before + 1


def test_max_adapters_evicts_the_least_recently_used(http, offline):
    for name in ("d2", "d3", "d2", "p"):  # d3 is the least recently used when p comes
        assert _text(http, name) == offline
    assert sorted(_served(http)) == ["d2", "p"]
    assert _text(http, "d3") == offline  # loads again
    assert sorted(_served(http)) == ["d3", "p"]


def test_every_adapter_in_use_is_a_503_to_retry(http, offline):
    """With 2 adapters streaming, a third cannot be loaded now: 503, and the running answers are untouched."""
    body = {"max_tokens": 40, "stream": True, "ignore_eos": True}
    with (
        httpx.Client(base_url=http.base_url, headers=http.headers, timeout=120) as other,
        http.stream("POST", "/v1/completions", json={"model": "q", "prompt": PROMPT, **body}) as s1,
    ):
        lines1 = s1.iter_lines()
        assert next(lines1).startswith("data: ")
        with other.stream("POST", "/v1/completions", json={"model": "r", "prompt": PROMPT, **body}) as s2:
            lines2 = s2.iter_lines()
            assert next(lines2).startswith("data: ")
            r = _ask(other, "t", max_tokens=1)
            assert r.status_code == 503 and r.json()["error"]["code"] == "server_overloaded", r.text
            assert "all 2 adapters (--max-adapters) are in use by requests or pinned; retry" in r.text
            assert [x for x in lines2 if x][-1] == "data: [DONE]"
        assert [x for x in lines1 if x][-1] == "data: [DONE]"
    assert _text(http, "t") == offline  # and loads once one is free


def _metrics(http) -> dict[str, float]:
    """/metrics through prometheus_client's own parser: {sample name: value} of the unlabelled samples."""
    from prometheus_client.parser import text_string_to_metric_families

    text = http.get("/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_metrics_count_the_loads_evictions_and_refusals(http, offline):
    for name in ("d1", "d2"):  # the bank (2) is full
        assert _text(http, name) == offline
    before, on_demand = _metrics(http), _loads(http)
    for name in ("m1", "m2", "m3"):  # each loads, and evicts the least recently used
        assert _text(http, name) == offline
    assert _ask(http, "wrong").status_code == 400  # a file for another model
    after = _metrics(http)

    def grew(name: str) -> float:
        return after[name] - before[name]

    assert grew("lorakit_adapter_loads_on_demand_total") == 3 == _loads(http) - on_demand
    assert grew("lorakit_adapter_loads_total") == 3
    assert grew("lorakit_adapter_evictions_total") == 3
    assert grew("lorakit_adapter_loads_refused_total") == 1
    assert grew("lorakit_adapter_loads_in_place_total") == 0 and grew("lorakit_adapter_unloads_total") == 0
    assert 0 < grew("lorakit_adapter_load_seconds_total") < 60
    assert after["lorakit_adapters_loaded"] == 2


def test_refusals_name_the_model_and_change_nothing(http, odirs):
    served = _served(http)
    r = _ask(http, "wrong")
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "adapter_invalid" and err["param"] == "model", r.text
    assert "cannot load adapter 'wrong'" in err["message"]
    r = _ask(http, "escape")  # a symlink out of the root
    assert r.status_code == 403 and r.json()["error"]["code"] == "adapter_path_refused", r.text
    for name in ("nope", "d1/../d2", "has space"):
        r = _ask(http, name)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert "nor a folder under the adapter root" in _ask(http, "nope").json()["error"]["message"]
    assert _served(http) == served
    tok = http.post("/tokenize", json={"model": "d1", "prompt": PROMPT})  # known, not loaded for it
    assert tok.status_code == 200 and tok.json()["count"] > 0
    assert _served(http) == served
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})  # the base model
    assert r.status_code == 200, r.text


def test_on_demand_needs_an_adapter_root():
    with pytest.raises(lorakit.ConfigError, match="--load-on-demand needs --adapter-root"):
        from lorakit.serve import ServeConfig

        ServeConfig(load_on_demand=True)
