"""Reward models (`train.objective reward`): the loss, TRL's RewardTrainer as the oracle, PEFT loading the adapter
both ways, a run end to end (4-bit and bf16 bases too), the refused settings, and the real default model.

The tiny model is a random 2-layer Llama with SmolLM2's real tokenizer and chat template (trl_dpo_oracle's),
loaded as a one-output sequence classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.data.preference import as_pair, encode_pairs
from lorakit.errors import ConfigError
from lorakit.models import load_model
from lorakit.train.config import RewardSection, RunConfig, TrainSection, load_config
from lorakit.train.loop import train_loop
from lorakit.train.losses import reward_losses
from lorakit.train.objectives import make_objective
from lorakit.train.run import run_training

from test_dpo_trl import CHAT_PAIRS, TEXT_PAIRS
from tiny import cli_here, snapshot, unchanged
from trl_dpo_oracle import build_tiny_model
from trl_reward_oracle import trl_reward

STEPS, LR = 3, 5e-3


@pytest.fixture(scope="module")
def folders(tmp_path_factory, default_model_dir):
    """(tiny model folder, a lorakit reward adapter on it: LoRA with random A and B on every linear layer and the
    head's trained copy, saved in the PEFT layout)."""
    root = tmp_path_factory.mktemp("reward")
    model_dir = build_tiny_model(default_model_dir, root / "model")
    torch.manual_seed(5)
    model, _ = load_model(str(model_dir), num_labels=1)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model_dir, lorakit.save_adapter(model, root / "adapter")


def test_the_loss_is_bradley_terry_plus_the_centring_term():
    """Against the formula in float64 (1e-12: the same operations in another order)."""
    rewards = torch.tensor([1.5, -0.2, 0.3, 0.7, 0.1, 0.9], dtype=torch.float64)
    c, r = rewards[:3], rewards[3:]
    want = sum(-torch.log(torch.sigmoid(c[i] - r[i])) for i in range(3)) / 3
    loss, chosen, rejected = reward_losses(rewards)
    assert float(loss) == pytest.approx(float(want), abs=1e-12)
    assert torch.equal(chosen, c) and torch.equal(rejected, r)
    centred, _, _ = reward_losses(rewards, center_weight=0.25)
    extra = 0.25 * sum((c[i] + r[i]) ** 2 for i in range(3)) / 3
    assert float(centred) == pytest.approx(float(want + extra), abs=1e-12)
    m = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    with_margin, _, _ = reward_losses(rewards, margin=m)
    want_m = sum(-torch.log(torch.sigmoid(c[i] - r[i] - m[i])) for i in range(3)) / 3
    assert float(with_margin) == pytest.approx(float(want_m), abs=1e-12)


@pytest.mark.parametrize("margin", ["1", True, float("nan"), [1]])
def test_a_bad_margin_is_refused_naming_the_record(tmp_path, margin):
    from lorakit.data.files import DataError
    from lorakit.data.preference import read_pairs

    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "margin": margin}) + "\n")
    with pytest.raises(DataError, match=r"m.jsonl:1: 'margin' must be a finite number"):
        read_pairs(path)


def _lorakit(model_dir: Path, adapter_dir: Path, pairs, *, chat: bool, out: Path, center_weight: float = 0.0):
    model, tok = load_model(str(model_dir), num_labels=1)
    lorakit.load_adapter(model, adapter_dir, trainable=True)
    rows, _ = encode_pairs(tok, [as_pair(p, "explicit", "pair") for p in pairs], max_len=512, chat=chat)
    cfg = RunConfig(
        train=TrainSection(
            out_dir=str(out),
            steps=STEPS,
            batch_size=len(rows),
            lr=LR,
            schedule="constant",
            warmup_steps=0,
            save_every=0,
            max_grad_norm=1.0,
            objective="reward",
        ),
        reward=RewardSection(center_weight=center_weight),
    )
    records: list[dict] = []
    train_loop(
        model,
        rows,
        cfg,
        pad_id=tok.pad_token_id,
        out_dir=out,
        objective=make_objective(cfg),
        callbacks=[records.append],
    )
    return rows, records, model, tok


MARGINS = [1.0, 0.5, 2.0, 0.0]


