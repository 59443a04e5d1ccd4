"""The playground's page in a real headless Chromium (Debian's package, driven by Playwright), against a real
`lorakit ui` on a tiny model with the real tokenizer (tests/uiserver.py), with an API key the page asks for.

One walk through the page, as a person would: key, train from the form, watch the curve grow, stop, resume, see
the streams reopened after a view change continue after their last event, chat with the base and the adapter
side by side for two turns and past the context, cancel an evaluation, see the evaluations listed, show and
delete them, load and unload an adapter, see a path out of the workspace refused, and delete the run. Every wait has a deadline; a failure saves a screenshot beside the server's log.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest
from uiserver import KEY, browser_page, tiny_chat_model, ui_process

pytestmark = pytest.mark.browser
WAIT_MS = 120_000
CONTEXT = 256  # the chat's context length (--max-model-len): a long third turn outgrows it


@pytest.fixture(scope="module")
def ui(tmp_path_factory, default_model_dir):
    tmp = tmp_path_factory.mktemp("uibrowser")
    model = tiny_chat_model(tmp / "tiny", default_model_dir)
    (tmp / "outside" / "evil").mkdir(parents=True)
    args = ["--model", str(model), "--workspace", str(tmp / "ws"), "--api-key", KEY, "--dtype", "float32"]
    args += ["--max-model-len", str(CONTEXT)]
    with ui_process(args, tmp / "ui.log") as (url, _):
        yield url, tmp


@pytest.fixture(scope="module")
def page(ui):
    url, tmp = ui
    with browser_page(tmp, WAIT_MS) as page:
        page.goto(url + "/")
        yield page


def _shoot_on_failure(page, tmp, name: str):
    page.screenshot(path=str(tmp / f"{name}.png"), full_page=True)


def test_a_walk_through_the_playground(ui, page):
    url, tmp = ui
    try:
        _walk(page, url, tmp / "tiny")
    except Exception:
        _shoot_on_failure(page, tmp, "failure")
        raise


def _walk(page, url: str, model_dir) -> None:
    resumed_after: list[str] = []  # the Last-Event-ID of each reopened event stream
    chats: list[dict] = []  # the body of each chat request the page sent
    page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and chats.append(r.post_data_json))
    page.on(
        "request",
        lambda r: (
            "/events" in r.url
            and "last-event-id" in r.headers
            and resumed_after.append(r.headers["last-event-id"])
        ),
    )
    # the key: the page asks for it once the API answers 401
    page.wait_for_selector("#api-key", state="visible")
    page.fill("#api-key", KEY)
    page.click("#api-key-btn")
    page.wait_for_function("document.querySelector('#base-name').textContent.includes('tiny')")

    # 2. a short training run from the form (long enough to stop half-way)
    page.click("#tab-train")
    page.wait_for_selector("[name='train.steps']")
    # the objective shows its own section and no other's
    for objective in ("orpo", "cpo", "kto", "dpo", "sft"):
        page.select_option("[name='train.objective']", objective)
        shown = [
            s for s in ("dpo", "simpo", "orpo", "cpo", "kto") if page.is_visible(f"details[data-section={s}]")
        ]
        assert shown == ([] if objective == "sft" else [objective]), (objective, shown)
    # a classifier's data previews as texts with their labels
    page.select_option("[name='train.objective']", "classify")
    page.select_option("#data-source", "task:dates")
    page.click("#preview-btn")
    page.wait_for_function(
        "[...document.querySelectorAll('#preview .note')].some(n => /label (iso|us|european|words)/.test(n.textContent))"
    )
    # a token classifier's: texts with their entities highlighted, their types and words as the label
    page.select_option("[name='train.objective']", "token_classify")
    assert page.is_visible("details[data-section=classify]")  # its class weights weigh the tags
    page.click("#preview-btn")
    page.wait_for_function(
        "[...document.querySelectorAll('#preview .note')].some(n => /label (numeric|words) '/.test(n.textContent))"
    )
    page.select_option("[name='train.objective']", "sft")
    # first, a spreadsheet of the user's own: its columns named in data.fields, uploaded, previewed
    page.fill("[name='data.fields']", "{prompt: question, completion: answer}")
    csv = b"question,answer\nCapital of Spain?,Madrid\n"
    page.set_input_files("#upload", files=[{"name": "qa.csv", "mimeType": "text/csv", "buffer": csv}])
    page.wait_for_function("document.querySelector('#upload-note').textContent.includes('data/qa.csv: 1 ')")
    page.click("#preview-btn")
    page.wait_for_function(
        "[...document.querySelectorAll('#preview .learned')].some(s => s.textContent.startsWith('Madrid'))"
    )
    page.fill("[name='data.fields']", "{}")
    page.select_option("#data-source", "task:dates")
    page.click("details[data-section=eval] > summary")  # closed by default: model, lora, data, train are open
    page.fill("#run-name", "b1")
    for name, value in {
        "train.steps": "300",
        "train.batch_size": "2",
        "train.save_every": "0",
        "train.eval_every": "100",
        "data.n_train": "64",
        "data.n_eval": "4",
        "eval.limit": "2",
        "eval.max_new_tokens": "4",
    }.items():
        page.fill(f"[name='{name}']", value)
    page.click("#start-btn")

    # 3. the loss curve gets points while it runs
    page.wait_for_function("window.lorakitChart && window.lorakitChart.points('b1') >= 5")
    page.wait_for_function("document.querySelector('#progress-text').textContent.includes('/300')")

    # 4. stop (a checkpoint), then resume to the end
    page.click("#stop-btn")
    page.wait_for_function("document.querySelector('#runs-list').textContent.includes('stopped')")
    stopped_at = page.evaluate("window.lorakitChart.points('b1')")
    assert 5 <= stopped_at < 300
    page.click("#resume-btn")
    page.wait_for_function("document.querySelector('#runs-list').textContent.includes('finished')")
    page.wait_for_function("window.lorakitChart.points('b1') === 300")
    assert page.evaluate("window.lorakitChart.steps('b1')") == list(range(1, 301))
    # eval loss: before training (once, although the resumed process evaluates its start too), every 100 steps,
    # and at the end
    page.wait_for_function("window.lorakitChart.steps('b1', true).includes(300)")
    assert page.evaluate("window.lorakitChart.steps('b1', true)") == [0, 100, 200, 300]
    # leaving the Train view closes its streams, and coming back reopens them asking only for what came after
    # the records they had (Last-Event-ID). (Resume may reopen one too, or keep the same connection when the
    # resumed process starts before the server's stream noticed the stop: that depends on timing.)
    page.click("#tab-chat")
    page.click("#tab-train")
    deadline = time.monotonic() + 30
    while not resumed_after and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert resumed_after and all(int(i) > 0 for i in resumed_after), resumed_after
    page.wait_for_timeout(1000)
    assert page.evaluate("window.lorakitChart.steps('b1')") == list(range(1, 301))

    # 6. load the run's adapter from the workspace
    _load(page, "b1", "runs/b1/adapter")
    page.wait_for_selector("#adapters-table >> text=b1")

    # 5. chat with the base and the adapter side by side: one prompt, two streams, different text
    page.click("#tab-chat")
    page.wait_for_selector("#chat-models input[value='b1']")
    for box in page.query_selector_all("#chat-models input[type=checkbox]"):
        want = box.get_attribute("value") in ("tiny", "b1")
        if box.is_checked() != want:
            box.click()
    page.fill("#prompt", "When is it?")
    page.fill("#max-tokens", "8")
    page.click("#send-btn")
    replies = "[...document.querySelectorAll('#chat-columns .chat-col .turn-reply')]"
    page.wait_for_function(f"{replies}.length === 2 && !document.querySelector('#send-btn').disabled")
    texts = page.eval_on_selector_all(
        "#chat-columns .chat-col .turn-reply", "els => els.map(e => e.textContent)"
    )
    heads = page.eval_on_selector_all("#chat-columns .chat-col", "els => els.map(e => e.dataset.model)")
    assert sorted(heads) == ["b1", "tiny"] and texts[0] != texts[1] and any(t.strip() for t in texts), (
        heads,
        texts,
    )
    assert httpx.get(url + "/health").json()["max_rows"] >= 2  # the two columns were decoded in one batch

    # a second turn: each column sends its own conversation, so its answer is the API's answer to the history
    first = dict(zip(heads, texts, strict=True))
    page.fill("#prompt", "And the year?")
    page.press("#prompt", "Control+Enter")
    page.wait_for_function(f"{replies}.length === 4 && !document.querySelector('#send-btn').disabled")
    cols = page.eval_on_selector_all(
        "#chat-columns .chat-col",
        "els => els.map(e => [e.dataset.model, [...e.querySelectorAll('.turn-reply')].map(r => r.textContent)])",
    )
    assert page.input_value("#prompt") == ""  # sent, so cleared
    for model, (reply1, reply2) in cols:
        assert reply1 == first[model]
        history = [
            {"role": "user", "content": "When is it?"},
            {"role": "assistant", "content": reply1},
            {"role": "user", "content": "And the year?"},
        ]
        assert reply2 == _greedy(url, model, history), model
    alone = [_greedy(url, m, [{"role": "user", "content": "And the year?"}]) for m, _ in cols]
    assert alone != [r[1] for _, r in cols], "the history changed no answer: this walk cannot tell"
    conversations = {
        model: [
            {"role": "user", "content": "When is it?"},
            {"role": "assistant", "content": reply1},
            {"role": "user", "content": "And the year?"},
            {"role": "assistant", "content": reply2},
        ]
        for model, (reply1, reply2) in cols
    }
    _outgrow_the_context(page, url, model_dir, chats, conversations)

    # an evaluation cancelled from the page: the button shows while it runs, the status says so, no result
    page.click("#tab-eval")
    page.wait_for_selector("#eval-adapter option[value='b1']", state="attached")
    page.select_option("#eval-adapter", "b1")
    page.select_option("#eval-data", "task:dates")
    page.fill("#eval-limit", "10000")
    page.click("#eval-btn")
    page.wait_for_selector("#eval-cancel", state="visible")
    page.click("#eval-cancel")
    page.wait_for_function("document.querySelector('#eval-status').textContent === 'cancelled'")
    # the button comes back once the history has been fetched again, a request after the status line: wait for it
    page.wait_for_selector("#eval-btn:enabled")
    assert page.is_hidden("#eval-cancel") and page.is_hidden("#eval-result")

    # the history: the cancelled evaluation is listed; a finished one is too, with its figures, and shows again
    history = "#eval-history tbody tr[data-job]"
    page.wait_for_selector(f"{history} td.status-cancelled")
    page.fill("#eval-limit", "2")
    page.click("#eval-btn")
    page.wait_for_function(
        f"document.querySelectorAll('{history}').length === 2 && document.querySelector('{history} td.status-done')"
    )
    done = page.get_attribute(f"{history}:has(td.status-done)", "data-job")
    state = _get(url, f"/api/jobs/{done}")
    row = page.eval_on_selector(f"{history}[data-job='{done}']", "r => [...r.cells].map(c => c.textContent)")
    assert row[1:4] == ["b1", "task:dates", "2"] and row[5].endswith(" %"), row
    assert row[5] == f"{100 * state['result']['adapter']['accuracy']:.1f} %", (row, state)
    page.evaluate("document.querySelector('#eval-result').hidden = true")
    page.click(f"{history}[data-job='{done}'] .show-job")
    assert page.is_visible("#eval-result") and done in page.text_content("#eval-status")
    # a job's record deleted from the page (after its confirmation): gone from the table and from the server
    cancelled = page.get_attribute(f"{history}:has(td.status-cancelled)", "data-job")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click(f"{history}[data-job='{cancelled}'] .delete-job")
    page.wait_for_function(f"document.querySelectorAll('{history}').length === 1")
    assert cancelled not in [j["id"] for j in _get(url, "/api/jobs")["jobs"]]

    _evaluate_a_classifier(page, model_dir)
    _evaluate_a_token_classifier(page, model_dir)

    # 6. unload it again
    page.click("#tab-adapters")
    page.click("#adapters-table tr:has-text('b1') .unload-btn")
    page.wait_for_function("!document.querySelector('#adapters-table').textContent.includes('b1')")

    # 7. a path out of the workspace is refused, and the page says so
    _load(page, "evil", "../outside/evil")
    page.wait_for_selector("#adapters-error:has-text('refused')")
    page.click("#tab-train")
    page.wait_for_selector("#runs-list >> text=b1")

    # 8. delete the run from the page (after its confirmation): gone from the list and from the workspace
    page.click("#runs-list .run-link:has-text('b1')")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete-btn")
    page.wait_for_function("!document.querySelector('#runs-list').textContent.includes('b1')")
    assert "b1" not in [r["name"] for r in _get(url, "/api/runs")["runs"]]


def _outgrow_the_context(page, url: str, model_dir, chats: list[dict], conversations: dict) -> None:
    """A third turn that fits the context alone but not with the conversation: each column leaves out its oldest
    turns, as few as it must, says so, and shows the API's answer to what it sent. Then a prompt too long on its
    own fails in each column, and the conversation stays as it was."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)

    def needs(messages: list[dict]) -> int:  # as the server counts: prompt tokens plus max_tokens (8)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"]) + 8

    def long(n: int) -> dict:
        return {"role": "user", "content": "Tell me the date again. " * n}

    n = 1  # the shortest such prompt that no column's whole conversation leaves room for
    while min(needs([*c, long(n)]) for c in conversations.values()) <= CONTEXT:
        n += 1
    turn = long(n)
    assert needs([turn]) <= CONTEXT, "the prompt alone must fit: this walk cannot tell"
    chats.clear()
    page.fill("#prompt", turn["content"])
    page.click("#send-btn")
    page.wait_for_function(
        "[...document.querySelectorAll('#chat-columns .turn-reply')].length === 6"
        " && !document.querySelector('#send-btn').disabled"
    )
    for model, conversation in conversations.items():
        col = f"#chat-columns .chat-col[data-model='{model}']"
        sent = [b["messages"] for b in chats if b["model"] == model]
        assert sent[0] == [*conversation, turn], "the first try sends the whole conversation"
        fitted = sent[-1]
        left_out = len(conversation) + 1 - len(fitted)
        assert left_out in (2, 4) and fitted == [*conversation[left_out:], turn], (model, fitted)
        too_long = _post(url, {"model": model, "messages": sent[-2], "max_tokens": 8})  # one turn fewer out
        assert too_long.status_code == 400 and "maximum context length" in too_long.text, too_long.text
        replies = page.eval_on_selector_all(f"{col} .turn-reply", "els => els.map(e => e.textContent)")
        assert replies[2] == _greedy(url, model, fitted), model
        note = page.text_content(f"{col} .chat-trimmed")
        assert page.is_visible(f"{col} .chat-trimmed") and f"The {left_out // 2} oldest turn" in note, note
        assert f"context of {CONTEXT} tokens" in note, note

    # a prompt that cannot fit even alone: the server's error in each column, the conversation kept
    notes = page.eval_on_selector_all("#chat-columns .chat-trimmed", "els => els.map(e => e.textContent)")
    page.fill("#prompt", "Tell me the date again. " * (2 * n))
    page.click("#send-btn")
    page.wait_for_function(
        "[...document.querySelectorAll('#chat-columns .chat-col .error')].every(e => !e.hidden)"
        " && !document.querySelector('#send-btn').disabled"
    )
    errors = page.eval_on_selector_all("#chat-columns .chat-col .error", "els => els.map(e => e.textContent)")
    assert all(f"maximum context length is {CONTEXT} tokens" in e for e in errors), errors
    assert page.input_value("#prompt").startswith("Tell me"), "a failed prompt stays in the box"
    assert notes == page.eval_on_selector_all(
        "#chat-columns .chat-trimmed", "els => els.map(e => e.textContent)"
    )


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )


