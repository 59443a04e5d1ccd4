"""An embedding model on the real default model: `lorakit train --objective embed` of SmolLM2 on the built-in dates,
then `lorakit serve`'s POST /v1/embeddings (OpenAI's route, through OpenAI's own client) for that adapter, beside a
generation adapter over one base model, in a real server on loopback.

The oracle is PEFT: the same adapter folder on transformers' `LlamaModel` of the same weights, each text alone, its
last token's hidden state L2-normalized (lorakit's pooling for a decoder): every vector must be PEFT's to 1e-4
(float32; the server embeds texts of different lengths in one right-padded batch and adds the adapter on the causal
LM's body, which names the same weights `model.layers...`).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
import pytest
import torch
from test_serve import KEY, _random_adapter, serve_process, wait_until_up

import lorakit
from lorakit.embeddings import encode_texts
from lorakit.models import load_model
from lorakit.train.config import load_config
from lorakit.train.run import run_training

pytestmark = pytest.mark.real_model

TEXTS = [
    "the 5th of March, 2021",
    "2021-03-05",
    "March 6, 2021",
    "A much longer text about dates and calendars.",
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, default_model_dir) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("serve_embed")
    args = ["--objective", "embed", "--model.path", str(default_model_dir), "--model.dtype", "float32"]
    args += ["--train.steps", "20", "--train.lr", "1e-3", "--data.n_train", "200", "--data.n_eval", "50"]
    args += ["--train.out_dir", str(tmp / "run"), "--train.save_every", "0"]
    summary = run_training(load_config(None, args))
    gen, _ = lorakit.load_model(str(default_model_dir))
    _random_adapter(gen, "gen", seed=0)
    lorakit.save_adapter(gen, tmp / "gen", "gen")
    return {"tmp": tmp, "dates": Path(summary["adapter"]), "gen": tmp / "gen", "summary": summary}


@pytest.fixture(scope="module")
def url(dirs, default_model_dir):
    args = ["--model", str(default_model_dir), "--dtype", "float32", "--api-key", KEY]
    args += ["--adapter", f"dates={dirs['dates']}", "--adapter", f"gen={dirs['gen']}"]
    log = dirs["tmp"] / "server.log"
    with serve_process(args, log) as (base, proc):
        yield wait_until_up(base, proc, log)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def _alone(model, tok, texts: list[str]) -> torch.Tensor:
    """Each text alone through `model` (a LlamaModel, PEFT's or plain): its last token's state, normalized."""
    out = []
    for ids in encode_texts(tok, texts, 256):
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].float()
        out.append(torch.nn.functional.normalize(hidden, dim=-1))
    return torch.stack(out)


def test_smollm2_learns_the_dates(dirs):
    """20 steps of 8 pairs: a held-out date in words finds its ISO form among the held-out ISO dates (positives and
    near misses) far more often than the base model's last token does."""
    before, after = dirs["summary"]["before"], dirs["summary"]["after"]
    assert after["accuracy"] > before["accuracy"] + 0.2 and after["loss"] < before["loss"], (before, after)


def test_vectors_through_openai_s_client_are_peft_s(url, dirs, default_model_dir):
    from openai import OpenAI
    from peft import PeftModel
    from transformers import AutoModel

    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    answer = client.embeddings.create(model="dates", input=TEXTS)  # the client asks for base64
    got = torch.tensor([d.embedding for d in answer.data])
    tok = load_model(str(default_model_dir))[1]
    assert answer.usage.prompt_tokens == sum(len(r) for r in encode_texts(tok, TEXTS, 256))
    base = AutoModel.from_pretrained(default_model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, dirs["dates"]).eval()
    torch.testing.assert_close(got, _alone(peft, tok, TEXTS), atol=1e-4, rtol=0)
    base_name = client.models.list().data[0].id
    plain = client.embeddings.create(model=base_name, input=TEXTS)
    with peft.disable_adapter():
        want = _alone(peft, tok, TEXTS)
    torch.testing.assert_close(torch.tensor([d.embedding for d in plain.data]), want, atol=1e-4, rtol=0)


def test_formats_dimensions_and_token_ids(http, default_model_dir):
    tok = load_model(str(default_model_dir))[1]
    floats = http.post(
        "/v1/embeddings", json={"model": "dates", "input": TEXTS, "encoding_format": "float"}
    ).json()
    packed = http.post(
        "/v1/embeddings", json={"model": "dates", "input": TEXTS, "encoding_format": "base64"}
    ).json()
    full = torch.tensor([d["embedding"] for d in floats["data"]])
    raw = [
        torch.frombuffer(bytearray(base64.b64decode(d["embedding"])), dtype=torch.float32)
        for d in packed["data"]
    ]
    assert torch.equal(torch.stack(raw), full)
    assert [d["index"] for d in floats["data"]] == list(range(len(TEXTS))) and floats["object"] == "list"
    short = http.post("/v1/embeddings", json={"model": "dates", "input": TEXTS, "dimensions": 64}).json()
    cut = torch.tensor([d["embedding"] for d in short["data"]])
    torch.testing.assert_close(cut, torch.nn.functional.normalize(full[:, :64], dim=-1), atol=1e-6, rtol=0)
    ids = encode_texts(tok, TEXTS[:1], 256)[0]
    one = http.post("/v1/embeddings", json={"model": "dates", "input": ids}).json()
    torch.testing.assert_close(torch.tensor(one["data"][0]["embedding"]), full[0], atol=1e-5, rtol=0)


def test_generation_and_embeddings_share_the_server(http):
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models["dates"]["embedding"] == {"pooling": "last"} and "embedding" not in models["gen"]
    r = http.post(
        "/v1/completions", json={"model": "gen", "prompt": "The capital of France is", "max_tokens": 4}
    )
    assert r.status_code == 200, r.text
    r = http.post("/v1/completions", json={"model": "dates", "prompt": "Hi", "max_tokens": 4})
    assert r.status_code == 400 and "it embeds texts at /v1/embeddings" in r.json()["error"]["message"]
    r = http.post("/v1/classify", json={"model": "dates", "input": "Hi"})
    assert r.status_code == 400 and "it embeds, at /v1/embeddings" in r.json()["error"]["message"]
    r = http.post("/v1/embeddings", json={"model": "gen", "input": "Hi"})
    assert r.status_code == 400 and "not an embedding model's adapter" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({}, 400, "'input' is required"),
        ({"input": ""}, 400, "input is empty"),
        ({"input": ["a", 3]}, 400, r"input\[1\] must be a non-empty text or a non-empty list of token ids"),
        ({"input": [[1, 2], []]}, 400, r"input\[1\] must be"),
        ({"input": [1, 10**9]}, 400, "token id 1000000000 is not in the vocabulary"),
        ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format must be float or base64"),
        ({"input": "a", "dimensions": 0}, 400, "dimensions must be an integer >= 1"),
        ({"input": "a", "dimensions": 100000}, 400, "dimensions 100000 is over the model's 576"),
        ({"input": "a", "model": "nope"}, 404, "nope"),
    ],
)
def test_bad_requests_fail_alone(http, body, status, words):
    r = http.post("/v1/embeddings", json={"model": "dates", **body})
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert "\n" not in message and re.search(words, message), message
    assert http.post("/v1/embeddings", json={"model": "dates", "input": "ok"}).status_code == 200