@pytest.mark.parametrize(
    "pairs, chat, center_weight",
    [
        (CHAT_PAIRS, True, 0.0),
        (TEXT_PAIRS, False, 0.01),
        (CHAT_PAIRS, True, 0.5),
        ([{**p, "margin": m} for p, m in zip(CHAT_PAIRS, MARGINS, strict=True)], True, 0.0),
    ],
    ids=["chat", "text-centred", "chat-centred", "chat-margin"],
)
def test_reward_training_equals_trl(folders, tmp_path, pairs, chat, center_weight):
    """Every step's loss, accuracy and margin to 1e-5 and the trained adapter (LoRA and the head) to 1e-5: both
    run the same forward of the same model in float32 (no chunked head here), so only the summation order of
    the padded batch's kernels differs."""
    model_dir, adapter_dir = folders
    rows, records, model, _ = _lorakit(
        model_dir, adapter_dir, pairs, chat=chat, out=tmp_path / "ours", center_weight=center_weight
    )
    ids = [(p.chosen.input_ids, p.rejected.input_ids) for p in rows]
    theirs = trl_reward(
        str(model_dir),
        str(adapter_dir),
        ids,
        steps=STEPS,
        lr=LR,
        center_weight=center_weight,
        margins=[p["margin"] for p in pairs] if "margin" in pairs[0] else None,
        out_dir=str(tmp_path / "trl"),
    )
    steps = [r for r in records if "loss" in r]
    assert len(steps) == len(theirs["logs"]) == STEPS
    for ours, trl in zip(steps, theirs["logs"], strict=True):
        assert ours["loss"] == pytest.approx(trl["loss"], abs=1e-5), ours["step"]
        assert ours["reward_accuracy"] == pytest.approx(trl["accuracy"], abs=1e-6), ours["step"]
        assert ours["reward_margin"] == pytest.approx(trl["margin"], abs=1e-5), ours["step"]
    adapter = lorakit.adapter_state_dict(model)
    assert set(adapter) == set(theirs["adapter"]) and "base_model.model.score.weight" in adapter
    for key, value in theirs["adapter"].items():
        torch.testing.assert_close(adapter[key], value, atol=1e-5, rtol=0, msg=key)
    # the check above is of an adapter that moved
    start = lorakit.adapter_state_dict(_loaded(model_dir, adapter_dir))
    assert max(float((adapter[k] - start[k]).abs().max()) for k in start) > 1e-3


def _loaded(model_dir: Path, adapter_dir: Path):
    model, _ = load_model(str(model_dir), num_labels=1)
    lorakit.load_adapter(model, adapter_dir)
    return model


def _texts(tok) -> list[str]:
    chats = [[*p["prompt"], *p[side]] for p in CHAT_PAIRS for side in ("chosen", "rejected")]
    return [tok.apply_chat_template(c, tokenize=False) for c in chats]


