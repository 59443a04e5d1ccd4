"""Operating `lorakit serve`: its Prometheus metrics and vLLM's /tokenize and /detokenize, on the real default
model, through a real server (test_serve's fixtures: its own server for this module)."""

from __future__ import annotations

import httpx
import pytest
from test_serve import (  # noqa: F401 - fixtures
    CHAT,
    PROMPT,
    _chat,
    _error,
    _text,
    base,
    client,
    dirs,
    http,
    server,
    url,
)

pytestmark = pytest.mark.real_model


def _scrape(base_url: str) -> dict[tuple[str, tuple], float]:
    """/metrics (no key needed) through prometheus_client's own parser: {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{base_url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_count_what_was_served(url, client, base):  # noqa: F811
    before = _scrape(url)
    r = client.completions.create(model="a", prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True})
    c = _chat(client, base, max_tokens=3)
    after = _scrape(url)

    def grew(name: str, labels: tuple = ()) -> float:
        return after[name, labels] - before.get((name, labels), 0.0)

    assert grew("lorakit_requests_total") == 2
    assert grew("lorakit_prompt_tokens_total") == r.usage.prompt_tokens + c.usage.prompt_tokens
    # every sampled token, an end-of-sequence one included (which usage does not count)
    sampled = grew("lorakit_generated_tokens_total")
    assert 4 + c.usage.completion_tokens <= sampled <= 4 + c.usage.completion_tokens + 1
    assert grew("lorakit_prefills_total") >= 1 and grew("lorakit_decode_steps_total") >= 3
    for endpoint in ("completions", "chat"):
        for phase in ("first_event", "total"):
            labels = (("endpoint", endpoint), ("phase", phase))
            assert grew("lorakit_request_seconds_count", labels) == 1, (endpoint, phase)
            inf = tuple(sorted((*labels, ("le", "+Inf"))))
            assert (
                after["lorakit_request_seconds_bucket", inf] == after["lorakit_request_seconds_count", labels]
            )
    total = (("endpoint", "completions"), ("phase", "total"))
    assert 0 < grew("lorakit_request_seconds_sum", total) < 120
    assert after["lorakit_engine_up", ()] == 1 and after["lorakit_running_rows", ()] == 0
    served = [m.id for m in client.models.list().data if m.parent is not None]
    assert after["lorakit_adapters_loaded", ()] == len(served) >= 2


def test_tokenize_counts_what_generation_counts(http, client, base):  # noqa: F811
    """vLLM's /tokenize and /detokenize: a prompt's count is the completion's prompt_tokens, chat messages' the
    chat's; detokenize gives the text back."""
    msgs = [{"role": "user", "content": CHAT}]
    t = http.post("/tokenize", json={"model": "a", "prompt": PROMPT}).json()
    assert t["count"] == len(t["tokens"]) == _text(client, "a", max_tokens=1).usage.prompt_tokens
    assert t["max_model_len"] > t["count"]
    chat = http.post("/tokenize", json={"model": base, "messages": msgs}).json()
    assert chat["count"] == _chat(client, base, max_tokens=1).usage.prompt_tokens
    bare = http.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()
    assert bare["tokens"] == chat["tokens"][: bare["count"]] and bare["count"] < chat["count"]
    assert http.post("/detokenize", json={"tokens": t["tokens"]}).json() == {"prompt": PROMPT}
    for path, body, status, needle in [
        ("/tokenize", {"prompt": 5}, 400, "'prompt' must be a string"),
        ("/tokenize", {"messages": []}, 400, "non-empty list"),
        ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "does not exist"),
        ("/detokenize", {"tokens": [1, 10**9]}, 400, "out of range"),
        ("/detokenize", {"tokens": "1 2"}, 400, "list of token ids"),
    ]:
        assert needle in _error(http.post(path, json=body), status)["message"], (path, body)
    assert httpx.post(f"{http.base_url}/tokenize", json={"prompt": "x"}).status_code == 401  # the key


def test_usage_reports_the_prompt_tokens_the_prefix_cache_spared(url, client, base):  # noqa: F811
    """A chat's second turn starts with its first turn and reply, which the server kept: usage's
    prompt_tokens_details.cached_tokens says how many prompt tokens were not computed, and /metrics adds them."""
    system = "You answer questions about fruit, briefly and kindly, in plain English. " * 6
    messages = [{"role": "system", "content": system}, {"role": "user", "content": CHAT}]
    first = client.chat.completions.create(model=base, messages=messages, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And a vegetable?"},
    ]
    before = _scrape(url)
    second = client.chat.completions.create(
        model=base,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in second if c.usage is not None][-1]
    cached = usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < usage.prompt_tokens
    after = _scrape(url)
    assert (
        after["lorakit_prompt_tokens_cached_total", ()] - before["lorakit_prompt_tokens_cached_total", ()]
        == cached
    )
    assert after["lorakit_prefix_cache_entries", ()] >= 1 and after["lorakit_prefix_cache_bytes", ()] > 0
