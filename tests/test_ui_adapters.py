"""`lorakit ui` over HTTP, what it does with adapters: chat with the base, an adapter and an exact weighted mix,
loading and unloading, variant adapters, combining, GGUF export and download, deleting, and the workspace listing
(the shared real server of test_ui.py: tests/uiserver.py, conftest's `ui`).
"""

from __future__ import annotations

import os

import pytest
from uiserver import SMALL_RUN, error, wait_for

# -- chat, mixes, adapters -------------------------------------------------------------------------------------


def _greedy(http, model: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "When?"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_chat_base_adapter_and_an_exact_weighted_mix(http, trained):
    base, adapted = _greedy(http, "tiny"), _greedy(http, trained)
    assert base != adapted
    whole = http.post("/api/mix", json={"weights": {trained: 1.0}}).json()
    assert whole["label"] == "t1=1" and _greedy(http, whole["name"]) == adapted  # ΔW·1 is the adapter itself
    assert http.post("/api/mix", json={"weights": {trained: 1.0}}).json() == whole  # made once
    half = http.post("/api/mix", json={"weights": {trained: 0.5}}).json()
    assert half["name"] != whole["name"]
    rows = {a["name"]: a for a in http.get("/api/adapters").json()["adapters"]}
    assert (
        rows[half["name"]]["mix"] == "t1=0.5"
        and rows[trained]["rank"] == 16
        and rows[trained]["kind"] == "LoRA"
    )
    assert rows[trained]["path"] == "runs/t1/adapter" and rows[trained]["size_bytes"] > 0
    assert "q_proj" in rows[trained]["targets"]
    assert "not a loaded adapter" in error(http.post("/api/mix", json={"weights": {"nope": 1}}), 404)
    assert "finite number" in error(http.post("/api/mix", json={"weights": {trained: "x"}}), 400)


def test_load_and_unload_from_the_workspace(http, trained):
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": "runs/t1/adapter"})
    assert r.status_code == 200
    assert "again" in [a["name"] for a in http.get("/api/adapters").json()["adapters"]]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "again"}).status_code == 200
    assert "again" not in [a["name"] for a in http.get("/api/adapters").json()["adapters"]]


@pytest.mark.parametrize(
    "flag, kind", [("lora_bias", "LoRA + lora_bias"), ("use_kasa", "LoRA + KaSA")], ids=["lora_bias", "kasa"]
)
def test_a_variant_adapter_is_listed_as_such_and_serves(ui, http, flag, kind):
    import torch
    from transformers import AutoModelForCausalLM

    import lorakit

    model = AutoModelForCausalLM.from_pretrained(ui["tmp"] / "tiny")
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"], **{flag: True}))
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.add_(0.05)
    lorakit.save_adapter(model, ui["ws"] / "runs" / "lb" / "adapter")
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "lb", "lora_path": "runs/lb/adapter"})
    assert r.status_code == 200, r.text
    try:
        rows = {a["name"]: a for a in http.get("/api/adapters").json()["adapters"]}
        assert rows["lb"]["kind"] == kind
        assert isinstance(_greedy(http, "lb"), str)
    finally:
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "lb"}).status_code == 200


def test_paths_out_of_the_workspace_are_refused_everywhere(ui, http, trained):
    ws, outside = ui["ws"], ui["tmp"] / "outside"
    os.symlink(outside, ws / "data" / "escape")
    for path in ("../outside", str(outside), "data/escape"):
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert r.status_code == 403, (path, r.text)
    for path in ("../outside/secret.jsonl", str(outside / "secret.jsonl"), "data/escape/secret.jsonl"):
        assert error(http.get("/api/download", params={"path": path}), 403)
        assert error(http.post("/api/preview", json={"file": path}), 403)
        assert error(http.post("/api/eval", json={"adapter": trained, "file": path}), 403)
    assert error(http.post("/api/combine", json={"sources": [trained], "out": "../x"}), 400)
    assert error(http.post("/api/export", json={"adapter": "../outside", "kind": "gguf"}), 403)
    assert "use 1-64 letters" in error(http.get("/api/runs/.hidden"), 400)


# -- combine, export, evaluate ---------------------------------------------------------------------------------


