"""KTO: its feedback data, its loss and KL estimate, the config, runs that learn, its evaluation and `lorakit eval
--objective kto` (against TRL: test_kto_trl.py; under torchrun: test_ddp.py)."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.data.feedback import Feedback, mismatched, parse_feedback, read_feedback
from lorakit.data.files import DataError
from lorakit.data.jsonl import read_examples
from lorakit.data.tokenize import IGNORE, Encoded
from lorakit.errors import ConfigError
from lorakit.train.config import load_config
from lorakit.train.datasets import kto_balance
from lorakit.train.losses import kto_losses

from runs import answer_nll, pairs_run
from tiny import write_jsonl


def test_feedback_files_in_each_shape(tmp_path):
    """TRL's {"prompt", "completion", "label"} (texts and messages), LLaMA-Factory's ShareGPT with a kto_tag, a
    CSV whose labels are text, a column renamed to label by data.fields; each label kept with its example."""
    trl = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "2+2=", "completion": "4", "label": True}])
    assert read_feedback(trl) == [{"example": {"prompt": "2+2=", "completion": "4"}, "desirable": True}]
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "2+2?"}],
                "completion": [{"role": "assistant", "content": "5"}],
            }
            | {"label": False}
        ],
    )
    (item,) = read_feedback(chat)
    assert item["desirable"] is False and [m["role"] for m in item["example"]["messages"]] == [
        "user",
        "assistant",
    ]
    talk = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "whatever"},
    ]
    (item,) = read_feedback(write_jsonl(tmp_path / "talk.jsonl", [{"messages": talk, "label": False}]))
    # the label rates the last answer: the earlier assistant turn is the prompt's, not learned
    assert [m.get("weight") for m in item["example"]["messages"]] == [None, 0, None, None]
    sharegpt = write_jsonl(
        tmp_path / "lf.jsonl",
        [
            {
                "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
                "kto_tag": True,
            },
            {
                "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "go away"}],
                "kto_tag": False,
            },
        ],
    )
    assert [f["desirable"] for f in read_feedback(sharegpt)] == [True, False]
    table = b"question,answer,good\nq1,a1,true\nq2,a2,0\nq3,a3,FALSE\nq4,a4,1\n"
    fields = {"prompt": "question", "completion": "answer", "label": "good"}
    items = parse_feedback(table, "rated.csv", fields)
    assert [f["desirable"] for f in items] == [True, False, False, True]
    assert items[0]["example"] == {"prompt": "q1", "completion": "a1"}


def test_a_file_of_pairs_is_read_as_feedback_chosen_first():
    data = b"".join(
        json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": f"{i}+1"}).encode() + b"\n"
        for i in range(3)
    )
    items = parse_feedback(data, "pairs.jsonl")
    assert [f["desirable"] for f in items] == [True, True, True, False, False, False]
    assert [f["example"]["completion"] for f in items] == ["1", "2", "3", "0+1", "1+1", "2+1"]


@pytest.mark.parametrize(
    "records, words",
    [
        ([{"prompt": "a", "completion": "b"}], "rated.jsonl:1: no label; KTO needs each example's 'label'"),
        (
            [{"prompt": "a", "completion": "b", "label": "maybe"}],
            "rated.jsonl:1: 'label' must be true or false, got",
        ),
        (
            [{"prompt": "a", "completion": "b", "kto_tag": 2}],
            "rated.jsonl:1: 'kto_tag' must be true or false",
        ),
        ([{"prompt": "a", "label": True}], "rated.jsonl:1: unknown fields"),
        ([], "rated.jsonl: no feedback (the file is empty)"),
    ],
)
def test_bad_feedback_is_refused_naming_the_record(records, words):
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    with pytest.raises(DataError) as e:
        parse_feedback(data, "rated.jsonl")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_supervised_fine_tuning_refuses_feedback(tmp_path):
    """Its undesirable answers would be learned like the others: refused, naming the record and the way out."""
    path = write_jsonl(tmp_path / "rated.jsonl", [{"prompt": "a", "completion": "b", "label": False}])
    with pytest.raises(
        DataError, match=r"rated.jsonl:1: 'label' marks an answer desirable or not .*objective kto"
    ):
        read_examples(path)
    path = write_jsonl(tmp_path / "lf.jsonl", [{"instruction": "a", "output": "b", "kto_tag": True}])
    with pytest.raises(DataError, match="'kto_tag' marks"):
        read_examples(path)


def test_a_kl_row_is_one_prompt_with_another_answer():
    one = Feedback(Encoded([5, 6, 7, 1, 2], [IGNORE, IGNORE, IGNORE, 1, 2]), True)
    two = Feedback(Encoded([8, 9, 3, 4, 0], [IGNORE, IGNORE, 3, 4, 0]), False)
    row = mismatched(one, two, max_len=16)
    assert row.input_ids == [5, 6, 7, 3, 4, 0] and row.labels == [IGNORE, IGNORE, IGNORE, 3, 4, 0]
    assert mismatched(two, one, max_len=3).input_ids == [8, 9, 1]  # cut to data.max_len


def test_kto_loss_is_the_papers():
    """λD (1 - σ(β (r - z))) for desirable rows, λU (1 - σ(β (z - r))) for undesirable ones, r = policy - reference,
    z = the mean log-ratio of the KL rows clamped at 0 and without gradient; float64 here (1e-6)."""
    g = torch.Generator().manual_seed(0)
    policy = -torch.rand(6, generator=g, dtype=torch.float64) * 20
    ref = -torch.rand(6, generator=g, dtype=torch.float64) * 20
    kl_policy, kl_ref = -torch.rand(6, generator=g, dtype=torch.float64) * 20, torch.full((6,), -14.0)
    good = torch.tensor([True, False, True, True, False, False])
    x = policy.float().requires_grad_()
    kl_x = kl_policy.float().requires_grad_()
    losses, rewards, kl = kto_losses(x, ref.float(), kl_x, kl_ref.float(), good, beta=0.3, weights=(1.5, 0.5))
    z = max(float((kl_policy - kl_ref).mean()), 0.0)
    assert z > 0 and float(kl) == pytest.approx(z, abs=1e-5)
    r = policy - ref
    want = torch.where(
        good, 1.5 * (1 - torch.sigmoid(0.3 * (r - z))), 0.5 * (1 - torch.sigmoid(0.3 * (z - r)))
    )
    torch.testing.assert_close(losses.double(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(rewards.double(), 0.3 * r, atol=1e-5, rtol=0)
    losses.sum().backward()
    assert kl_x.grad is None and torch.isfinite(x.grad).all()  # z carries no gradient
    _, _, clamped = kto_losses(x, ref.float(), kl_ref.float() - 1, kl_ref.float(), good, beta=0.3)
    assert float(clamped) == 0.0  # a negative estimate is clamped


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["--kto.beta", "0.2"], "kto.beta is set but train.objective is 'sft'; use --train.objective kto"),
        (
            ["--objective", "dpo", "--kto.sft_weight", "1"],
            "kto.sft_weight is set but train.objective is 'dpo'",
        ),
        (["--objective", "kto", "--kto.beta", "0"], "kto.beta must be > 0, got 0.0"),
        (["--objective", "kto", "--kto.desirable_weight", "0"], "kto.desirable_weight must be > 0"),
        (["--objective", "kto", "--kto.undesirable_weight", "-1"], "kto.undesirable_weight must be > 0"),
        (["--objective", "kto", "--kto.sft_weight", "-1"], "kto.sft_weight must be >= 0"),
        (
            ["--objective", "kto", "--train.batch_size", "1"],
            "train.objective kto needs train.batch_size >= 2",
        ),
        (["--objective", "kto", "--lora.init", "pissa"], "which KTO takes as its reference"),
        (["--objective", "kto", "--method", "ladder"], "train.objective kto takes the base as its reference"),
        (["--objective", "kto", "--lora.use_kasa", "true"], "KaSA changes the base, KTO's reference"),
        (["--objective", "kto", "--data.pack", "true"], "data.pack does not work with train.objective kto"),
        (["--objective", "kto", "--train.fsdp", "true"], "train.fsdp does not work with train.objective kto"),
    ],
)
def test_bad_kto_settings_are_refused(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert words in str(e.value)


def test_the_balance_advice_is_the_papers():
    assert kto_balance(10, 10, 1.0, 1.0) is None
    assert kto_balance(10, 12, 1.3, 1.0) is None  # 13 / 12: in [1, 4/3]
    advice = kto_balance(10, 30, 1.0, 1.0)
    assert "ratio of 0.33" in advice and "kto.desirable_weight in [3.00, 4.00]" in advice
    assert "no undesirable answer" in kto_balance(5, 0, 1.0, 1.0)


def test_a_run_learns_from_feedback(tmp_path):
    """20 steps (β 1, lr 3e-2) on the tiny addition pairs read as feedback (the sums desirable, the echoes not): the held-out
    answers' KTO loss falls, their rewards move to their label's side, and every step's record has the KL
    estimate; config.yaml keeps the kto section."""
    records: list[dict] = []
    summary, _ = pairs_run(
        tmp_path,
        *("--train.steps", "20", "--kto.beta", "1", "--train.lr", "3e-2"),
        objective="kto",
        callbacks=[records.append],
    )
    before, after = summary["before"], summary["after"]
    assert before["loss"] == pytest.approx(0.5, abs=1e-6) and before["reward_accuracy"] == 0.0  # r = z = 0
    assert after["loss"] < before["loss"] - 0.05
    assert after["reward_accuracy"] >= 0.7 and after["reward_margin"] > 0.2
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 20 and all("kl" in r and r["kl"] >= 0 for r in steps)
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "objective: kto" in config and "desirable_weight: 1.0" in config
    assert summary["data"]["train"]["desirable"] == summary["data"]["train"]["undesirable"] == 32


def test_from_an_adapter_that_adapter_is_the_reference(tmp_path):
    """train.init_adapter: KTO's reference is the adapter as it was, so the first step's loss is exactly the
    weighted 1 - σ(0) = 1/2 of every row (r = z = 0), although the adapter is far from the base."""
    pairs_run(tmp_path / "first", "--train.steps", "10", objective="orpo")
    records: list[dict] = []
    start = tmp_path / "first" / "run" / "adapter"
    pairs_run(
        tmp_path / "second",
        *("--train.steps", "2", "--train.init_adapter", str(start)),
        *("--kto.desirable_weight", "1.2", "--kto.undesirable_weight", "0.8"),
        objective="kto",
        callbacks=[records.append],
    )
    from lorakit.train.config import RunConfig, TrainSection
    from lorakit.train.schedule import batch_order

    first = next(r for r in records if "loss" in r)
    # the 64 rows are the 32 sums (desirable) then the 32 echoes: the first micro-batch's weights, halved
    order = batch_order(64, 0, 0, RunConfig(train=TrainSection(batch_size=4)))
    want = sum(0.6 if i < 32 else 0.4 for i in order) / 4
    assert (
        first["loss"] == pytest.approx(want, abs=1e-6)
        and first["kl"] == 0.0
        and first["reward_margin"] == 0.0
    )
    assert len({i < 32 for i in order}) == 2  # both labels in it: the weights are told apart


def test_sft_weight_adds_the_desirable_answers_token_loss(tmp_path):
    """kto.sft_weight w: a batch's loss grows by w times the mean over its desirable rows of each answer's mean
    token loss, computed here from the model's logits (1e-5)."""
    from fsdp_worker import char_tokenizer

    import lorakit
    from lorakit.data.feedback import encode_feedback
    from lorakit.train.config import KtoSection, RunConfig, TrainSection
    from lorakit.train.objectives import make_objective
    from lorakit.train.schedule import collate

    from tiny import tiny_llama

    tok = char_tokenizer()
    items = [
        {"example": {"prompt": f"{i}+1=", "completion": str(i + 1)}, "desirable": i % 3 != 0}
        for i in range(6)
    ]
    rows, _ = encode_feedback(tok, items, max_len=16, chat=False)
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear", init="random"))
    losses = {}
    for weight in (0.0, 0.7):
        cfg = RunConfig(train=TrainSection(objective="kto"), kto=KtoSection(sft_weight=weight))
        objective = make_objective(cfg)
        batch = {**collate(objective.encoded(rows), 0), **objective.extras(rows)}
        losses[weight] = float(objective.loss(model, batch, fused=True)[0].detach())
    per_answer = answer_nll(model, collate([r.row for r in rows if r.desirable], 0))
    assert losses[0.7] - losses[0.0] == pytest.approx(0.7 * float(per_answer.mean()), abs=1e-5)


