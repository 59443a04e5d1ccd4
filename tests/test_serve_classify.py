"""`lorakit serve`'s POST /v1/classify (and vLLM's /classify): classifier adapters (a text classifier, a reward
model) served beside a generation adapter over one real default model, in a real server on loopback.

The oracle is PEFT: the same adapter folder on transformers' `LlamaForSequenceClassification` of the same weights,
each input alone, fed the token ids that training makes of it. Tolerance 1e-4 on logits of order 1, float32: the
server batches rows of different lengths (right padding) and pools before the head.
"""

from __future__ import annotations

import concurrent.futures as cf
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_serve import KEY, PROMPT, _random_adapter, serve_process, wait_until_up

import lorakit
from lorakit.data.tokenize import encode_example
from lorakit.generate import generate
from lorakit.models import load_model

from seqcls_oracle import random_classifier

pytestmark = pytest.mark.real_model

CLASSES = ["negative", "neutral", "positive"]
TEXTS = ["What a wonderful film.", "It was fine, I suppose, nothing more to say about it.", "Dull."]
CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]
TOKENS = 8


def _classifier(model_dir: Path, out: Path, labels: int, seed: int, names=None, problem=None) -> Path:
    targets = ["q_proj", "v_proj", "down_proj"]
    return random_classifier(
        model_dir, out, labels, seed, names=names, problem=problem, targets=targets, b_std=0.02, head_std=0.05
    )


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, default_model_dir) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("serve_classify")
    root = tmp / "root"
    _classifier(default_model_dir, root / "sentiment", 3, seed=1, names=CLASSES)
    _classifier(default_model_dir, root / "rm", 1, seed=2)
    _classifier(
        default_model_dir, root / "tags", 3, seed=3, names=CLASSES, problem="multi_label_classification"
    )
    model, _ = lorakit.load_model(str(default_model_dir))
    _random_adapter(model, "gen", seed=0)
    lorakit.save_adapter(model, root / "gen", "gen")
    headless = root / "headless"  # a reward adapter whose head was lost
    shutil.copytree(root / "rm", headless)
    file = headless / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(file).items() if "score" not in k}, file)
    return {"tmp": tmp, "root": root}


