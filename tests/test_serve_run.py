"""`lorakit.serve.run`, the process's last step before uvicorn serves: what it sets up for a long-lived server."""

from __future__ import annotations

import gc

import uvicorn

from lorakit.serve import ServeConfig, run


class _Cycle:
    """An object in a reference cycle: only the cyclic collector frees it, so a frozen one stays."""

    def __init__(self) -> None:
        self.me = self


def test_run_freezes_what_start_up_made_before_uvicorn_serves(monkeypatch):
    """The model and the start-up adapters live as long as the server: gc.freeze() takes them out of every full
    collection (about 0.1 s each for SmolLM2, bench_load.py). uvicorn.run is replaced (third-party code) so that
    the test sees the collector's state at the moment serving would start."""
    seen = {}

    def serve(app, **options):
        seen["frozen"] = gc.get_freeze_count()
        seen["cycle_frozen"] = not any(o is cycle for o in gc.get_objects())  # frozen objects are not listed
        seen["options"] = options

    monkeypatch.setattr(uvicorn, "run", serve)
    cycle = _Cycle()
    gc.unfreeze()
    try:
        run(object(), ServeConfig(port=8123))
    finally:
        gc.unfreeze()  # give this test process its collector back
    assert seen["frozen"] > 0 and seen["cycle_frozen"]
    assert seen["options"]["port"] == 8123 and seen["options"]["timeout_keep_alive"] == 30