def test_evaluation_folds_a_last_single_row_into_the_batch_before(tmp_path):
    """`feedback_eval` in batches of 4 over 9 rows is the same as over one batch of 9 (the ninth row alone would
    estimate KL from its own answer), and differs from batches of 3 (1e-6)."""
    from fsdp_worker import char_tokenizer

    import lorakit
    from lorakit.data.feedback import encode_feedback
    from lorakit.train.config import RunConfig, TrainSection
    from lorakit.train.evaluate import feedback_eval
    from lorakit.train.objectives import make_objective

    from tiny import tiny_llama

    tok = char_tokenizer()
    items = [
        {"example": {"prompt": f"{i}*2=", "completion": str(2 * i)}, "desirable": i % 2 == 0}
        for i in range(9)
    ]
    rows, _ = encode_feedback(tok, items, max_len=16, chat=False)
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear", init="random"))
    objective = make_objective(RunConfig(train=TrainSection(objective="kto")))
    fours = feedback_eval(model, rows[:8], 0, objective, batch_size=4)
    nine = feedback_eval(model, rows, 0, objective, batch_size=9)
    folded = feedback_eval(model, rows, 0, objective, batch_size=8)
    assert folded == pytest.approx(nine, abs=1e-6)
    assert feedback_eval(model, rows, 0, objective, batch_size=3) != pytest.approx(nine, abs=1e-6)
    assert set(fours) == {"loss", "reward_accuracy", "reward_margin", "kl"}


