"""The playground's jobs (evaluations and exports) over HTTP, on conftest's real `lorakit ui`: results, failures,
cancelling, the history (listed, kept across sessions of the UI, deletable). The history's reading of jobs/ from
an earlier session is also tested in-process, with a second `Jobs` over the same workspace, as a restarted UI
reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from uiserver import KEY, SMALL_RUN, error, ui_process, wait_for

from lorakit.serve import protocol as P
from lorakit.ui.jobs import EXIT, PROCESS, RECORD, Jobs
from lorakit.ui.runs import PROCESS as RUN_PROCESS
from lorakit.ui.workspace import Workspace


def test_an_export_that_fails_says_why(http):
    job = http.post("/api/export", json={"adapter": "data", "kind": "gguf", "out": "nothing"}).json()["job"]
    state = wait_for(http, f"/api/jobs/{job}", lambda s: s["status"] != "running")
    assert state["status"] == "failed" and "adapter_config.json" in state["error"], state


def test_evaluate_an_adapter_against_the_base(http, trained):
    job = http.post("/api/eval", json={"adapter": trained, "task": "dates", "limit": 4}).json()["job"]
    state = wait_for(http, f"/api/jobs/{job}", lambda s: s["status"] != "running")
    assert state["status"] == "done", state
    result = state["result"]
    assert result["examples"] == 4 and result["adapter"]["loss"] < result["base"]["loss"]
    assert result["base"]["accuracy"] is not None
    assert "unknown built-in task" in error(
        http.post("/api/eval", json={"adapter": trained, "task": "x"}), 400
    )


def test_a_job_can_be_cancelled_and_leaves_nothing_behind(ui, http, trained):
    exports = ui["ws"] / "exports"
    before = sorted(p.name for p in exports.iterdir()) if exports.is_dir() else []
    job = http.post("/api/eval", json={"adapter": trained, "task": "dates", "limit": 10_000}).json()["job"]
    # a moment to get into its work (the export below is cancelled during its imports)
    time.sleep(3)
    state = http.post(f"/api/jobs/{job}/cancel")
    assert state.status_code == 200 and state.json()["status"] in ("cancelling", "cancelled"), state.text
    assert "not running" in error(http.post(f"/api/jobs/{job}/cancel"), 409)
    done = wait_for(http, f"/api/jobs/{job}", lambda s: s["status"] != "cancelling", timeout=30)
    assert done["status"] == "cancelled" and done["result"] is None and done["error"] is None, done
    # an export cancelled at once: no file, no temporary
    job = http.post("/api/export", json={"adapter": trained, "kind": "merged", "out": "never"}).json()["job"]
    assert http.post(f"/api/jobs/{job}/cancel").status_code == 200
    done = wait_for(http, f"/api/jobs/{job}", lambda s: s["status"] != "cancelling", timeout=30)
    assert done["status"] == "cancelled", done
    assert sorted(p.name for p in exports.iterdir()) == before
    assert "no job" in error(http.post("/api/jobs/nope-1/cancel"), 404)
    assert http.get("/health").status_code == 200 and ui["proc"].poll() is None


def test_jobs_are_listed_newest_first_with_what_they_ran(ui, http, trained):
    ev = http.post("/api/eval", json={"adapter": trained, "task": "dates", "limit": 2}).json()["job"]
    out = http.post("/api/export", json={"adapter": trained, "kind": "merged", "out": "listed"}).json()["job"]
    for job in (ev, out):
        assert wait_for(http, f"/api/jobs/{job}", lambda s: s["status"] != "running")["status"] == "done"
    jobs = http.get("/api/jobs").json()["jobs"]
    ids = [j["id"] for j in jobs]
    assert ids.index(out) < ids.index(ev), "newest first"
    started = [j["started"] for j in jobs]
    assert started == sorted(started, reverse=True)
    (e,) = [j for j in jobs if j["id"] == ev]
    assert e["kind"] == "eval" and e["summary"] == {"adapter": "t1", "data": "task:dates", "limit": 2}, e
    assert e["result"]["examples"] == 2 and "log_tail" not in e and e["started"] <= e["ended"], e
    (x,) = [j for j in jobs if j["id"] == out]
    assert x["summary"] == {"adapter": "t1", "kind": "merged", "out": "exports/listed"}, x
    assert x["result"] == {"path": "exports/listed", "exists": True}, x
    evals = http.get("/api/jobs", params={"kind": "eval"}).json()["jobs"]
    assert ev in [j["id"] for j in evals] and {j["kind"] for j in evals} == {"eval"}
    assert "kind must be eval or export" in error(http.get("/api/jobs", params={"kind": "train"}), 400)
    # the export's file deleted from the workspace: the job stays, and says its file is gone
    assert http.delete("/api/files", params={"path": "exports/listed"}).status_code == 200
    assert http.get(f"/api/jobs/{out}").json()["result"] == {"path": "exports/listed", "exists": False}


def test_a_restarted_ui_reads_the_same_history(ui, http, trained):
    job = http.post("/api/eval", json={"adapter": trained, "task": "dates", "limit": 2}).json()["job"]
    wait_for(http, f"/api/jobs/{job}", lambda s: s["status"] != "running")
    # the record of its end is written by a watcher as the process exits: give it a moment
    deadline = time.monotonic() + 10
    while not (ui["ws"] / "jobs" / job / EXIT).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    served = {j["id"]: j for j in http.get("/api/jobs").json()["jobs"] if j["status"] != "running"}
    again = {j["id"]: j for j in Jobs(Workspace(ui["ws"])).list() if j["id"] in served}
    assert job in served and again == served


def test_a_job_whose_process_is_gone_without_an_end_shows_as_interrupted(ui, trained):
    """What a restarted UI finds of a job that died with its UI (the machine went down): a record, a process
    that is gone, no end. It cannot be cancelled, and can be deleted."""
    ws = Workspace(ui["tmp"] / "ws-interrupted")
    first = Jobs(ws)
    adapter = str(ui["ws"] / "runs" / trained / "adapter")
    argv = [
        "eval",
        "--task",
        "dates",
        "--adapter",
        adapter,
        "--limit",
        "1",
        "--model",
        str(ui["tmp"] / "tiny"),
    ]
    job = first.start("eval", argv, summary={"adapter": trained})
    deadline = time.monotonic() + 60
    while not (ws.root / "jobs" / job / EXIT).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    (ws.root / "jobs" / job / EXIT).unlink()  # its end was never written
    later = Jobs(ws)
    state = later.state(job)
    assert state["status"] == "interrupted" and "the UI stopped" in state["error"], state
    assert state["summary"] == {"adapter": trained} and state["result"] is None
    with pytest.raises(P.APIError, match="not running") as refused:
        later.cancel(job)
    assert refused.value.status == 409
    assert later.delete(job) == job and not (ws.root / "jobs" / job).exists()
    with pytest.raises(P.APIError, match="no job") as gone:
        later.state(job)
    assert gone.value.status == 404


def test_a_ui_killed_mid_work_leaves_its_run_and_job_to_the_next(ui, trained, tmp_path):
    """`kill -9` of a real `lorakit ui` while a run trains and an evaluation runs: both go on (they run in their
    own sessions), and the next `lorakit ui` on the workspace adopts them. It shows them running (the run's steps
    still growing), Stop and cancel reach them, their ends are recorded, and no process of either is left. A
    process that merely has the recorded pid is not adopted (tests/test_ui_procs.py)."""
    ws = tmp_path / "ws"
    shutil.copytree(ui["ws"] / "runs" / trained / "adapter", ws / "adapters" / "t1")
    args = [
        "--model",
        str(ui["tmp"] / "tiny"),
        "--workspace",
        str(ws),
        "--api-key",
        KEY,
        "--dtype",
        "float32",
    ]
    values = {**SMALL_RUN, "train": {"steps": "5000", "batch_size": "2", "save_every": "0"}}
    auth = {"Authorization": f"Bearer {KEY}"}
    with ui_process(args, tmp_path / "first.log") as (url, first):
        with httpx.Client(base_url=url, headers=auth, timeout=60) as c:
            assert c.post("/api/runs", json={"name": "r", "values": values}).status_code == 200
            body = {"adapter": "adapters/t1", "task": "dates", "limit": 10_000}
            job = c.post("/api/eval", json=body).json()["job"]
            wait_for(c, "/api/runs/r", lambda s: s["step"] >= 3)
        # a second UI on the same workspace is refused while the first lives (each would adopt the other's runs)
        busy = subprocess.run(
            [sys.executable, "-m", "lorakit", "ui", "--workspace", str(ws), "--port", "7999"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert busy.returncode != 0, busy.stdout
        assert f"is in use by another lorakit ui (pid {first.pid})" in busy.stderr, busy.stderr[-2000:]
        first.kill()  # no shutdown: nothing stops the children; its claim on the workspace stays, stale
        first.wait()
    pids = [
        json.loads((ws / "runs" / "r" / RUN_PROCESS).read_text())["pid"],
        json.loads((ws / "jobs" / job / PROCESS).read_text())["pid"],
    ]
    for pid in pids:
        os.killpg(pid, 0)  # both still run
    assert not (ws / "jobs" / job / EXIT).exists()
    with ui_process(args, tmp_path / "second.log") as (url, _), httpx.Client(base_url=url, headers=auth) as c:
        run = c.get("/api/runs/r").json()
        assert run["status"] == "running", run
        wait_for(c, "/api/runs/r", lambda s: s["step"] > run["step"] and s["eta_s"] is not None)
        assert c.get(f"/api/jobs/{job}").json()["status"] == "running"
        assert c.post(f"/api/jobs/{job}/cancel").status_code == 200
        assert c.post("/api/runs/r/stop").status_code == 200
        done = wait_for(
            c, f"/api/jobs/{job}", lambda s: s["status"] not in ("running", "cancelling"), timeout=60
        )
        assert done["status"] == "cancelled", done
        stopped = wait_for(c, "/api/runs/r", lambda s: s["status"] != "stopping", timeout=150)
        assert stopped["status"] == "stopped" and stopped["has_checkpoint"], stopped
        # the end is recorded by the adopter's watcher, which polls the process: give it a moment
        deadline = time.monotonic() + 10
        while not (ws / "jobs" / job / EXIT).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        end = json.loads((ws / "jobs" / job / EXIT).read_text())
        assert end["cancelled"] and end["adopted"], end
    for pid in pids:  # no process of either group is left (exited orphans are reaped by init: a moment)
        deadline = time.monotonic() + 10
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_jobs_can_be_deleted_once_they_ended(ui, http, trained):
    job = http.post("/api/eval", json={"adapter": trained, "task": "dates", "limit": 10_000}).json()["job"]
    assert "is running: cancel it first" in error(http.delete(f"/api/jobs/{job}"), 409)
    assert (ui["ws"] / "jobs" / job).is_dir()
    http.post(f"/api/jobs/{job}/cancel")
    wait_for(http, f"/api/jobs/{job}", lambda s: s["status"] not in ("running", "cancelling"), timeout=30)
    assert http.delete(f"/api/jobs/{job}").json() == {"deleted": job}
    assert not (ui["ws"] / "jobs" / job).exists()
    assert job not in [j["id"] for j in http.get("/api/jobs").json()["jobs"]]
    assert "no job" in error(http.get(f"/api/jobs/{job}"), 404)
    assert "no job" in error(http.delete(f"/api/jobs/{job}"), 404)


def test_a_folder_of_jobs_without_a_record_is_listed_as_unknown(tmp_path):
    """An older lorakit's job folder (output, no job.json), or a record that is not one of ours: listed, so the
    page can delete it, and never read as a result; a record naming a file outside the workspace is refused."""
    ws = Workspace(tmp_path / "ws")
    (ws.root / "jobs" / "eval-1700000000-1").mkdir()
    (ws.root / "jobs" / "eval-1700000000-1" / "stdout.txt").write_text('{"examples": 1}\n')
    bad = ws.root / "jobs" / "export-1700000000-2"
    bad.mkdir()
    record = {"kind": "export", "command": "merge", "started": 1.0, "summary": {}, "result_file": "../../etc"}
    (bad / RECORD).write_text(json.dumps(record))
    (ws.root / "jobs" / ".zips").mkdir()  # downloads' zips: not a job
    jobs = Jobs(ws)
    listed = {j["id"]: j for j in jobs.list()}
    assert sorted(listed) == ["eval-1700000000-1", "export-1700000000-2"]
    assert all(j["status"] == "unknown" and j["result"] is None for j in listed.values()), listed
    assert jobs.delete("eval-1700000000-1") == "eval-1700000000-1"
    assert sorted(p.name for p in (ws.root / "jobs").iterdir()) == [".zips", "export-1700000000-2"]
