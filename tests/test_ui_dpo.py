"""The playground with DPO (and SimPO, ORPO, CPO, KTO): the form's objective and the section it shows,
preference files uploaded and previewed side by side, and a DPO run started from the form (on the session's
`lorakit ui`, a tiny model with the real tokenizer)."""

from __future__ import annotations

import json
import re

from uiserver import SMALL_RUN, error, wait_for

PAIR = {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"}


def test_the_form_has_the_objective_and_a_section_shown_by_each(http):
    sections = {s["name"]: s for s in http.get("/api/schema").json()["sections"]}
    objective = next(f for f in sections["train"]["fields"] if f["name"] == "objective")
    assert (
        objective["choices"]
        == [
            "sft",
            "dpo",
            "simpo",
            "orpo",
            "cpo",
            "kto",
            "reward",
            "classify",
            "regression",
            "token_classify",
            "embed",
        ]
        and objective["default"] == "sft"
    )
    for name in ("dpo", "simpo", "orpo", "cpo", "kto", "reward", "classify", "embed"):
        assert sections[name]["objective"] == name and sections[name]["method"] is None
        assert sections[name]["objectives"] == ([name, "token_classify"] if name == "classify" else [name])
    assert "objective" not in sections["lora"] and "objective" not in sections["train"]
    for name in ("dpo", "cpo"):
        loss = next(f for f in sections[name]["fields"] if f["name"] == "loss")
        assert loss["choices"] == ["sigmoid", "ipo", "hinge"]


def test_preference_files_upload_and_preview_as_pairs(http):
    body = "".join(
        json.dumps(p) + "\n" for p in (PAIR, {**PAIR, "prompt": "Capital of Spain?", "chosen": "Madrid"})
    )
    r = http.post("/api/upload", params={"name": "prefs.jsonl"}, content=body.encode())
    assert r.json() == {"path": "data/prefs.jsonl", "examples": 2, "pairs": True}
    out = http.post("/api/preview", json={"file": "data/prefs.jsonl", "n": 1}).json()
    assert out["total"] == 2 and out["pairs"] is True
    assert [e["side"] for e in out["examples"]] == ["chosen", "rejected"]
    learned = ["".join(s["text"] for s in e["segments"] if s["learned"]) for e in out["examples"]]
    assert learned[0].startswith("Paris") and learned[1].startswith("Lyon")
    for objective in ("dpo", "orpo", "kto"):  # KTO trains on each side of the built-in pairs
        task = http.post("/api/preview", json={"task": "dates", "n": 2, "objective": objective}).json()
        assert task["pairs"] is True and len(task["examples"]) == 4
    bad = b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 1, "rejected": "c"}\n'
    message = error(http.post("/api/upload", params={"name": "bad.jsonl"}, content=bad), 400)
    assert message.startswith("bad.jsonl:2: chosen") or message.startswith("bad.jsonl:2: a text 'prompt'")
    assert "bad.jsonl" not in {d["path"].split("/")[-1] for d in http.get("/api/workspace").json()["data"]}


def test_labelled_data_previews_as_the_classifier_reads_it(http):
    """With train.objective classify (regression), the preview shows each text as the classifier reads it (the
    tokenizer's classification input, nothing learned) and its label; a file with a bad label is a 400 naming it."""
    rows = [{"text": "Great food.", "label": "positive"}, {"text": "Awful.", "label": "negative"}]
    r = http.post(
        "/api/upload",
        params={"name": "reviews.jsonl"},
        content="".join(json.dumps(x) + "\n" for x in rows).encode(),
    )
    assert r.status_code == 200, r.text
    out = http.post(
        "/api/preview", json={"file": "data/reviews.jsonl", "n": 2, "objective": "classify"}
    ).json()
    assert out["total"] == 2 and out["pairs"] is False
    assert [e["label"] for e in out["examples"]] == ["positive", "negative"]
    assert [e["segments"][0]["text"] for e in out["examples"]] == ["Great food.", "Awful."]
    assert all(e["learned_tokens"] == 0 and not e["segments"][0]["learned"] for e in out["examples"])
    task = http.post("/api/preview", json={"task": "dates", "n": 3, "objective": "classify"}).json()
    assert {e["label"] for e in task["examples"]} <= {"iso", "us", "european", "words"}
    years = http.post("/api/preview", json={"task": "dates", "n": 3, "objective": "regression"}).json()
    assert all(isinstance(e["label"], float) and -1 <= e["label"] < 1 for e in years["examples"])
    message = error(
        http.post("/api/preview", json={"file": "data/reviews.jsonl", "objective": "regression"}), 400
    )
    assert message.startswith("data/reviews.jsonl:1") and "not a finite number" in message


