"""`lorakit ui` over HTTP: a real server in a subprocess (tests/uiserver.py), on a tiny model with the real
tokenizer, with an API key and a small upload limit. Training, evaluation and export run as real `lorakit`
subprocesses of it. The page itself is driven in Chromium by test_ui_browser.py; the workspace's path checks
are also tested in-process below.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
from uiserver import SMALL_RUN, UPLOAD_LIMIT_MB, error, events, ui_process, wait_for

from lorakit.serve import protocol as P
from lorakit.train.config import load_config
from lorakit.train.fields import field_specs
from lorakit.ui.schema import form_schema
from lorakit.ui.workspace import Workspace, check_name

# -- the page, the key, the form -------------------------------------------------------------------------------


def test_the_page_needs_no_key_and_the_api_does(ui, http):
    page = httpx.get(ui["url"] + "/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    for src in ("app.js", "chart.js", "style.css"):  # shipped in the package, referenced by the page
        assert f"static/{src}" in page.text
        assert httpx.get(f"{ui['url']}/static/{src}").status_code == 200
    assert "http://" not in page.text.replace("http://www.w3.org", "") and "https://" not in page.text
    assert error(httpx.get(ui["url"] + "/api/info"), 401).startswith("missing or wrong API key")
    assert httpx.get(ui["url"] + "/v1/models").status_code == 401
    info = http.get("/api/info").json()
    assert info["base_name"] == "tiny" and info["auth"] and info["dtype"] == "float32"
    assert "cat" in info["combine_methods"] and info["tasks"] == ["dates"]
    assert info["max_model_len"] == 512  # the tiny model's max_position_embeddings: no --max-model-len here


def test_the_form_is_every_train_option_with_its_default_and_doc():
    schema = {s["name"]: s for s in form_schema()["sections"]}
    for section, specs in field_specs().items():
        fields = {f["name"]: f for f in schema[section]["fields"]}
        assert list(fields) == [s.name for s in specs]
        for spec in specs:
            assert fields[spec.name]["doc"] == spec.doc and spec.doc
    assert schema["dylora"]["method"] == "dylora" and schema["train"]["method"] is None
    train = {f["name"]: f for f in schema["train"]["fields"]}
    assert train["out_dir"]["locked"] and train["resume"]["locked"] and not train["steps"]["locked"]
    assert train["steps"] == {**train["steps"], "type": "int", "default": 40}
    assert "adalora+loraplus" in train["method"]["choices"]
    init = next(f for f in schema["lora"]["fields"] if f["name"] == "init")
    assert init["default"] == "default" and {"pissa", "eva", "random"} <= set(init["choices"])
    # lists travel as command-line text, which parses back to the default
    skip = next(f for f in schema["model"]["fields"] if f["name"] == "quantize_skip")
    assert skip["type"] == "list" and skip["default"] == "[lm_head]"
    assert load_config(None, ["--model.quantize_skip", skip["default"]]).model.quantize_skip == ["lm_head"]


# -- data ------------------------------------------------------------------------------------------------------


def test_an_upload_is_checked_line_by_line_and_written_whole(ui, http):
    good = b'{"prompt": "2+2?", "completion": "4"}\n{"prompt": "3+3?", "completion": "6"}\n'
    r = http.post("/api/upload", params={"name": "sums.jsonl"}, content=good)
    assert r.json() == {"path": "data/sums.jsonl", "examples": 2, "pairs": False}
    assert (ui["ws"] / "data" / "sums.jsonl").read_bytes() == good
    bad = b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n'
    message = error(http.post("/api/upload", params={"name": "bad.jsonl"}, content=bad), 400)
    assert message.startswith("bad.jsonl:2: unknown fields ['prompt']")
    assert not (ui["ws"] / "data" / "bad.jsonl").exists()
    big = b'{"text": "' + b"x" * int(UPLOAD_LIMIT_MB * 2**20) + b'"}\n'
    assert "limit" in error(http.post("/api/upload", params={"name": "big.jsonl"}, content=big), 413)
    assert error(http.post("/api/upload", params={"name": "sums.jsonl"}, content=good), 409)
    for name in ("../x.jsonl", "x.txt", ".hidden.jsonl", ""):
        assert error(http.post("/api/upload", params={"name": name}, content=good), 400)
    left = {p.name for p in (ui["ws"] / "data").iterdir()}  # other tests' uploads may be there too
    assert not left & {"bad.jsonl", "big.jsonl", "x.jsonl"} and not [n for n in left if n[0] == "."]  # no tmp


def test_the_preview_marks_what_the_loss_learns(http):
    http.post(
        "/api/upload",
        params={"name": "qa.jsonl"},
        content=b'{"prompt": "Capital of France?", "completion": "Paris"}\n',
    )
    out = http.post("/api/preview", json={"file": "data/qa.jsonl"}).json()
    (ex,) = out["examples"]
    learned = "".join(s["text"] for s in ex["segments"] if s["learned"])
    read = "".join(s["text"] for s in ex["segments"] if not s["learned"])
    assert learned.startswith("Paris") and "Capital of France?" in read and "<|im_start|>assistant" in read
    assert 0 < ex["learned_tokens"] < ex["tokens"]
    everything = http.post("/api/preview", json={"file": "data/qa.jsonl", "train_on_all": True}).json()
    assert all(s["learned"] for s in everything["examples"][0]["segments"])
    task = http.post("/api/preview", json={"task": "dates", "n": 2}).json()
    assert len(task["examples"]) == 2


def test_alpaca_csv_and_parquet_uploads_are_data_files_too(ui, http):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    alpaca = b'[{"instruction": "Capital of France?", "input": "", "output": "Paris"}]'
    assert http.post("/api/upload", params={"name": "al.json"}, content=alpaca).json()["examples"] == 1
    csv = b"prompt,completion\n2+2?,4\n3+3?,6\n"
    assert http.post("/api/upload", params={"name": "sums.csv"}, content=csv).json()["examples"] == 2
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"text": "hello"}]), buf)
    r = http.post("/api/upload", params={"name": "t.parquet"}, content=buf.getvalue())
    assert r.json() == {"path": "data/t.parquet", "examples": 1, "pairs": False}
    listed = {d["path"] for d in http.get("/api/workspace").json()["data"]}
    assert {"data/al.json", "data/sums.csv", "data/t.parquet"} <= listed
    out = http.post("/api/preview", json={"file": "data/al.json"}).json()
    learned = "".join(s["text"] for s in out["examples"][0]["segments"] if s["learned"])
    assert learned.startswith("Paris")
    bad = error(http.post("/api/upload", params={"name": "bad.csv"}, content=b"prompt,completion\na\n"), 400)
    assert bad.startswith("bad.csv:2: 1 cells in a file of 2 columns")
    qa = b"question,answer\nCapital of Spain?,Madrid\n"
    assert error(http.post("/api/upload", params={"name": "qa.csv"}, content=qa), 400).startswith(
        "qa.csv:2: unknown fields ['answer', 'question']"
    )
    fields = "{prompt: question, completion: answer}"  # the form's text for data.fields
    r = http.post("/api/upload", params={"name": "qa.csv", "fields": fields}, content=qa)
    assert r.json() == {"path": "data/qa.csv", "examples": 1, "pairs": False}
    out = http.post("/api/preview", json={"file": "data/qa.csv", "fields": fields}).json()
    learned = "".join(s["text"] for s in out["examples"][0]["segments"] if s["learned"])
    assert learned.startswith("Madrid")
    for wrong in ("{prompt: nope}", "[1]", "{a: b"):
        assert "data" in error(http.post("/api/preview", json={"file": "data/qa.csv", "fields": wrong}), 400)


# -- runs ------------------------------------------------------------------------------------------------------


def test_bad_form_values_are_one_line_errors_and_start_nothing(ui, http):
    def start(values, name="bad", status=400):
        return error(http.post("/api/runs", json={"name": name, "values": values}), status)

    assert start({"train": {"steps": "abc"}}) == "--train.steps: expected an integer, got 'abc'"
    assert "did you mean 'steps'" in start({"train": {"stepz": "3"}})
    assert "set by the playground" in start({"train": {"out_dir": "/tmp/x"}})
    assert "set by the playground" in start({"train": {"resume": "auto"}})
    assert "'..'" in start({"data": {"train_file": "../outside/secret.jsonl"}}, status=403)
    assert "relative to the workspace" in start({"data": {"train_file": "/etc/passwd"}}, status=403)
    assert "use 1-64 letters" in start({}, name="../up")
    assert not (ui["ws"] / "runs" / "bad").exists()


def test_a_run_streams_its_curve_stops_with_a_checkpoint_and_resumes(ui, http):
    values = {**SMALL_RUN, "train": {"steps": "400", "batch_size": "2", "save_every": "0"}}
    r = http.post("/api/runs", json={"name": "long", "values": values})
    assert r.status_code == 200 and r.json()["status"] == "starting"
    assert error(http.post("/api/runs", json={"name": "long", "values": values}), 409)

    def running_with_points(pairs) -> bool:
        points = sum(k == "metric" and "loss" in d for k, d in pairs)
        return points >= 5 and any(k == "status" and d["status"] == "running" for k, d in pairs)

    got = events(http, "long", until=running_with_points)
    losses = [d for k, d in got if k == "metric" and "loss" in d]
    assert len(losses) >= 5 and [d["step"] for d in losses] == list(range(1, len(losses) + 1))
    assert any(k == "status" and d["status"] == "running" for k, d in got)

    assert http.post("/api/runs/long/stop").json()["status"] in ("stopping", "stopped")
    stopped = wait_for(http, "/api/runs/long", lambda s: s["status"] not in ("running", "stopping"))
    assert stopped["status"] == "stopped" and stopped["has_checkpoint"], stopped
    assert 5 <= stopped["step"] < 400
    assert error(http.post("/api/runs/long/stop"), 409)

    assert http.post("/api/runs/long/resume").json()["status"] in ("starting", "running")
    assert error(http.post("/api/runs/long/resume"), 409)  # running already
    done = wait_for(http, "/api/runs/long", lambda s: s["status"] not in ("starting", "running"), timeout=300)
    assert done["status"] == "finished" and done["summary"]["after"], done
    # the page replays the whole curve after a reload: every step once, the resumed ones continuing the count
    replay = events(http, "long", until=lambda ps: False)
    steps = [d["step"] for k, d in replay if k == "metric" and "loss" in d]
    assert steps == list(range(1, 401)) and replay[-1][0] == "end"
    assert any("eval_loss" in d for k, d in replay if k == "metric")
    # the resolved config repeats the run from the command line
    r = http.get("/api/runs/long/config.yaml")
    assert "attachment" in r.headers["content-disposition"]
    (ui["tmp"] / "again.yaml").write_bytes(r.content)
    again = load_config(ui["tmp"] / "again.yaml", [])
    assert again.train.steps == 400 and again.model.path.endswith("tiny") and again.model.dtype == "float32"


def _records(http, name: str, last_event_id: str | None = None) -> list[tuple[str | None, dict]]:
    """(id, record) of each metric event of a finished run's stream, read to its end."""
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    out, event_id = [], None
    with http.stream("GET", f"/api/runs/{name}/events", headers=headers) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("id: "):
                event_id = line.removeprefix("id: ")
            elif line.startswith("data: ") and event_id is not None:
                out.append((event_id, json.loads(line.removeprefix("data: "))))
                event_id = None
    return out