def test_the_reward_adapter_loads_in_peft_and_peft_s_in_lorakit(folders, tmp_path):
    """A trained lorakit reward adapter gives PEFT's AutoModelForSequenceClassification + PeftModel the same
    rewards on a padded batch, and a SEQ_CLS adapter that PEFT made gives lorakit PEFT's rewards (1e-5: one
    float32 forward pass each, the same weights)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model_dir, adapter_dir = folders
    _, _, model, tok = _lorakit(model_dir, adapter_dir, CHAT_PAIRS, chat=True, out=tmp_path / "run")
    saved = lorakit.save_adapter(model, tmp_path / "trained")
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    batch = tok(_texts(tok), return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        ours = model(**batch).logits[:, 0]

    def peft_base():
        base = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, dtype=torch.float32, local_files_only=True
        )
        base.config.pad_token_id = tok.pad_token_id
        return base

    with torch.no_grad():
        theirs = PeftModel.from_pretrained(peft_base(), saved).eval()(**batch).logits[:, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, ours.mean().expand_as(ours))  # the rewards tell the answers apart

    torch.manual_seed(9)
    peft_model = get_peft_model(
        peft_base(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "from_peft")
    with torch.no_grad():
        want = peft_model.eval()(**batch).logits[:, 0]
    ours_model, _ = load_model(str(model_dir), num_labels=1)
    lorakit.load_adapter(ours_model, tmp_path / "from_peft")
    with torch.no_grad():
        got = ours_model(**batch).logits[:, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _tiny_run(model_dir: Path, tmp_path: Path, *overrides: str, callbacks=None) -> dict:
    cfg = load_config(
        None,
        [
            *("--model.path", str(model_dir), "--train.objective", "reward"),
            *("--data.n_train", "32", "--data.n_eval", "16"),
            *("--train.steps", "12", "--train.batch_size", "4"),
            *("--train.lr", "5e-3", "--train.out_dir", str(tmp_path / "run"), "--train.save_every", "6"),
            *overrides,
        ],
    )
    return run_training(cfg, callbacks=callbacks)


def test_a_run_learns_and_saves_a_reward_model(folders, tmp_path):
    """`lorakit train --objective reward` end to end on the built-in task's pairs: the eval reports the rewards'
    accuracy and margin (no exact match: the model generates nothing), the loss falls, and the run folder's
    adapter is a SEQ_CLS one with the head, which reloads onto a fresh classifier with the same rewards."""
    model_dir, _ = folders
    summary = _tiny_run(model_dir, tmp_path, "--model.dtype", "float32")
    before, after = summary["before"], summary["after"]
    assert set(before) == {"loss", "reward_accuracy", "reward_margin"}
    assert after["loss"] < before["loss"] and after["reward_margin"] > before["reward_margin"]
    adapter = Path(summary["adapter"])
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward_accuracy" in m for m in metrics if "loss" in m)
    assert (tmp_path / "run" / "checkpoints" / "step-000006").is_dir()


def test_a_resumed_run_and_a_checkpointed_one_equal_the_plain_run(folders, tmp_path):
    """Interrupted at step 8 and resumed from its step-6 checkpoint (the head's copy is in the checkpoint), and
    with gradient checkpointing: the adapter of 12 plain steps, head included (1e-5: the same float32 ops, up to
    the recomputed forward's summation order)."""
    from lorakit.train.loop import TrainingError

    model_dir, _ = folders
    f32 = ("--model.dtype", "float32")
    plain = lorakit.read_adapter(_tiny_run(model_dir, tmp_path / "a", *f32)["adapter"])[1]

    def interrupt(rec):
        if rec.get("step") == 8:
            raise KeyboardInterrupt

    with pytest.raises(TrainingError, match="interrupted at step 8"):
        _tiny_run(model_dir, tmp_path / "b", *f32, callbacks=[interrupt])
    resumed = _tiny_run(model_dir, tmp_path / "b", *f32, "--train.resume", "auto")
    checkpointed = _tiny_run(model_dir, tmp_path / "c", *f32, "--train.grad_checkpointing", "true")
    assert "base_model.model.score.weight" in plain
    for summary in (resumed, checkpointed):
        other = lorakit.read_adapter(summary["adapter"])[1]
        assert set(other) == set(plain)
        for k in plain:
            torch.testing.assert_close(other[k], plain[k], atol=1e-5, rtol=0, msg=k)


def test_a_reward_model_on_a_bf16_base_evaluates_and_trains(folders, tmp_path):
    """A bf16 base with the head's float32 copy (model.adapter_dtype float32): the evaluations, outside
    autocast, run the copy in float32 and hand bf16 on, as the base's head would."""
    model_dir, _ = folders
    summary = _tiny_run(model_dir, tmp_path, "--model.dtype", "bfloat16", "--train.steps", "4")
    assert summary["after"]["loss"] < summary["before"]["loss"]


def test_a_reward_model_on_a_4_bit_base(folders, tmp_path):
    """QLoRA: the body in NF4, the head left in full precision (new, and trained whole)."""
    from lorakit.quant.load import load_quantized
    from lorakit.quant.nf4 import NF4Linear

    model_dir, _ = folders
    model, _, report = load_quantized(str(model_dir), num_labels=1)
    assert type(model.score) is torch.nn.Linear and "score" in report.skipped
    assert any(isinstance(m, NF4Linear) for m in model.modules())
    summary = _tiny_run(model_dir, tmp_path, "--model.quantize", "nf4", "--model.dtype", "float32")
    assert summary["quantization"] is not None
    assert summary["after"]["loss"] < summary["before"]["loss"]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["--reward.center_weight", "-1"], "reward.center_weight must be >= 0"),
        (["--train.method", "ladder"], "ladder"),
        (["--lora.init", "lora_ga"], "lora_ga"),
        (["--train.best_metric", "accuracy", "--train.eval_every", "5"], "does not generate"),
        (["--data.pack", "true"], "data.pack"),
        (["--train.fsdp", "true"], "train.fsdp"),
    ],
)
def test_refused_settings(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, ["--train.objective", "reward", *overrides])


def test_the_reward_section_is_refused_with_another_objective():
    with pytest.raises(ConfigError, match="reward.center_weight is set but train.objective is 'dpo'"):
        load_config(None, ["--train.objective", "dpo", "--reward.center_weight", "0.01"])


