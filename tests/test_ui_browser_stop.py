"""The chat's Stop button, in a real headless Chromium against a real `lorakit ui` on the real default model.

The tiny model of test_ui_browser decodes its whole context in about a second, too fast to stop by hand; the
real model at 2,000 tokens without end-of-sequence (`ignore_eos`, added to the page's request on its way out)
streams for about a minute, so Stop lands mid-stream on any machine. Checked: the stream ends in the page and on
the server (its row leaves the batch), the text that came stays, marked as stopped, the form is usable again, and
the next turn carries the stopped reply as the assistant's.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from uiserver import KEY, browser_page, ui_process

pytestmark = [pytest.mark.browser, pytest.mark.real_model]
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def ui(tmp_path_factory, default_model_dir):
    tmp = tmp_path_factory.mktemp("uistop")
    args = ["--model", str(default_model_dir), "--workspace", str(tmp / "ws"), "--api-key", KEY]
    args += ["--dtype", "float32"]
    with ui_process(args, tmp / "ui.log") as (url, _):
        yield url, tmp


def _running(url: str) -> int:
    return httpx.get(url + "/health").json()["running"]


def test_stop_cuts_every_stream_and_keeps_what_came(ui):
    url, tmp = ui
    sent: list[dict] = []

    def no_end(route):  # the server stops only at max_tokens
        body = {**json.loads(route.request.post_data), "ignore_eos": True}
        sent.append(body)
        route.continue_(post_data=json.dumps(body))

    with browser_page(tmp, WAIT_MS) as page:
        page.route("**/v1/chat/completions", no_end)
        page.goto(url + "/")
        page.wait_for_selector("#api-key", state="visible")
        page.fill("#api-key", KEY)
        page.click("#api-key-btn")
        page.click("#tab-chat")
        page.wait_for_selector("#chat-models input[type=checkbox]:checked")
        assert page.is_hidden("#chat-stop")  # nothing to stop yet
        page.fill("#max-tokens", "2000")
        page.fill("#prompt", "Count from one to one thousand.")
        page.click("#send-btn")
        page.wait_for_function("document.querySelector('.turn-reply')?.textContent.length > 40")
        assert page.is_visible("#chat-stop") and page.is_disabled("#send-btn")
        assert _running(url) == 1
        page.click("#chat-stop")
        page.wait_for_selector(".turn-stopped")
        page.wait_for_function("!document.querySelector('#send-btn').disabled")
        assert page.is_hidden("#chat-stop") and page.is_hidden(".chat-col .error")
        # the server's row is gone: a few decode steps, not the rest of the 2,000 tokens
        deadline = time.monotonic() + 15
        while _running(url):
            assert time.monotonic() < deadline, "the stopped stream's row kept decoding"
            time.sleep(0.1)
        kept = page.text_content(".turn-reply")
        page.wait_for_timeout(1000)
        assert page.text_content(".turn-reply") == kept and len(kept) > 40  # nothing more arrives
        assert page.input_value("#prompt") == ""  # the turn was taken
        # the next turn carries the stopped reply as the assistant's
        page.fill("#max-tokens", "4")
        page.fill("#prompt", "Go on.")
        page.click("#send-btn")
        page.wait_for_function("document.querySelectorAll('.turn-reply').length === 2")
        page.wait_for_function("!document.querySelector('#send-btn').disabled")
        messages = sent[-1]["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user"]
        assert messages[1]["content"] == kept and messages[2]["content"] == "Go on."
        assert len(page.query_selector_all(".turn-stopped")) == 1  # the second turn ran to its end
