"""DPO: the chunked log-probabilities, the loss, the config, the loop and the run, the reference, `lorakit eval` on
pairs, and train.init_adapter (the pairs' shapes: test_dpo_data.py)."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.config import LoraConfig
from lorakit.data.preference import encode_pairs, read_pairs
from lorakit.data.tokenize import IGNORE, Encoded
from lorakit.errors import ConfigError
from lorakit.head import head_sequence_logprobs, sequence_logprobs
from lorakit.train.config import load_config
from lorakit.train.losses import dpo_losses

from runs import answer_nll, eval_pairs_setup, pairs_run
from tiny import tiny_llama

# -- log-probabilities and the loss -----------------------------------------------------------------------------------


def test_chunked_logprobs_equal_full_logits_with_gradients():
    """Summed per row, in chunks of 5 rows, and their gradient for per-row weights: as log_softmax over the whole
    logits (float64, so the tolerance 1e-10 is rounding only)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 40, (3, 7), generator=g)
    labels[0, :4] = IGNORE
    labels[2, 1:] = IGNORE  # a row with no learned token: 0, counted 0
    total, count = head_sequence_logprobs(hidden, weight, labels, chunk=5)
    logp = torch.log_softmax(hidden[:, :-1] @ weight.t(), -1)
    y = labels[:, 1:]
    ref = (logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (y != IGNORE)).sum(-1)
    torch.testing.assert_close(total, ref, atol=1e-10, rtol=0)
    assert count.tolist() == [3, 6, 0]
    w = torch.tensor([0.3, -1.7, 2.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad((total * w).sum(), hidden)
    (want,) = torch.autograd.grad((ref * w).sum(), hidden)
    torch.testing.assert_close(grad, want, atol=1e-10, rtol=0)


def test_sequence_logprobs_fused_equals_the_models_logits():
    """On a tiny Llama with a LoRA: the chunked head's sums equal those of the model's own logits (float32,
    1e-4 absolute over sums of ~10 terms of size ~5)."""
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear", init="random"))
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    fused, n = sequence_logprobs(model, batch)
    plain, m = sequence_logprobs(model, batch, fused=False)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=0)
    assert n.tolist() == m.tolist() == [5, 5]


def test_loss_at_the_start_is_log_two():
    """Policy = reference: every margin is 0, so the sigmoid loss is log 2, IPO's (1/2β)², the hinge's 1."""
    policy = torch.tensor([-3.0, -5.0, -4.0, -6.0])
    count = torch.tensor([2, 3, 2, 4])
    for kind, want in (
        ("sigmoid", torch.log(torch.tensor(2.0))),
        ("ipo", torch.tensor(25.0)),
        ("hinge", 1.0),
    ):
        losses, chosen, rejected = dpo_losses(policy, policy.clone(), count, beta=0.1, kind=kind)
        torch.testing.assert_close(losses, torch.full((2,), float(want)), atol=1e-6, rtol=0)
        assert chosen.tolist() == rejected.tolist() == [0.0, 0.0]


# -- config -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["--objective", "ppo"], "train.objective must be one of sft, dpo, simpo, orpo, cpo, kto, reward, classify, regression, token_classify, embed, got 'ppo'"),
        (["--dpo.beta", "0.5"], "dpo.beta is set but train.objective is 'sft'; use --train.objective dpo"),
        (["--objective", "dpo", "--dpo.beta", "0"], "dpo.beta must be > 0"),
        (["--objective", "dpo", "--dpo.loss", "kto"], "dpo.loss must be one of sigmoid, ipo, hinge"),
        (
            ["--objective", "dpo", "--dpo.loss", "ipo", "--dpo.label_smoothing", "0.1"],
            "works with dpo.loss sigmoid",
        ),
        (["--objective", "dpo", "--dpo.label_smoothing", "0.5"], "dpo.label_smoothing must be in [0, 0.5)"),
        (
            ["--objective", "dpo", "--lora.init", "pissa"],
            "lora.init pissa starts the adapter away from the base",
        ),
        (["--objective", "dpo", "--method", "ladder"], "a ladder is not"),
        (["--objective", "dpo", "--data.pack", "true"], "data.pack does not work with train.objective dpo"),
    ],
)
def test_bad_dpo_settings_are_refused(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert words in str(e.value)


# -- training ---------------------------------------------------------------------------------------------------------


def test_dpo_run_learns_the_preference(tmp_path):
    """12 steps: the eval pairs' loss falls from log 2 and the implicit rewards rank the chosen answer first; the
    step records carry the rewards."""
    summary, _ = pairs_run(tmp_path, "--train.steps", "12", "--train.eval_every", "6")
    before, after = summary["before"], summary["after"]
    assert before["loss"] == pytest.approx(0.6931, abs=1e-4) and before["reward_accuracy"] == 0.0
    assert after["loss"] < 0.6 and after["reward_accuracy"] >= 0.75 and after["reward_margin"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 12 and all("reward_accuracy" in r and "reward_margin" in r for r in steps)
    assert any(r.get("step") == 6 and "eval_reward_accuracy" in r for r in records)


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_preference_run_resumed_equals_uninterrupted(tmp_path, objective):
    """Interrupted at step 4 and resumed from its step-3 checkpoint: the adapter of 6 uninterrupted steps
    (1e-6: the same ops on the same pairs, up to BLAS thread scheduling)."""
    from lorakit.train.loop import TrainingError

    pairs_run(tmp_path / "a", "--train.steps", "6", "--train.save_every", "0", objective=objective)

    def interrupt(rec):
        if rec.get("step") == 4:
            raise KeyboardInterrupt

    b = tmp_path / "b"
    with pytest.raises(TrainingError, match="interrupted at step 4"):
        pairs_run(
            b, "--train.steps", "6", "--train.save_every", "3", objective=objective, callbacks=[interrupt]
        )
    pairs_run(b, "--train.steps", "6", "--train.resume", "auto", objective=objective)
    a = lorakit.read_adapter(tmp_path / "a" / "run" / "adapter")[1]
    r = lorakit.read_adapter(b / "run" / "adapter")[1]
    for k in a:
        torch.testing.assert_close(r[k], a[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("start", [False, True], ids=["base", "init_adapter"])
def test_a_precomputed_reference_trains_as_the_per_step_one(tmp_path, start):
    """dpo.precompute_reference: the reference's log-probabilities computed once before training (from the base,
    or from train.init_adapter's frozen copy) give each step's loss and rewards and the trained adapter of the run
    that computes them each step (1e-5: the same ops on the same rows; only the padding of the batches the
    reference sees differs)."""
    extra = []
    if start:
        pairs_run(tmp_path / "start", "--train.steps", "4")
        extra = ["--train.init_adapter", str(tmp_path / "start" / "run" / "adapter")]
    runs = {}
    for name, more in (("each", []), ("once", ["--dpo.precompute_reference", "true"])):
        pairs_run(tmp_path / name, "--train.steps", "6", *extra, *more)
        lines = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        steps = [r for r in map(json.loads, lines) if "loss" in r]
        runs[name] = steps, lorakit.read_adapter(tmp_path / name / "run" / "adapter")[1]
    (each, a), (once, b) = runs["each"], runs["once"]
    assert len(each) == len(once) == 6
    assert each[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # the reference is where training starts
    for x, y in zip(each, once, strict=True):
        for key in ("loss", "reward_margin", "reward_chosen", "reward_rejected"):
            assert y[key] == pytest.approx(x[key], abs=1e-5), (x["step"], key)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("objective", ["dpo", "simpo", "cpo"])
def test_sft_weight_adds_the_chosen_answers_token_loss(objective):
    """dpo.sft_weight (and simpo's, cpo's) w adds w × the chosen answers' mean token loss (each answer's own
    mean, then the batch's: RPO's length-normalised NLL), computed here from the model's full logits (float32,
    1e-5)."""
    from lorakit.train.config import CpoSection, DpoSection, RunConfig, SimpoSection
    from lorakit.train.objectives import make_objective
    from lorakit.train.schedule import collate

    section = {"dpo": DpoSection, "simpo": SimpoSection, "cpo": CpoSection}[objective]

    def loss(**settings):
        cfg = RunConfig(**{objective: section(**settings)})
        cfg.train.objective = objective
        return make_objective(cfg).loss(model, batch, fused=True)[0]

    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear", init="random"))
    g = torch.Generator().manual_seed(2)
    rows = []
    for n in (5, 8):
        ids = torch.randint(2, 128, (n,), generator=g).tolist()
        rows.append(Encoded(ids, [IGNORE] * 3 + ids[3:]))
    batch = collate(rows + rows[::-1], 0)  # two pairs: chosen rows first
    plain, weighted = loss(sft_weight=0.0), loss(sft_weight=0.7)  # CPO's default is 1
    per_answer = answer_nll(model, {k: v[:2] for k, v in batch.items()})  # the chosen rows
    assert float(weighted - plain) == pytest.approx(0.7 * float(per_answer.mean()), abs=1e-5)


@pytest.mark.real_model
def test_dpo_on_the_default_model(tmp_path):
    """SmolLM2-135M-Instruct on the built-in task's pairs, 6 steps of 4 pairs with RPO's term: the held-out pairs'
    preference loss falls from log 2, their implicit rewards rank the ISO answer first, and the run's files are
    those of any run (the adapter loads back)."""
    from lorakit.train.run import run_training

    cfg = load_config(
        None,
        [
            *("--objective", "dpo", "--dpo.sft_weight", "1", "--train.steps", "6", "--train.batch_size", "4"),
            *(
                "--data.n_train",
                "64",
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
    assert before["loss"] == pytest.approx(0.6931, abs=1e-3) and before["reward_accuracy"] == 0.0
    assert after["loss"] < 0.3 and after["reward_accuracy"] >= 0.75 and after["reward_margin"] > 0.5
    config = lorakit.read_adapter(tmp_path / "adapter")[0]
    assert config.r == 16


@pytest.mark.parametrize(
    "settings, starts_at_base",
    [
        ({}, True),
        ({"use_dora": True}, True),
        ({"init": "gaussian"}, True),
        ({"init": "orthogonal"}, True),
        ({"init": "mica"}, True),
        ({"nf4": True}, True),  # QLoRA: a 4-bit base, adapters off is the quantized base
        ({"init": "pissa"}, False),
        ({"init": "olora"}, False),
        ({"init": "random"}, False),
        ({"use_kasa": True}, False),
    ],
    ids=lambda v: str(v) if not isinstance(v, bool) else "",
)
def test_the_reference_is_where_training_starts(settings, starts_at_base):
    """DPO's reference is the model with its adapters off. For the inits DPO accepts, the first loss is log 2 and
    every reward 0 (the policy is the reference, to float32 rounding: 1e-5); for those the config refuses (and
    KaSA), it is not, which is why they are refused."""
    from lorakit.quant import quantize
    from lorakit.train.config import DpoSection, RunConfig
    from lorakit.train.objectives import DpoObjective
    from lorakit.train.schedule import collate

    settings = dict(settings)
    model = tiny_llama()
    if settings.pop("nf4", False):
        quantize(model, "nf4", True, ["lm_head"])
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear", **settings))
    g = torch.Generator().manual_seed(3)
    rows = [
        Encoded(ids, [IGNORE] * 3 + ids[3:]) for ids in torch.randint(2, 128, (4, 9), generator=g).tolist()
    ]
    loss, stats = DpoObjective(RunConfig(dpo=DpoSection())).loss(model, collate(rows, 0), fused=True)
    at_base = abs(float(loss) - 0.693147) < 1e-5 and abs(stats["reward_margin"]) < 1e-5
    assert at_base == starts_at_base


def test_the_reference_pass_has_no_dropout():
    """GPT-2 has dropout of its own (0.1) and the adapter has 0.5: in train mode the policy's log-probabilities
    vary from call to call, the reference's do not. They are the base's in eval mode (float32, 1e-6), and every
    module is back in train mode after the block."""
    from lorakit.head import sequence_logprobs
    from lorakit.train.config import RunConfig
    from lorakit.train.objectives import DpoObjective
    from lorakit.train.schedule import collate

    from tiny import tiny_gpt2

    model = tiny_gpt2()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear", dropout=0.5))
    g = torch.Generator().manual_seed(4)
    rows = [
        Encoded(ids, [IGNORE] * 3 + ids[3:]) for ids in torch.randint(2, 128, (4, 9), generator=g).tolist()
    ]
    batch = collate(rows, 0)
    with lorakit.disabled(model):
        want, _ = sequence_logprobs(model, batch, fused=False)  # eval mode: tiny_gpt2 returns the model in it
    model.train()
    objective = DpoObjective(RunConfig())
    with torch.no_grad():
        policy = [sequence_logprobs(model, batch, fused=False)[0] for _ in range(2)]
        assert not torch.allclose(policy[0], policy[1])
        for _ in range(2):
            with objective.reference(model):
                ref, _ = sequence_logprobs(model, batch, fused=False)
            torch.testing.assert_close(ref, want, atol=1e-6, rtol=0)
    assert all(m.training for m in model.modules())


def test_lorakit_eval_measures_an_adapter_on_pairs(tmp_path, capsys):
    """`lorakit eval --data pairs.jsonl --adapter A`: the chosen answers' loss and exact match for base and adapter,
    and the adapter's implicit rewards against the base, as `preference_eval` computes them at --beta."""
    from lorakit.cli import main
    from lorakit.train.config import DpoSection, RunConfig
    from lorakit.train.evaluate import preference_eval
    from lorakit.train.objectives import DpoObjective

    model, tok, data, args = eval_pairs_setup(tmp_path)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear", init="random"))
    lorakit.save_adapter(model, tmp_path / "adapter")
    assert (
        main([*args, "--adapter", str(tmp_path / "adapter"), "--compare-base", "--beta", "0.5", "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["pairs"] == 5 and report["examples"] == 5
    assert "preference_loss" not in report["base"]  # the base is the reference: nothing to compare
    rows, _ = encode_pairs(tok, read_pairs(data), max_len=256, chat=False)
    want = preference_eval(model, rows, tok.pad_token_id, DpoObjective(RunConfig(dpo=DpoSection(beta=0.5))))
    for k, v in want.items():
        assert report["adapter"][f"preference_{k}"] == pytest.approx(v, abs=1e-5)
    assert main([*args, "--beta", "0"]) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1] == "lorakit eval: error: --beta must be > 0, got 0.0"
    )


# -- train.init_adapter: training an adapter further ------------------------------------------------------------------


def test_init_adapter_starts_where_the_adapter_ended(tmp_path):
    """SFT, then SFT again from its adapter: the second run's evaluation before training is the first run's after
    (the same weights, read back from the file: 1e-6), and it trains that adapter further (same keys and shapes,
    new values)."""
    from runs import addition_run

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first, _ = addition_run(tmp_path / "a", "--train.steps", "6", "--train.lr", "2e-2")
    adapter = tmp_path / "a" / "run" / "adapter"
    second, _ = addition_run(
        tmp_path / "b", "--train.steps", "6", "--train.lr", "2e-2", "--train.init_adapter", str(adapter)
    )
    assert second["before"]["loss"] == pytest.approx(first["after"]["loss"], abs=1e-6)
    (start_cfg, start), (cfg, after) = (
        lorakit.read_adapter(adapter),
        lorakit.read_adapter(tmp_path / "b/run/adapter"),
    )
    assert cfg.r == start_cfg.r and after.keys() == start.keys()
    assert all(not torch.equal(after[k], start[k]) for k in start if "lora_B" in k)  # trained further


def test_dpo_from_an_adapter_takes_it_as_the_reference(tmp_path):
    """A random adapter (far from the base) as train.init_adapter: DPO's first evaluation is log 2 with no margin
    (the reference is the start, not the base), the run learns the preference, and only the trained adapter is
    saved."""
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear", init="random"))
    start = lorakit.save_adapter(model, tmp_path / "start")
    summary, trained = pairs_run(tmp_path / "run", "--train.steps", "12", "--train.init_adapter", str(start))
    assert (
        summary["before"]["loss"] == pytest.approx(0.693147, abs=1e-6)
        and summary["before"]["reward_margin"] == 0
    )
    assert summary["after"]["reward_accuracy"] >= 0.75
    assert set(lorakit.adapter_names(trained)) == {"default", "reference"}
    saved = lorakit.read_adapter(tmp_path / "run" / "run" / "adapter")[1]
    assert saved.keys() == lorakit.read_adapter(start)[1].keys()


@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            ["--lora.r", "8"],
            "lora.r is set but train.init_adapter starts from an adapter with its own settings",
        ),
        (["--method", "dylora"], "train.init_adapter trains an adapter further with method lora"),
        (["--data.add_tokens", "[<x>]"], "data.add_tokens does not work with train.init_adapter"),
    ],
)
def test_init_adapter_refuses_settings_it_would_ignore(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--train.init_adapter", "some/adapter", *overrides])
    assert words in str(e.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["--method", "lora+loraplus"],
        ["--method", "dylora"],
        ["--method", "adalora"],
        ["--lora.use_dora", "true"],
        ["--model.quantize", "nf4"],
        ["--train.grad_checkpointing", "true", "--train.grad_accum", "2"],
    ],
    ids=["loraplus", "dylora", "adalora", "dora", "qlora", "checkpointing-accum"],
)
def test_dpo_trains_with_each_method(tmp_path, overrides):
    """8 steps of DPO with each method or setting: the eval pairs' loss falls below log 2 and the rewards rank
    the chosen answer first more often than not."""
    summary, _ = pairs_run(tmp_path, "--train.steps", "8", *overrides)
    assert summary["after"]["loss"] < 0.69 and summary["after"]["reward_accuracy"] > 0.5, summary["after"]