def test_a_reconnecting_stream_resumes_after_its_last_event_id(ui, http, trained):
    every = _records(http, trained)
    assert [d["step"] for _, d in every if "loss" in d] == list(range(1, 31))
    metrics = (ui["ws"] / "runs" / trained / "metrics.jsonl").read_bytes()
    assert int(every[-1][0]) == len(metrics)  # each id is the byte offset after its line
    for k in (0, 9, len(every) - 1):
        again = _records(http, trained, every[k][0])
        assert again == every[k + 1 :], k  # exactly the records after the one named, with the same ids
    assert _records(http, trained, "0") == every
    # an offset that is not a line end this stream gave out: one line, naming the header and the file
    for bad in ("x", "-1", str(len(metrics) + 1), str(int(every[0][0]) - 1), b"\xb2", "1e3"):
        r = http.get(f"/api/runs/{trained}/events", headers={"Last-Event-ID": bad})
        assert "Last-Event-ID" in error(r, 400) and "metrics.jsonl" in r.json()["error"]["message"], bad


def test_a_crashing_run_fails_alone_with_its_error(ui, http):
    values = {**SMALL_RUN, "lora": {"targets": "[no_such_proj]"}}
    assert http.post("/api/runs", json={"name": "crash", "values": values}).status_code == 200
    state = wait_for(http, "/api/runs/crash", lambda s: s["status"] not in ("starting", "running"))
    assert state["status"] == "failed" and "no_such_proj" in state["error"], state
    assert error(http.post("/api/runs/crash/resume"), 409).endswith("start a new run")
    assert httpx.get(ui["url"] + "/health").status_code == 200 and ui["proc"].poll() is None