def _greedy(url: str, model: str, messages: list[dict]) -> str:
    """The server's answer to `messages` at the page's settings (8 tokens, temperature 0, top_p 1)."""
    r = _post(url, {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0, "top_p": 1})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _get(url: str, path: str) -> dict:
    r = httpx.get(url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _evaluate_a_classifier(page, model_dir) -> None:
    """A classifier's adapter (its LoRA random, its head new) loaded from the page and evaluated: the result table
    shows a classifier's measures, and the samples its predictions."""
    import torch

    import lorakit

    torch.manual_seed(0)
    model, _ = lorakit.load_model(str(model_dir), num_labels=4, dtype=torch.float32)
    lorakit.formats.name_classes(model, ["european", "iso", "us", "words"])
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    lorakit.save_adapter(model, model_dir.parent / "ws" / "adapters" / "cls")
    _load_and_evaluate(page, "cls", 4)
    labels = page.eval_on_selector_all("#eval-result tbody th", "cells => cells.map(c => c.textContent)")
    assert labels == ["cross-entropy", "accuracy", "balanced accuracy"], labels
    predicted = page.eval_on_selector_all(
        "#eval-samples tbody tr", "rows => rows.map(r => r.cells[2].textContent)"
    )
    assert predicted and set(predicted) <= {"european", "iso", "us", "words"}, predicted


def _evaluate_a_token_classifier(page, model_dir) -> None:
    """A token classifier's adapter (random LoRA, new head) loaded from the page and evaluated: the result table
    shows a token classifier's measures, and the samples the entities expected, as "type: words"."""
    import torch

    import lorakit

    torch.manual_seed(0)
    model, _ = lorakit.load_model(str(model_dir), num_labels=5, per_token=True, dtype=torch.float32)
    lorakit.formats.name_classes(model, ["O", "B-numeric", "I-numeric", "B-words", "I-words"])
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    lorakit.save_adapter(model, model_dir.parent / "ws" / "adapters" / "tagger")
    _load_and_evaluate(page, "tagger", 3)
    labels = page.eval_on_selector_all("#eval-result tbody th", "cells => cells.map(c => c.textContent)")
    assert labels == [
        "cross-entropy",
        "tokens tagged right",
        "entity precision",
        "entity recall",
        "entity F1",
    ]
    expected = page.eval_on_selector_all(
        "#eval-samples tbody tr", "rows => rows.map(r => r.cells[0].textContent)"
    )
    assert len(expected) == 3 and all(
        re.fullmatch(r"(numeric|words): .+; (numeric|words): .+", e) for e in expected
    )


def _load_and_evaluate(page, name: str, limit: int) -> None:
    """Load workspace adapter adapters/NAME from the Adapters view, then evaluate it from the Evaluate view on
    `limit` of the built-in task's held-out examples, until its result shows."""
    _load(page, name, f"adapters/{name}")
    page.wait_for_selector(f"#adapters-table >> text={name}")
    page.click("#tab-eval")
    page.wait_for_selector(f"#eval-adapter option[value='{name}']", state="attached")
    page.select_option("#eval-adapter", name)
    page.select_option("#eval-data", "task:dates")
    page.fill("#eval-limit", str(limit))
    page.click("#eval-btn")
    page.wait_for_function(
        f"document.querySelector('#eval-status').textContent.startsWith('done: {limit} examples')"
    )


def _load(page, name: str, path: str) -> None:
    """Fill the Adapters view's load form and press Load."""
    page.click("#tab-adapters")
    page.fill("#load-name", name)
    page.fill("#load-path", path)
    page.click("#load-btn")