def test_a_causal_lm_adapter_cannot_start_a_reward_model(tmp_path):
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM", "peft_type": "LORA"}))
    with pytest.raises(ConfigError, match="is a CAUSAL_LM adapter.*merge it"):
        load_config(None, ["--train.objective", "reward", "--train.init_adapter", str(folder)])


def test_a_causal_lm_passed_in_is_refused(folders, tmp_path):
    model_dir, _ = folders
    model, tok = load_model(str(model_dir))
    before = snapshot(model)
    cfg = load_config(  # with QLoRA too: refused before the model would be quantized in place
        None,
        ["--train.objective", "reward", "--train.out_dir", str(tmp_path / "run"), "--model.quantize", "nf4"],
    )
    with pytest.raises(ConfigError, match=r"load_model\(\.\.\., num_labels=1\)"):
        run_training(cfg, model=model, tokenizer=tok)
    assert unchanged(model, before) and not lorakit.adapter_names(model)


def test_num_labels_must_be_positive(folders):
    with pytest.raises(ValueError, match="num_labels must be >= 1"):
        load_model(str(folders[0]), num_labels=0)


@pytest.mark.real_model
def test_a_reward_model_of_smollm2_ranks_the_answers(tmp_path):
    """The real default model, float32, 6 steps of 4 pairs of the built-in task (each ISO date preferred to the
    same date written another way): held-out reward accuracy at least 90 % after (95 % seen), and the loss
    lower."""
    cfg = load_config(
        None,
        [
            *("--train.objective", "reward", "--model.dtype", "float32", "--train.steps", "6"),
            *("--train.batch_size", "4"),
            *("--data.n_train", "80", "--data.n_eval", "20", "--train.save_every", "0"),
            *("--train.out_dir", str(tmp_path / "run")),
        ],
    )
    summary = run_training(cfg)
    before, after = summary["before"], summary["after"]
    assert after["loss"] < before["loss"] and after["reward_accuracy"] >= 0.9, (before, after)


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory):
    """A reward adapter trained by `lorakit train --objective reward` on the tiny model (float32)."""
    model_dir, _ = folders
    tmp = tmp_path_factory.mktemp("trained")
    return Path(_tiny_run(model_dir, tmp, "--model.dtype", "float32")["adapter"])


def test_a_reward_adapter_is_refused_by_a_causal_lm(folders, trained):
    """Without its head the adapter would run the LM head and answer nonsense: an error naming the head, and the
    model as it was."""
    model, _ = load_model(str(folders[0]))
    before = snapshot(model)
    with pytest.raises(lorakit.AdapterError, match="holds a trained 'score'.*SEQ_CLS.*num_labels"):
        lorakit.load_adapter(model, trained)
    assert unchanged(model, before) and not lorakit.adapter_names(model)


def test_merge_writes_a_reward_model_transformers_loads(folders, trained, tmp_path, capsys):
    """`lorakit merge` of a reward adapter writes a ...ForSequenceClassification folder whose rewards, in plain
    transformers, are the adapter's (1e-5: float32, the merged weights W0 + ΔW against the unmerged sum)."""
    from transformers import AutoModelForSequenceClassification

    model_dir, _ = folders
    out = tmp_path / "merged"
    proc = cli_here(capsys, "merge", "--model", str(model_dir), "--adapter", str(trained), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert (
        config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] is not None
    )
    ours = _loaded(model_dir, trained).eval()
    tok = lorakit.load_model(str(model_dir))[1]
    batch = tok(_texts(tok), return_tensors="pt", padding=True)
    merged = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, ours(**batch).logits, atol=1e-5, rtol=0)