def test_lorakit_eval_measures_kto_against_the_base(tmp_path, capsys):
    """`lorakit eval --objective kto` on a file of rated answers: the adapter's KTO loss, reward accuracy, margin
    and KL estimate are `feedback_eval`'s with the base as reference (1e-5); the base is not measured against
    itself. Without --data, it is refused."""
    import lorakit
    from lorakit.cli import main
    from lorakit.config import LoraConfig
    from lorakit.data.feedback import encode_feedback
    from lorakit.train.config import KtoSection, RunConfig, TrainSection
    from lorakit.train.evaluate import feedback_eval
    from lorakit.train.objectives import make_objective

    from runs import eval_pairs_setup
    from tiny import tiny_llama

    model, tok, _, args = eval_pairs_setup(tmp_path)
    rated = [
        {"prompt": f"{i}+1=", "completion": str(i + 1 if i % 2 else i), "label": bool(i % 2)}
        for i in range(6)
    ]
    data = write_jsonl(tmp_path / "rated.jsonl", rated)
    with_adapter = tiny_llama()
    lorakit.inject(with_adapter, LoraConfig(r=4, alpha=8, targets="all-linear", init="random"))
    lorakit.save_adapter(with_adapter, tmp_path / "adapter")
    rows, _ = encode_feedback(tok, read_feedback(data), max_len=256, chat=False)
    cfg = RunConfig(train=TrainSection(objective="kto"), kto=KtoSection(beta=0.3))
    want = feedback_eval(with_adapter, rows, tok.pad_token_id, make_objective(cfg))
    cmd = [*args[:3], "--data", str(data), *args[5:], "--adapter", str(tmp_path / "adapter")]
    assert main([*cmd, "--compare-base", "--objective", "kto", "--beta", "0.3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["objective"] == "kto" and report["answers"] == 6 and report["beta"] == 0.3
    assert not any(k.startswith("preference_") for k in report["base"])
    for k, v in want.items():
        assert report["adapter"][f"preference_{k}"] == pytest.approx(v, abs=1e-5), k
    assert report["adapter"]["accuracy_examples"] == 3  # exact match on the desirable answers
    assert main([*cmd, "--objective", "kto"]) == 0
    assert "6 rated answers" in capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "model"), "--task", "dates", "--objective", "kto"]) == 2
    assert "--objective kto measures answers labelled desirable or not" in capsys.readouterr().err


