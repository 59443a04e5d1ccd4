"""Screenshots of the playground's four views on the real default model, for docs/ui.md.

    .venv/bin/python scripts/ui_screenshots.py            # writes docs/ui-{train,chat,adapters,eval}.png

It starts `lorakit ui` on SmolLM2-135M-Instruct with a fresh workspace, then drives the page in headless
Chromium as a person would: trains an adapter on the built-in task from the form (watching the curves), loads
it, asks base and adapter the same question side by side and a follow-up, and evaluates the adapter against
the base; it prints the evaluation's figures and the chat's answers. About five
minutes on 2 CPU cores. Needs Playwright and Debian's chromium (bash scripts/setup.sh test).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Rewrite this date in ISO format (YYYY-MM-DD), answer with the date only: the 2nd of July, 1998"  # the task's phrasing
FOLLOW_UP = (
    "And the 14th of March, 2001?"  # a second turn: each column answers with its own first answer in view
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder for the PNG files (default: docs/)")
    ap.add_argument("--steps", type=int, default=30, help="training steps (default: 30)")
    args = ap.parse_args()
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp, _ui(Path(tmp)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(900_000)
        page.goto(url + "/")
        _train(page, args.steps)
        page.screenshot(path=str(out / "ui-train.png"), full_page=True)
        _chat(page)
        page.screenshot(path=str(out / "ui-chat.png"), full_page=True)
        page.click("#tab-adapters")
        page.wait_for_selector("#adapters-table >> text=dates")
        page.screenshot(path=str(out / "ui-adapters.png"), full_page=True)
        _evaluate(page)
        page.screenshot(path=str(out / "ui-eval.png"), full_page=True)
        print(
            "evaluation:",
            " | ".join(page.eval_on_selector_all("#eval-result tr", "rs => rs.map(r => r.innerText)")),
        )
        print("chat:", page.eval_on_selector_all("#chat-columns .chat-col", "cs => cs.map(c => c.innerText)"))
        browser.close()
    print(f"wrote {out}/ui-{{train,chat,adapters,eval}}.png")


def _train(page, steps: int) -> None:
    page.click("#tab-train")
    page.wait_for_selector("[name='train.steps']")
    page.fill("#run-name", "dates")
    page.fill("[name='train.steps']", str(steps))
    page.fill("[name='train.eval_every']", "10")
    page.fill("[name='data.n_eval']", "20")
    page.click("details[data-section=eval] > summary")
    page.fill("[name='eval.limit']", "20")
    page.click("#preview-btn")
    page.wait_for_selector("#preview .learned")
    page.click("#start-btn")
    page.wait_for_function(f"window.lorakitChart && window.lorakitChart.points('dates') >= {steps}")
    page.wait_for_function("document.querySelector('#runs-list').textContent.includes('finished')")
    time.sleep(1)  # the last redraw


def _chat(page) -> None:
    page.click("#tab-adapters")
    page.fill("#load-name", "dates")
    page.fill("#load-path", "runs/dates/adapter")
    page.click("#load-btn")
    page.wait_for_selector("#adapters-table >> text=dates")
    page.click("#tab-chat")
    page.wait_for_selector("#chat-models input[value='dates']")
    for box in page.query_selector_all("#chat-models input[type=checkbox]"):
        if not box.is_checked():
            box.click()
    page.fill("#max-tokens", "24")
    for turn, prompt in enumerate((QUESTION, FOLLOW_UP), 1):
        page.fill("#prompt", prompt)
        page.click("#send-btn")
        page.wait_for_function(
            f"document.querySelectorAll('#chat-columns .turn-reply').length >= {2 * turn} && "
            "!document.querySelector('#send-btn').disabled"
        )


def _evaluate(page) -> None:
    page.click("#tab-eval")
    page.wait_for_selector("#eval-adapter option[value='dates']", state="attached")
    page.select_option("#eval-adapter", "dates")
    page.fill("#eval-limit", "20")
    page.click("#eval-btn")
    page.wait_for_selector("#eval-result:not([hidden])")


@contextlib.contextmanager
def _ui(tmp: Path) -> Iterator[str]:
    """`lorakit ui` on the default model, on a free port, with a fresh workspace; stopped at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lorakit", "ui", "--workspace", str(tmp / "ws"), "--port", str(port)]
    with open(tmp / "ui.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not _up(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"lorakit ui did not come up: {(tmp / 'ui.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(120)


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
