"""`lorakit serve`'s POST /v1/classify for a token classifier's adapter (task_type TOKEN_CLS), served beside a
generation adapter over one real default model, in a real server on loopback.

The oracle is PEFT: the same adapter folder on transformers' `LlamaForTokenClassification` of the same weights,
each text alone, fed the token ids that training makes of it: every token's tag must be PEFT's highest logit and
its score PEFT's probability of that tag (1e-4, float32: the server batches texts of different lengths with right
padding), and the entities those tags say (`decode_tags`) must be the answer's.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import torch
from test_serve import KEY, _random_adapter, serve_process, wait_until_up

import lorakit
from lorakit.data.tagging import decode_tags, token_offsets
from lorakit.formats import name_classes
from lorakit.models import load_model

pytestmark = pytest.mark.real_model

TAGS = ["O", "B-DATE", "I-DATE", "B-PER", "I-PER"]
TEXTS = [
    "Anna flew to New York on 02.07.1998.",
    "Bob stayed.",
    "The meeting moved from 2021-03-04 to March 5, 2021.",
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, default_model_dir) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("serve_tokcls")
    root = tmp / "root"
    torch.manual_seed(5)
    model, _ = load_model(str(default_model_dir), num_labels=len(TAGS), per_token=True)
    name_classes(model, TAGS)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
            if "score" in name:  # a head whose tags vary along a text, so that entities begin and end
                p.normal_(0, 0.3)
    lorakit.save_adapter(model, root / "ner")
    gen, _ = lorakit.load_model(str(default_model_dir))
    _random_adapter(gen, "gen", seed=0)
    lorakit.save_adapter(gen, root / "gen", "gen")
    return {"tmp": tmp, "root": root}


@pytest.fixture(scope="module")
def url(dirs, default_model_dir):
    root = dirs["root"]
    args = ["--model", str(default_model_dir), "--dtype", "float32", "--api-key", KEY]
    args += ["--adapter", f"ner={root / 'ner'}", "--adapter", f"gen={root / 'gen'}"]
    log = dirs["tmp"] / "server.log"
    with serve_process(args, log) as (base, proc):
        yield wait_until_up(base, proc, log)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def test_tags_and_entities_are_peft_s(http, dirs, default_model_dir):
    from peft import PeftModel

    base, tok = load_model(str(default_model_dir), num_labels=len(TAGS), per_token=True, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, dirs["root"] / "ner").eval()
    r = http.post("/v1/classify", json={"model": "ner", "input": TEXTS})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["usage"]["prompt_tokens"] == sum(len(token_offsets(tok, t)[0]) for t in TEXTS)
    found_any, untagged = False, 0
    for text, item in zip(TEXTS, answer["data"], strict=True):
        ids, offsets = token_offsets(tok, text)
        with torch.no_grad():
            probs = torch.softmax(peft(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        tags = probs.argmax(-1).tolist()
        assert item["num_classes"] == len(TAGS)
        assert [t["id"] for t in item["tokens"]] == ids
        # a token that carries no tag (special, or spaces only: training tagged none of these) answers none
        assert [t["label"] for t in item["tokens"]] == [
            None if o is None else TAGS[t] for t, o in zip(tags, offsets, strict=True)
        ]
        untagged += sum(o is None for o in offsets)
        for t, p, tag, o in zip(item["tokens"], probs, tags, offsets, strict=True):
            assert t["score"] is None if o is None else t["score"] == pytest.approx(float(p[tag]), abs=1e-4)
            assert (t["start"], t["end"]) == ((None, None) if o is None else o)
        want = decode_tags(tags, offsets, TAGS, text)
        assert [(e["start"], e["end"], e["entity_group"]) for e in item["entities"]] == want
        assert all(e["word"] == text[e["start"] : e["end"]] and 0 < e["score"] <= 1 for e in item["entities"])
        found_any |= bool(want)
    assert found_any  # the random head tags some entity, so the grouping is exercised
    assert untagged  # the space before a number is a token of its own: it answers no tag


def test_the_card_says_token_classification_and_generation_is_refused(http):
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert cards["ner"]["classifier"] == {"kind": "token_classification", "classes": TAGS}
    r = http.post("/v1/completions", json={"model": "ner", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 400 and "scores texts at /v1/classify" in r.json()["error"]["message"]
    ok = http.post("/v1/completions", json={"model": "gen", "prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"input": [1, 2, 3]}, "tags texts .* not token ids"),
        ({"input": ["a", {"text": "a", "text_pair": "b"}]}, "input\\[1\\]: a token classifier tags texts"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "not conversations",
        ),
        ({"input": ""}, "input is empty"),
    ],
)
def test_bad_requests_fail_alone(http, body, words):
    r = http.post("/v1/classify", json={"model": "ner", **body})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "\n" not in message
    assert re.search(words, message), message
    assert http.post("/v1/classify", json={"model": "ner", "input": "Bob."}).status_code == 200