def test_eval_measures_a_reward_adapter(folders, trained, tmp_path, capsys):
    """`lorakit eval --adapter` of a reward model: its rewards' accuracy and margin on a pairs file, as the
    training run's evaluation computes them (`preference_eval`, the same rows), and the refused options."""
    from lorakit.train.datasets import encode_preferences
    from lorakit.train.evaluate import preference_eval

    model_dir, _ = folders
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in TEXT_PAIRS))
    common = ("eval", "--model", str(model_dir), "--adapter", str(trained), "--dtype", "float32")
    proc = cli_here(capsys, *common, "--data", str(data), "--no-chat", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    model = _loaded(model_dir, trained)
    tok = lorakit.load_model(str(model_dir))[1]
    rows, _ = encode_pairs(tok, [as_pair(p, "explicit", "pair") for p in TEXT_PAIRS], max_len=256, chat=False)
    cfg = RunConfig(train=TrainSection(objective="reward"))
    want = preference_eval(model, rows, tok.pad_token_id, make_objective(cfg))
    assert report["objective"] == "reward" and report["pairs"] == 4
    for key in ("loss", "reward_accuracy", "reward_margin"):
        assert report["adapter"][key] == pytest.approx(want[key], abs=1e-5), key
    assert len(report["adapter"]["samples"]) == 3
    text = cli_here(capsys, *common, "--task", "dates", "--limit", "8")
    assert text.returncode == 0 and "reward accuracy:" in text.stdout and "8 preference pairs" in text.stdout
    # --task: the first of the pairs a default run holds out (their rejected answers drawn after the train pairs')
    task = json.loads(cli_here(capsys, *common, "--task", "dates", "--limit", "8", "--json").stdout)
    held_out = encode_preferences(load_config(None, ["--objective", "reward"]), tok, lambda _: None).eval_rows
    want = preference_eval(model, held_out[:8], tok.pad_token_id, make_objective(cfg))
    assert task["adapter"]["loss"] == pytest.approx(want["loss"], abs=1e-5)
    for extra, words in (
        (("--compare-base",), "--compare-base: a reward model's base"),
        (("--objective", "dpo"), "measure it with --objective reward"),
        (("--beta", "0.1"), "with no beta"),
    ):
        bad = cli_here(capsys, *common, "--task", "dates", *extra)
        assert bad.returncode != 0 and words in bad.stderr, bad.stderr
    no_adapter = cli_here(
        capsys, "eval", "--model", str(model_dir), "--task", "dates", "--objective", "reward"
    )
    assert no_adapter.returncode != 0 and "give --adapter with one" in no_adapter.stderr


@pytest.mark.parametrize(
    "overrides",
    [
        ("--lora.use_dora", "true"),
        ("--lora.init", "pissa"),
        ("--lora.init", "eva"),
        ("--train.method", "dylora"),
        ("--train.method", "adalora"),
        ("--train.method", "lora+loraplus"),
    ],
    ids=lambda o: " ".join(o),
)
def test_methods_and_inits_train_a_reward_model(folders, tmp_path, overrides):
    """Each trains (the loss falls over 12 steps) and saves a SEQ_CLS adapter with the head."""
    model_dir, _ = folders
    summary = _tiny_run(
        model_dir, tmp_path, "--model.dtype", "float32", "--train.save_every", "0", *overrides
    )
    assert summary["after"]["loss"] < summary["before"]["loss"], summary
    from safetensors.torch import load_file

    tensors = load_file(Path(summary["adapter"]) / "adapter_model.safetensors")  # AdaLoRA's too
    assert "base_model.model.score.weight" in tensors


def test_a_reward_adapter_trains_further(folders, trained, tmp_path):
    """train.init_adapter with a reward model's adapter: it starts where that one ended (the same eval)."""
    model_dir, _ = folders
    summary = _tiny_run(
        model_dir,
        tmp_path,
        "--model.dtype",
        "float32",
        "--train.init_adapter",
        str(trained),
        "--train.steps",
        "2",
    )
    model = _loaded(model_dir, trained)
    tok = lorakit.load_model(str(model_dir))[1]
    cfg = load_config(None, ["--objective", "reward", "--data.n_train", "32", "--data.n_eval", "16"])
    from lorakit.train.datasets import encode_preferences
    from lorakit.train.evaluate import preference_eval

    rows = encode_preferences(cfg, tok, lambda _: None).eval_rows
    want = preference_eval(model, rows, tok.pad_token_id, make_objective(cfg))
    assert summary["before"]["loss"] == pytest.approx(want["loss"], abs=1e-5)


def test_an_adalora_reward_adapter_keeps_its_head_in_peft_s_layout(folders, tmp_path):
    """AdaLoRA's file carries the head (modules_to_save) as PEFT's does: PEFT and lorakit load it with the same
    rewards (1e-5, float32), and without the head's key lorakit's load would have nothing to put on `score`."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model_dir, _ = folders
    summary = _tiny_run(model_dir, tmp_path, "--model.dtype", "float32", "--train.method", "adalora")
    adapter = Path(summary["adapter"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["modules_to_save"] == ["score"]
    ours = _loaded(model_dir, adapter).eval()
    tok = lorakit.load_model(str(model_dir))[1]
    batch = tok(_texts(tok), return_tensors="pt", padding=True)
    base = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32, local_files_only=True
    )
    base.config.pad_token_id = tok.pad_token_id
    theirs = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=0)