def test_a_dpo_run_from_the_form(ui, http):
    """The built-in task's pairs, 4 steps: the run finishes, its steps carry the rewards, its summary the
    preference accuracy before and after."""
    values = {**SMALL_RUN, "train": {"steps": "4", "batch_size": "2", "lr": "0.01", "objective": "dpo"}}
    values["dpo"] = {"beta": "0.5"}
    assert http.post("/api/runs", json={"name": "dpo1", "values": values}).status_code == 200
    state = wait_for(http, "/api/runs/dpo1", lambda s: s["status"] not in ("starting", "running"))
    assert state["status"] == "finished", state
    run = ui["ws"] / "runs" / "dpo1"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("reward_accuracy" in r for r in steps if "loss" in r)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["before"]["reward_accuracy"] == 0.0 and "reward_accuracy" in summary["after"]
    assert "objective: dpo" in (run / "config.yaml").read_text()


def test_a_classifier_run_from_the_form_and_its_evaluation(ui, http):
    """train.objective classify on the built-in dates, 4 steps: the run finishes with the classifier's measures;
    the Evaluate view's job measures its adapter as a classifier (no base to compare with: its head is new)."""
    values = {**SMALL_RUN, "train": {"steps": "4", "batch_size": "4", "lr": "0.01", "objective": "classify"}}
    assert http.post("/api/runs", json={"name": "cls1", "values": values}).status_code == 200
    state = wait_for(http, "/api/runs/cls1", lambda s: s["status"] not in ("starting", "running"))
    assert state["status"] == "finished", state
    summary = json.loads((ui["ws"] / "runs" / "cls1" / "summary.json").read_text())
    assert {"loss", "accuracy", "balanced_accuracy"} <= set(summary["after"])
    job = http.post("/api/eval", json={"adapter": "runs/cls1/adapter", "task": "dates", "limit": 8}).json()[
        "job"
    ]
    done = wait_for(http, f"/api/jobs/{job}", lambda s: s["status"] != "running")
    assert done["status"] == "done", done
    result = done["result"]
    assert result["objective"] == "classify" and result["examples"] == 8 and "base" not in result
    assert 0 <= result["adapter"]["balanced_accuracy"] <= 1
    assert result["adapter"]["samples"][0]["predicted"] in result["classes"]


def test_tagged_data_previews_with_its_entities_marked(http):
    """With train.objective token_classify, the preview shows each text with its entities marked and, as its
    label, each entity's type and words (a file of words and tags, and the built-in sentences); uploading a file
    whose tags do not match its words is a 400 naming the record, and nothing is written."""
    rows = [{"tokens": ["Anna", "met", "Bob", "."], "tags": ["B-PER", "O", "B-PER", "O"]}]
    r = http.post("/api/upload", params={"name": "ner.jsonl"}, content=json.dumps(rows[0]).encode() + b"\n")
    assert r.status_code == 200, r.text
    out = http.post("/api/preview", json={"file": "data/ner.jsonl", "objective": "token_classify"}).json()
    (shown,) = out["examples"]
    assert [(s["text"], s["learned"]) for s in shown["segments"]] == [
        ("Anna", True),
        (" met ", False),
        ("Bob", True),
        (" .", False),
    ]
    assert shown["label"] == "PER 'Anna'; PER 'Bob'"
    task = http.post("/api/preview", json={"task": "dates", "n": 2, "objective": "token_classify"}).json()
    assert all(e["label"].count("numeric") + e["label"].count("words") == 2 for e in task["examples"])
    bad = json.dumps({"tokens": ["a", "b"], "tags": ["O"]}).encode()
    message = error(http.post("/api/upload", params={"name": "bad_ner.jsonl"}, content=bad), 400)
    assert message.startswith("bad_ner.jsonl:1") and "one tag per word" in message
    assert "bad_ner.jsonl" not in {
        d["path"].split("/")[-1] for d in http.get("/api/workspace").json()["data"]
    }