@pytest.fixture(scope="module")
def url(dirs, default_model_dir):
    root = dirs["root"]
    args = [
        "--model",
        str(default_model_dir),
        "--dtype",
        "float32",
        "--api-key",
        KEY,
        "--adapter-root",
        str(root),
    ]
    for name in ("sentiment", "rm", "gen", "tags"):
        args += ["--adapter", f"{name}={root / name}"]
    log = dirs["tmp"] / "server.log"
    with serve_process(args, log) as (base, proc):
        yield wait_until_up(base, proc, log)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def oracle(url, dirs, default_model_dir):
    """name -> token-id rows -> PEFT's logits, each row alone (built while the server starts)."""
    from peft import PeftModel

    models = {}
    for name, labels in (("sentiment", 3), ("rm", 1), ("tags", 3)):
        base, _ = load_model(str(default_model_dir), num_labels=labels, dtype=torch.float32)
        models[name] = PeftModel.from_pretrained(base, dirs["root"] / name).eval()

    def logits(name: str, rows: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([models[name](input_ids=torch.tensor([r])).logits for r in rows])

    return logits


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return lorakit.load_model(str(default_model_dir))[1]


def _classify(http, path: str = "/v1/classify", **body) -> dict:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _logits(answer: dict) -> torch.Tensor:
    return torch.tensor([d["logits"] for d in answer["data"]])


def test_a_classifier_scores_texts_as_peft_does(http, oracle, tok):
    rows = [tok(t)["input_ids"] for t in TEXTS]
    want = oracle("sentiment", rows)
    for path in ("/v1/classify", "/classify"):
        answer = _classify(http, path, model="sentiment", input=TEXTS)
        got = _logits(answer)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert answer["object"] == "list" and answer["model"] == "sentiment"
        assert answer["id"].startswith("classify-")
        assert answer["usage"]["prompt_tokens"] == sum(map(len, rows)) == answer["usage"]["total_tokens"]
        for i, d in enumerate(answer["data"]):
            assert d["index"] == i and d["num_classes"] == 3
            assert d["label"] == CLASSES[int(want[i].argmax())]
            torch.testing.assert_close(torch.tensor(d["probs"]), want[i].softmax(-1), atol=1e-4, rtol=0)
    assert 'lorakit_request_seconds_count{endpoint="classify",phase="total"}' in http.get("/metrics").text


def test_a_multi_label_classifier_answers_each_class_yes_or_no(http, oracle, tok):
    """A multi-label classifier's adapter (its metadata says so): each class's sigmoid, and the classes whose logit
    is over 0 in lorakit's `labels`."""
    answer = _classify(http, model="tags", input=TEXTS)
    want = oracle("tags", [tok(t)["input_ids"] for t in TEXTS])
    torch.testing.assert_close(_logits(answer), want, atol=1e-4, rtol=0)
    for d, row in zip(answer["data"], want, strict=True):
        torch.testing.assert_close(torch.tensor(d["probs"]), torch.sigmoid(row), atol=1e-4, rtol=0)
        assert d["labels"] == [c for c, v in zip(CLASSES, row, strict=True) if v > 0]
    said = [len(d["labels"]) for d in answer["data"]]
    assert max(said) > 0 and min(said) < len(CLASSES), said  # the rule is seen to pick, not all or nothing
    assert "labels" not in _classify(http, model="sentiment", input=TEXTS[0])["data"][0]


def test_model_cards_say_which_adapters_classify(http):
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert cards["sentiment"]["classifier"] == {"kind": "single_label_classification", "classes": CLASSES}
    assert cards["tags"]["classifier"] == {"kind": "multi_label_classification", "classes": CLASSES}
    assert cards["rm"]["classifier"] == {"kind": "reward", "classes": ["LABEL_0"]}
    assert "classifier" not in cards["gen"] and "classifier" not in http.get("/v1/models/gen").json()


def test_one_text_pairs_and_token_ids(http, oracle, tok):
    one = _classify(http, model="sentiment", input=TEXTS[0])
    assert len(one["data"]) == 1
    torch.testing.assert_close(
        _logits(one), oracle("sentiment", [tok(TEXTS[0])["input_ids"]]), atol=1e-4, rtol=0
    )
    pair = {"text": TEXTS[0], "text_pair": TEXTS[2]}
    answer = _classify(http, model="sentiment", input=[pair])
    want = oracle("sentiment", [tok(TEXTS[0], TEXTS[2])["input_ids"]])
    torch.testing.assert_close(_logits(answer), want, atol=1e-4, rtol=0)
    ids = [[1, 2, 3, 4], tok(TEXTS[1])["input_ids"]]
    torch.testing.assert_close(
        _logits(_classify(http, model="sentiment", input=ids)), oracle("sentiment", ids), atol=1e-4, rtol=0
    )
    single = _classify(http, model="sentiment", input=ids[0])  # one list of ids is one input
    assert len(single["data"]) == 1


def test_a_reward_model_scores_a_text_and_a_conversation_as_training_encodes_them(http, oracle, tok):
    text = _classify(http, model="rm", input="Paris is the capital of France.")
    ids = encode_example(
        tok, {"text": "Paris is the capital of France."}, max_len=10_000, chat=False
    ).input_ids
    assert ids[-1] == tok.eos_token_id
    want = oracle("rm", [ids])
    torch.testing.assert_close(_logits(text), want, atol=1e-4, rtol=0)
    d = text["data"][0]
    assert d["num_classes"] == 1 and d["label"] == "LABEL_0"
    assert d["probs"][0] == pytest.approx(float(torch.sigmoid(want[0, 0])), abs=1e-4)
    chat = _classify(http, model="rm", messages=CHAT)
    ids = encode_example(tok, {"messages": CHAT}, max_len=10_000).input_ids
    torch.testing.assert_close(_logits(chat), oracle("rm", [ids]), atol=1e-4, rtol=0)
    assert chat["usage"]["prompt_tokens"] == len(ids)


def test_generation_goes_on_beside_classification(http, dirs, default_model_dir):
    """Classify and generate requests at once: each answer equals its request served alone."""
    model, tok = lorakit.load_model(str(default_model_dir), dtype=torch.float32)
    lorakit.load_adapter(model, dirs["root"] / "gen", "gen")
    want = generate(model, tok, PROMPT, max_new_tokens=TOKENS, chat=False)
    alone = _logits(_classify(http, model="sentiment", input=TEXTS))

    def gen() -> str:
        body = {"model": "gen", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with cf.ThreadPoolExecutor(8) as pool:
        gens = [pool.submit(gen) for _ in range(4)]
        scores = [pool.submit(_classify, http, model="sentiment", input=TEXTS) for _ in range(4)]
        assert all(g.result().strip() == want.strip() for g in gens)
        for s in scores:
            torch.testing.assert_close(_logits(s.result()), alone, atol=1e-5, rtol=0)


def _error(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert words in message and "\n" not in message, message


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v1/classify", {"model": "gen", "input": "x"}, 400, "not a classifier's adapter"),
        ("/v1/classify", {"input": "x"}, 400, "has no classifier head"),
        ("/v1/classify", {"model": "nope", "input": "x"}, 404, "does not exist"),
        ("/v1/classify", {"model": "sentiment"}, 400, "send 'input'"),
        ("/v1/classify", {"model": "rm", "input": "x", "messages": CHAT}, 400, "one of the two"),
        ("/v1/classify", {"model": "sentiment", "input": []}, 400, "must be a text"),
        ("/v1/classify", {"model": "sentiment", "input": ["a", 3]}, 400, "input[1] must be"),
        ("/v1/classify", {"model": "sentiment", "input": ""}, 400, "input is empty"),
        ("/v1/classify", {"model": "sentiment", "input": [[1, -2]]}, 400, "out of range"),
        ("/v1/classify", {"model": "sentiment", "input": [[1] * 9000]}, 400, "over the context length"),
        ("/v1/classify", {"model": "sentiment", "input": [{"text": "a"}]}, 400, "must be a text"),
        ("/v1/classify", {"model": "sentiment", "messages": CHAT}, 400, "trained on texts"),
        ("/v1/classify", {"model": "rm", "messages": CHAT[:1]}, 400, "must end with the assistant"),
        ("/v1/classify", {"model": "rm", "input": {"text": "a", "text_pair": "b"}}, 400, "not a pair"),
        (
            "/v1/classify",
            {"model": "rm", "input": "x", "add_special_tokens": "yes"},
            400,
            "add_special_tokens",
        ),
        ("/v1/completions", {"model": "rm", "prompt": "x"}, 400, "does not generate"),
        ("/v1/chat/completions", {"model": "sentiment", "messages": CHAT}, 400, "does not generate"),
    ],
)
def test_bad_requests_fail_alone(http, path, body, status, words):
    _error(http.post(path, json=body), status, words)
    assert len(_classify(http, model="sentiment", input=TEXTS[0])["data"]) == 1  # the server goes on


def test_the_api_key_is_needed(url):
    r = httpx.post(f"{url}/v1/classify", json={"model": "sentiment", "input": "x"}, timeout=30)
    _error(r, 401, "API key")


def test_a_classifier_loads_and_unloads_at_run_time(http, dirs, oracle, tok):
    root = dirs["root"]
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "rm2", "lora_path": str(root / "rm")})
    assert r.status_code == 200, r.text
    ids = tok("Paris." + tok.eos_token, add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(
        _logits(_classify(http, model="rm2", input=[ids])), oracle("rm", [ids]), atol=1e-4, rtol=0
    )
    assert "rm2" in [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "rm2"}).status_code == 200
    _error(http.post("/v1/classify", json={"model": "rm2", "input": "x"}), 404, "does not exist")
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "h", "lora_path": str(root / "headless")})
    _error(r, 400, "without its head")
    assert "h" not in [m["id"] for m in http.get("/v1/models").json()["data"]]