# -- the workspace's path checks, in-process -------------------------------------------------------------------


def test_workspace_paths(tmp_path):
    ws = Workspace(tmp_path / "ws")
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "out", ws.root / "data" / "link")
    (ws.root / "data" / "ok.jsonl").write_text("{}")
    assert ws.path("data/ok.jsonl") == ws.root / "data" / "ok.jsonl"
    refusals = {
        "../out": "'..'",
        "/etc/passwd": "relative to the workspace",
        "~/x": "relative to the workspace",
        "data/link": "outside the workspace",
        "a\x00b": "NUL",
    }
    for rel, why in refusals.items():
        with pytest.raises(P.APIError) as e:
            ws.path(rel)
        assert e.value.status == 403 and why in e.value.message, (rel, e.value.message)
    with pytest.raises(P.APIError) as e:
        ws.path("data/none.jsonl")
    assert e.value.status == 404
    for name in ("ok", "a.b-c_d", "X" * 64):
        assert check_name(name, "run") == name
    for name in ("", ".x", "a/b", "..", "X" * 65, 3, None):
        with pytest.raises(P.APIError):
            check_name(name, "run")


def test_runs_from_an_earlier_session_show_up(tmp_path):
    """The UI reads a run's state from its folder, so a restart finds finished and stopped runs."""
    from lorakit.ui.runs import Runs

    ws = Workspace(tmp_path / "ws")
    finished, stopped = ws.root / "runs" / "a", ws.root / "runs" / "b"
    for f in (finished, stopped):
        f.mkdir()
        (f / "request.yaml").write_text("train:\n  steps: 4\n")
        (f / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "elapsed_s": 1.0}\n{"step": 2, "lo')
    (finished / "summary.json").write_text("{}")
    (stopped / "checkpoints" / "step-000001").mkdir(parents=True)
    runs = Runs(ws)
    a, b = runs.state("a"), runs.state("b")
    assert a["status"] == "finished" and a["step"] == 1  # the half-written line is not read yet
    assert b["status"] == "stopped" and b["has_checkpoint"] and b["steps"] == 4
    assert runs.names() == ["a", "b"] and not runs.live


def test_stopping_the_ui_stops_its_runs_with_a_checkpoint_and_cancels_its_jobs(ui, trained, tmp_path):
    """What `lorakit ui` does on its way out (ui.run's finally), in-process on a workspace of its own: each run
    gets Ctrl-C, writes its checkpoint and stops; each job is cancelled; no process of either group is left."""
    from lorakit.ui.jobs import Jobs
    from lorakit.ui.runs import Runs

    tiny = str(ui["tmp"] / "tiny")
    ws = Workspace(tmp_path / "ws")
    runs, jobs = Runs(ws, train_args=["--model.path", tiny, "--model.dtype", "float32"]), Jobs(ws)
    values = {**SMALL_RUN, "train": {"steps": "400", "batch_size": "2", "save_every": "0"}}
    runs.start("r", values)
    adapter = str(ui["ws"] / "runs" / trained / "adapter")
    job = jobs.start(
        "eval", ["eval", "--task", "dates", "--adapter", adapter, "--limit", "10000", "--model", tiny]
    )
    deadline = time.monotonic() + 120
    while runs.state("r")["step"] < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = [runs.live["r"].proc.pid, jobs.jobs[job].proc.pid]
    jobs.shutdown()
    runs.shutdown()
    state = runs.state("r")
    assert state["status"] == "stopped" and state["has_checkpoint"] and 3 <= state["step"] < 400, state
    assert jobs.state(job)["status"] == "cancelled" and Jobs(ws).state(job)["status"] == "cancelled"
    for pid in pids:  # each child led its own process group: none of it is left
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


# -- the real default model ------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_the_playground_on_the_default_model(tmp_path):
    """`lorakit ui` with no --model serves SmolLM2-135M-Instruct: the page's info, a preview through its chat
    template, and a chat answer. (scripts/ui_screenshots.py trains, chats and evaluates on it in the browser.)"""
    log = tmp_path / "ui.log"
    with (
        ui_process(["--workspace", str(tmp_path / "ws")], log) as (url, _),
        httpx.Client(base_url=url, timeout=120) as c,
    ):
        info = c.get("/api/info").json()
        assert info["base_name"] == "SmolLM2-135M-Instruct" and info["model_path"] is None
        (ex,) = c.post("/api/preview", json={"task": "dates", "n": 1}).json()["examples"]
        assert "<|im_start|>assistant" in "".join(s["text"] for s in ex["segments"] if not s["learned"])
        body = {
            "model": info["base_name"],
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 4,
        }
        answer = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        assert answer.strip()