def test_a_token_classifier_run_from_the_form_and_its_evaluation(ui, http):
    """train.objective token_classify on the built-in sentences, 4 steps: the run finishes with the entities' F1;
    the Evaluate view's job measures its adapter as a token classifier (no base to compare with)."""
    values = {
        **SMALL_RUN,
        "train": {"steps": "4", "batch_size": "4", "lr": "0.01", "objective": "token_classify"},
    }
    assert http.post("/api/runs", json={"name": "tok1", "values": values}).status_code == 200
    state = wait_for(http, "/api/runs/tok1", lambda s: s["status"] not in ("starting", "running"))
    assert state["status"] == "finished", state
    summary = json.loads((ui["ws"] / "runs" / "tok1" / "summary.json").read_text())
    assert {"loss", "accuracy", "precision", "recall", "f1"} <= set(summary["after"])
    job = http.post("/api/eval", json={"adapter": "runs/tok1/adapter", "task": "dates", "limit": 4}).json()[
        "job"
    ]
    done = wait_for(http, f"/api/jobs/{job}", lambda s: s["status"] != "running")
    assert done["status"] == "done", done
    result = done["result"]
    assert result["objective"] == "token_classify" and result["examples"] == 4 and "base" not in result
    assert result["tags"] == ["O", "B-numeric", "I-numeric", "B-words", "I-words"]
    assert len(result["adapter"]["samples"][0]["expected"]) == 2


def test_text_pairs_preview_and_upload(http):
    """With train.objective embed, the preview shows each anchor with its positive and hard negative as its label
    (an uploaded file with columns of its own, read through data.fields, and the built-in dates); a file of pairs
    with a bad record is a 400 naming it, and nothing is written. An upload is read as text pairs by the names
    anchor and positive (or data.fields'): a question-and-answer file stays fine-tuning data to map."""
    body = json.dumps(
        {"query": "How do I reset my password?", "document": "Open Settings, then Account."}
    ).encode()
    assert "unknown fields" in error(
        http.post("/api/upload", params={"name": "pairs.jsonl"}, content=body), 400
    )
    fields = "{anchor: query, positive: document}"
    r = http.post("/api/upload", params={"name": "pairs.jsonl", "fields": fields}, content=body + b"\n")
    assert r.status_code == 200, r.text
    out = http.post("/api/preview", json={"file": "data/pairs.jsonl", "objective": "embed"}).json()
    (shown,) = out["examples"]  # the preview reads query and document as anchor and positive by themselves
    assert shown["segments"] == [{"text": "How do I reset my password?", "learned": False}]
    assert shown["label"] == "positive: 'Open Settings, then Account.'" and shown["tokens"] > 0
    task = http.post("/api/preview", json={"task": "dates", "n": 2, "objective": "embed"}).json()
    assert all(
        re.fullmatch(r"positive: '\d{4}-\d\d-\d\d'; negative: '\d{4}-\d\d-\d\d'", e["label"])
        for e in task["examples"]
    )
    scored = json.dumps({"anchor": "A cat sleeps.", "positive": "A cat is asleep.", "score": 4.5}).encode()
    r = http.post("/api/upload", params={"name": "sts.jsonl"}, content=scored + b"\n")
    assert r.status_code == 200, r.text  # scored pairs (STS): the preview shows each score
    out = http.post("/api/preview", json={"file": "data/sts.jsonl", "objective": "embed"}).json()
    assert out["examples"][0]["label"] == "paired with: 'A cat is asleep.'; score 4.5"
    bad = json.dumps({"anchor": "same", "positive": "same"}).encode()
    message = error(http.post("/api/upload", params={"name": "bad_pairs.jsonl"}, content=bad), 400)
    assert message.startswith("bad_pairs.jsonl:1") and "the same text" in message
    assert "bad_pairs.jsonl" not in {
        d["path"].split("/")[-1] for d in http.get("/api/workspace").json()["data"]
    }


def test_an_embedding_model_run_from_the_form_and_its_evaluation(ui, http):
    """train.objective embed on the built-in dates, 4 steps on the tiny model: the run finishes with the
    retrieval measures; the Evaluate view's job measures its adapter beside the base."""
    values = {**SMALL_RUN, "train": {"steps": "4", "batch_size": "4", "lr": "0.001", "objective": "embed"}}
    assert http.post("/api/runs", json={"name": "emb1", "values": values}).status_code == 200
    state = wait_for(http, "/api/runs/emb1", lambda s: s["status"] not in ("starting", "running"))
    assert state["status"] == "finished", state
    summary = json.loads((ui["ws"] / "runs" / "emb1" / "summary.json").read_text())
    assert {"loss", "accuracy", "recall_at_10", "mrr_at_10"} <= set(summary["after"])
    job = http.post("/api/eval", json={"adapter": "runs/emb1/adapter", "task": "dates", "limit": 8}).json()[
        "job"
    ]
    done = wait_for(http, f"/api/jobs/{job}", lambda s: s["status"] != "running")
    assert done["status"] == "done", done
    result = done["result"]
    assert result["objective"] == "embed" and result["examples"] == 8 and result["pooling"] == "last"
    assert 0 <= result["base"]["accuracy"] <= 1 and 0 <= result["adapter"]["mrr_at_10"] <= 1
