"""`GET /metrics` of `lorakit serve`: the engine's counters and gauges, and request latencies, in Prometheus's text
exposition format (version 0.0.4), for a Prometheus server or any scraper that reads it.

    latency = Latency()
    latency.observe("chat", "first_event", 0.12)       # by the generation routes
    text = render(engine, latency)                     # what /metrics answers

Counters only grow while the server runs (a restart starts them at 0, as Prometheus expects of counters).
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Upper bounds (seconds) of the latency histograms' buckets, and +Inf."""

COUNTERS = {
    "requests": ("lorakit_requests", "Generation rows admitted (one per choice of each prompt)."),
    "errors": ("lorakit_request_errors", "Failures: requests, rows or batches that failed."),
    "prompt_tokens": ("lorakit_prompt_tokens", "Prompt tokens of the rows prefilled."),
    "cached_prompt_tokens": (
        "lorakit_prompt_tokens_cached",
        "Prompt tokens whose KV cache came from the prefix cache (not computed).",
    ),
    "generated_tokens": ("lorakit_generated_tokens", "Tokens sampled (end-of-sequence tokens included)."),
    "prefills": ("lorakit_prefills", "Prefill forward passes."),
    "prefill_chunks": (
        "lorakit_prefill_chunks",
        "Forward passes computing a chunk of a long prompt before its prefill (--prefill-chunk).",
    ),
    "shared_prefills": (
        "lorakit_shared_prefill_rows",
        "Rows whose prompt another row of the prefill computed.",
    ),
    "shared_starts": (
        "lorakit_shared_prompt_starts",
        "Starts shared by prompts of one prefill, computed once before it (see the prefix cache).",
    ),
    "steps": ("lorakit_decode_steps", "Decode steps (one forward pass for every running row)."),
}
BANK_COUNTERS = {
    "loads": (
        "lorakit_adapter_loads",
        "Adapters loaded: at start-up, by the load route, in place or on demand.",
    ),
    "load_seconds": ("lorakit_adapter_load_seconds", "Seconds the loads took (read, check, build), in all."),
    "refused": (
        "lorakit_adapter_loads_refused",
        "Loads refused: a bad file, or a full bank every adapter of which is held.",
    ),
    "replaced": (
        "lorakit_adapter_loads_in_place",
        "Loads that replaced a loaded adapter in place (load_inplace).",
    ),
    "unloads": ("lorakit_adapter_unloads", "Adapters unloaded by the unload route."),
    "evictions": (
        "lorakit_adapter_evictions",
        "Adapters unloaded to make room for another (--max-adapters).",
    ),
}


class Latency:
    """Histograms of request latencies by endpoint and phase: `first_event` (from the request's arrival to the
    engine's first answer for it: a token, its prompt's scores or an error) and `total` (to the last byte)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hist: dict[tuple[str, str], list[Any]] = {}  # (endpoint, phase) -> [bucket counts, count, sum]

    def observe(self, endpoint: str, phase: str, seconds: float) -> None:
        with self._lock:
            counts, total = self._hist.setdefault((endpoint, phase), [[0] * (len(BUCKETS) + 1), [0, 0.0]])
            counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            total[0] += 1
            total[1] += seconds

    def lines(self) -> list[str]:
        out = [
            "# HELP lorakit_request_seconds Request latency by endpoint and phase (first_event, total).",
            "# TYPE lorakit_request_seconds histogram",
        ]
        with self._lock:
            items = sorted((k, [list(v[0]), list(v[1])]) for k, v in self._hist.items())
        for (endpoint, phase), (counts, (count, seconds)) in items:
            labels = f'endpoint="{endpoint}",phase="{phase}"'
            running = 0
            for bound, n in zip((*BUCKETS, float("inf")), counts, strict=True):
                running += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f'lorakit_request_seconds_bucket{{{labels},le="{le}"}} {running}')
            out.append(f"lorakit_request_seconds_count{{{labels}}} {count}")
            out.append(f"lorakit_request_seconds_sum{{{labels}}} {seconds!r}")
        return out


def render(engine, latency: Latency, on_demand_loads: int = 0) -> str:
    """The exposition text: counters from `engine.stats` and its bank's, gauges of its load and bank, the latency
    histograms. `on_demand_loads`: the loads that requests made (`--load-on-demand`)."""
    stats, bank, load = dict(engine.stats), dict(engine.bank.stats), engine.load()
    lines = []
    counters = [(name, doc, stats.get(key, 0)) for key, (name, doc) in COUNTERS.items()]
    counters += [(name, doc, bank.get(key, 0)) for key, (name, doc) in BANK_COUNTERS.items()]
    counters.append(
        (
            "lorakit_adapter_loads_on_demand",
            "Loads made for a request naming an adapter not loaded.",
            on_demand_loads,
        )
    )
    for name, doc, value in counters:
        lines += [f"# HELP {name}_total {doc}", f"# TYPE {name}_total counter", f"{name}_total {value!r}"]
    gauges = {
        "lorakit_engine_up": ("1 while the engine thread runs, else 0.", int(engine.alive)),
        "lorakit_running_rows": ("Rows decoding now.", load["running"]),
        "lorakit_waiting_requests": ("Rows queued for a place in the batch.", load["waiting"]),
        "lorakit_adapters_loaded": ("Adapters the server serves by name.", len(engine.bank.names())),
        "lorakit_adapters_unloading": (
            "Adapters unloaded but kept for requests in flight.",
            len(load["unloading"]),
        ),
        "lorakit_max_batch_rows_seen": ("Most rows decoded in one step so far.", stats.get("max_rows", 0)),
        "lorakit_prefix_cache_bytes": ("Bytes of KV cache the prefix cache holds.", engine.prefixes.nbytes),
        "lorakit_prefix_cache_entries": ("Sequences the prefix cache holds.", len(engine.prefixes)),
    }
    for name, (doc, value) in gauges.items():
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} gauge", f"{name} {value}"]
    return "\n".join(lines + latency.lines()) + "\n"


__all__ = ["BANK_COUNTERS", "BUCKETS", "COUNTERS", "Latency", "render"]