def test_combine_then_export_gguf_and_download_it(ui, http, trained):
    r = http.post(
        "/api/combine",
        json={
            "sources": [trained, "runs/t1/adapter"],
            "weights": [0.5, 0.5],
            "method": "linear",
            "out": "avg",
        },
    )
    assert r.json() == {"path": "adapters/avg"}, r.text
    assert (ui["ws"] / "adapters" / "avg" / "adapter_model.safetensors").is_file()
    assert "exists already" in error(
        http.post("/api/combine", json={"sources": [trained], "out": "avg"}), 409
    )
    assert "unknown combine method" in error(
        http.post("/api/combine", json={"sources": [trained], "method": "nope", "out": "x"}), 400
    )
    job = http.post("/api/export", json={"adapter": "adapters/avg", "kind": "gguf"}).json()["job"]
    state = wait_for(http, f"/api/jobs/{job}", lambda s: s["status"] != "running")
    assert state["status"] == "done" and state["result"]["path"] == "exports/adapters_avg-gguf.gguf", state
    blob = http.get("/api/download", params={"path": state["result"]["path"]})
    assert blob.status_code == 200 and blob.content[:4] == b"GGUF"
    folder = http.get("/api/download", params={"path": "adapters/avg"})
    assert folder.headers["content-disposition"].endswith('avg.zip"') and folder.content[:2] == b"PK"


def test_runs_and_workspace_entries_can_be_deleted_and_nothing_else(ui, http, trained):
    ws = ui["ws"]
    values = {**SMALL_RUN, "train": {"steps": "2", "batch_size": "2"}}
    assert http.post("/api/runs", json={"name": "gone", "values": values}).status_code == 200
    assert "is running: stop it first" in error(http.delete("/api/runs/gone"), 409)
    assert wait_for(http, "/api/runs/gone", lambda s: s["status"] not in ("starting", "running"))[
        "status"
    ] == ("finished")
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "gone", "lora_path": "runs/gone/adapter"})
    assert r.status_code == 200, r.text
    assert "adapter 'gone' is loaded from it: unload it first" in error(http.delete("/api/runs/gone"), 409)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "gone"}).status_code == 200
    assert http.delete("/api/runs/gone").json() == {"deleted": "runs/gone"}
    assert not (ws / "runs" / "gone").exists() and "gone" not in [
        r["name"] for r in http.get("/api/runs").json()["runs"]
    ]
    assert not [p for p in (ws / "runs").iterdir() if p.name.startswith(".")]  # nothing half-deleted left
    assert "no run named" in error(http.delete("/api/runs/gone"), 404)
    # workspace entries: a data file, and a combined adapter (refused while it is loaded)
    assert (
        http.post("/api/upload", params={"name": "del.jsonl"}, content=b'{"text": "x"}\n').status_code == 200
    )
    assert http.delete("/api/files", params={"path": "data/del.jsonl"}).json() == {
        "deleted": "data/del.jsonl"
    }
    assert not (ws / "data" / "del.jsonl").exists()
    assert http.post("/api/combine", json={"sources": [trained], "out": "delme"}).status_code == 200
    assert (
        http.post(
            "/v1/load_lora_adapter", json={"lora_name": "dm", "lora_path": "adapters/delme"}
        ).status_code
        == 200
    )
    assert "unload it first" in error(http.delete("/api/files", params={"path": "adapters/delme"}), 409)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "dm"}).status_code == 200
    assert http.delete("/api/files", params={"path": "adapters/delme"}).status_code == 200
    assert not (ws / "adapters" / "delme").exists()
    # a symlink goes, not what it points at
    (ws / "exports" / "keep.txt").write_text("kept")
    (ws / "data" / "link.jsonl").symlink_to(ws / "exports" / "keep.txt")
    assert http.delete("/api/files", params={"path": "data/link.jsonl"}).status_code == 200
    assert (
        not (ws / "data" / "link.jsonl").is_symlink() and (ws / "exports" / "keep.txt").read_text() == "kept"
    )
    # never a run's files, a top folder, or anything outside; a missing entry is a 404
    for path in ("runs/t1", "runs/t1/adapter", "data", "jobs", "../outside/secret.jsonl", "/etc/passwd"):
        assert "refused" in error(http.delete("/api/files", params={"path": path}), 403), path
    assert (ws / "runs" / "t1" / "adapter").is_dir() and (ui["tmp"] / "outside" / "secret.jsonl").is_file()
    assert "no such file" in error(http.delete("/api/files", params={"path": "data/none.jsonl"}), 404)


def test_the_workspace_lists_what_the_page_can_pick(http, trained):
    # its own upload, so that the file passes alone too (test_ui.py's uploads may be there as well)
    line = b'{"prompt": "1+1?", "completion": "2"}\n'
    assert http.post("/api/upload", params={"name": "listed.jsonl"}, content=line).status_code == 200
    listing = http.get("/api/workspace").json()
    assert {"path": "runs/t1/adapter"} in listing["adapters"]
    assert all("/checkpoints/" not in a["path"] for a in listing["adapters"])
    assert "t1" in listing["runs"] and any(d["path"] == "data/listed.jsonl" for d in listing["data"])