@pytest.mark.real_model
def test_kto_on_the_default_model(tmp_path):
    """SmolLM2-135M-Instruct on the built-in task's pairs read as feedback, 6 steps of 6 answers: the held-out
    answers' KTO loss falls from 1/2 and most rewards move to their label's side; the adapter loads back."""
    import lorakit
    from lorakit.train.run import run_training

    cfg = load_config(
        None,
        [
            *("--objective", "kto", "--kto.beta", "0.5", "--train.steps", "6", "--train.batch_size", "6"),
            *("--train.lr", "3e-3"),
            *(
                "--data.n_train",
                "32",
                "--data.n_eval",
                "8",
                "--eval.limit",
                "4",
                "--eval.max_new_tokens",
                "8",
            ),
            *("--train.out_dir", str(tmp_path)),
        ],
    )
    summary = run_training(cfg)
    before, after = summary["before"], summary["after"]
    assert before["loss"] == pytest.approx(0.5, abs=1e-3) and before["reward_accuracy"] == 0.0
    assert after["loss"] < 0.45 and after["reward_accuracy"] >= 0.75 and after["reward_margin"] > 0
    assert summary["data"]["train"]["rows"] == 64
    assert lorakit.read_adapter(tmp_path / "adapter")[0].r == 16


def test_a_data_driven_init_reads_the_answers_not_the_kl_rows(tmp_path):
    """EVA (an init KTO accepts: it starts at zero) reads the run's token rows: the answers, without the KL rows
    that only the loss needs; the run trains."""
    from lorakit.train.config import RunConfig, TrainSection
    from lorakit.train.objectives import make_objective

    rows = [Feedback(Encoded([5, 6, 7, i], [IGNORE, IGNORE, 7, i]), i % 2 == 0) for i in range(4)]
    objective = make_objective(RunConfig(train=TrainSection(objective="kto")))
    assert objective.token_rows(rows) == [r.row for r in rows] and len(objective.encoded(rows)) == 8
    eva = ("--lora.init", "eva", "--lora.eva_label_mask", "false")  # every token: the tiny answers are short
    summary, _ = pairs_run(tmp_path, "--train.steps", "2", *eva, objective="kto")
    assert summary["steps"] == 2 and (tmp_path / "run" / "adapter").is_dir()
