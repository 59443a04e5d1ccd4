"""Adopting a process an earlier UI started (`lorakit.ui.procs`), on real processes: it is adopted only while
that very process runs (its pid, start time and boot match), polled and waited for through /proc, and judged
once gone. The whole story (a `lorakit ui` killed, the next one adopting its run and job) is in test_ui_jobs.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lorakit.ui.procs import adopt, identity, record_process

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="adoption reads /proc (Linux)")


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_running_process_is_adopted_and_judged_once_gone(sleeper, tmp_path):
    path = tmp_path / "process.json"
    record_process(path, sleeper, base_step=7)
    record = json.loads(path.read_text())
    assert record["pid"] == sleeper.pid and record["base_step"] == 7 and record["start"] > 0
    adopted = adopt(path, judge=lambda: 3)
    assert adopted is not None and adopted.pid == sleeper.pid and adopted.record["base_step"] == 7
    assert adopted.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        adopted.wait(0.5)
    os.killpg(adopted.pid, signal.SIGINT)  # as the UI stops it
    sleeper.wait(10)  # (here it is our child: reap it, as init does for a real orphan)
    assert adopted.wait(10) == 3 and adopted.poll() == 3  # gone: its status is the judge's
    assert adopt(path, judge=lambda: 0) is None  # nothing left to adopt


def test_another_process_with_the_recorded_pid_is_not_adopted(sleeper, tmp_path):
    """pid reuse: a record whose start time or boot is not the running process's is stale."""
    path = tmp_path / "process.json"
    record_process(path, sleeper)
    record = json.loads(path.read_text())
    for stale in ({**record, "start": record["start"] - 1}, {**record, "boot": "another-boot"}):
        path.write_text(json.dumps(stale))
        assert adopt(path, judge=lambda: 0) is None, stale
    path.write_text(json.dumps(record))
    assert adopt(path, judge=lambda: 0) is not None


@pytest.mark.parametrize(
    "text", ["", "not json", "[1, 2]", '{"pid": "1"}', '{"pid": 0}', '{"pid": -5}', '{"pid": true}']
)
def test_unreadable_records_adopt_nothing(tmp_path, text):
    path = tmp_path / "process.json"
    path.write_text(text)
    assert adopt(path, judge=lambda: 0) is None
    assert adopt(tmp_path / "missing.json", judge=lambda: 0) is None


def test_an_exited_process_has_no_identity():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while identity(proc.pid) is not None and time.monotonic() < deadline:  # a zombie until reaped: exited
        time.sleep(0.05)
    assert identity(proc.pid) is None
    proc.wait()
    assert identity(os.getpid()) is not None


def test_a_workspace_is_claimed_by_one_live_ui(sleeper, tmp_path):
    from lorakit.ui.procs import WorkspaceBusy, claim, release

    path = tmp_path / ".ui.json"
    record_process(path, sleeper)  # another live process holds it
    with pytest.raises(WorkspaceBusy, match=f"pid {sleeper.pid}"):
        claim(path)
    assert json.loads(path.read_text())["pid"] == sleeper.pid  # refused: the record stays the other's
    release(path)
    assert path.exists()  # not ours to remove
    os.killpg(sleeper.pid, signal.SIGKILL)
    sleeper.wait()
    claim(path)  # the holder is gone: taken over
    assert json.loads(path.read_text())["pid"] == os.getpid()
    claim(path)  # ours already: fine
    release(path)
    assert not path.exists()
