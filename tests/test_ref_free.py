"""SimPO, ORPO and CPO, the preference objectives without a reference model: their losses, the config, runs
that learn, and the settings they train with that DPO refuses (against TRL: test_dpo_trl.py)."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.train.config import load_config
from lorakit.train.losses import cpo_losses, orpo_losses, simpo_losses

from runs import pairs_run


def _sums(seed: int = 0):
    """Summed log-probabilities and token counts of 3 chosen and 3 rejected rows; one chosen answer is almost
    certain (mean log-probability -1e-6), where log(1 - p) cancels when computed naively in float32."""
    g = torch.Generator().manual_seed(seed)
    count = torch.randint(1, 9, (6,), generator=g)
    mean = -torch.rand(6, generator=g, dtype=torch.float64) * 3
    mean[0] = -1e-6
    return mean * count, count


def test_simpo_loss_is_the_papers():
    """-log σ(β ℓc - β ℓr - γ) with ℓ the mean token log-probability, and rewards β ℓ; computed in float64 here,
    float32 there (1e-6 absolute)."""
    policy, count = _sums()
    losses, chosen, rejected = simpo_losses(policy.float(), count, beta=2.5, gamma=0.7)
    mean = policy / count
    want = -torch.nn.functional.logsigmoid(2.5 * (mean[:3] - mean[3:]) - 0.7)
    torch.testing.assert_close(losses.double(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen.double(), 2.5 * mean[:3], atol=1e-6, rtol=0)
    torch.testing.assert_close(rejected.double(), 2.5 * mean[3:], atol=1e-6, rtol=0)


def test_orpo_loss_is_the_papers_and_stable_near_certainty():
    """-ℓc - λ log σ(log odds c - log odds r), odds = p / (1 - p), p = e^ℓ: as float64 computes it naively (1e-5:
    float32 rounding of log odds up to 14 at p = 1 - 1e-6). Its gradient is finite there too, and where a chosen
    answer is certain to float32 (mean log-probability 0: infinite odds without the cap at p = 1 - 1e-6)."""
    policy, count = _sums()
    x = policy.float().requires_grad_()
    losses, chosen, _ = orpo_losses(x, count, weight=0.2)
    mean = policy / count
    p = mean.exp()
    odds = (p / (1 - p)).log()
    want = -mean[:3] - 0.2 * torch.nn.functional.logsigmoid(odds[:3] - odds[3:])
    torch.testing.assert_close(losses.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(chosen.double(), 0.2 * mean[:3], atol=1e-6, rtol=0)
    losses.sum().backward()
    assert torch.isfinite(x.grad).all()
    certain = torch.zeros(2, requires_grad=True)  # a chosen answer certain to float32, and a rejected one not
    loss = orpo_losses(certain + torch.tensor([0.0, -2.0]), torch.tensor([3, 3]), weight=0.2)[0]
    loss.backward()
    assert torch.isfinite(loss).all() and torch.isfinite(certain.grad).all()


@pytest.mark.parametrize(
    "kind, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)]
)
def test_cpo_loss_is_the_papers(kind, smoothing):
    """With x = Lc - Lr the summed log-probabilities' difference (IPO: ℓc - ℓr, the means'):
    -(1 - ε) log σ(βx) - ε log σ(-βx), max(0, 1 - βx) or (x - 1/(2β))², and rewards β L (IPO: β ℓ); float64
    here, float32 there (1e-5: sums of up to 8 tokens' log-probabilities near -24 in float32)."""
    policy, count = _sums(1)
    beta = 0.3
    losses, chosen, rejected = cpo_losses(
        policy.float(), count, beta=beta, kind=kind, label_smoothing=smoothing
    )
    logsigmoid = torch.nn.functional.logsigmoid
    scores = policy / count if kind == "ipo" else policy
    x = scores[:3] - scores[3:]
    want = {
        "sigmoid": -(1 - smoothing) * logsigmoid(beta * x) - smoothing * logsigmoid(-beta * x),
        "hinge": torch.relu(1 - beta * x),
        "ipo": (x - 1 / (2 * beta)) ** 2,
    }[kind]
    torch.testing.assert_close(losses.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(chosen.double(), beta * scores[:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected.double(), beta * scores[3:], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            ["--simpo.beta", "3"],
            "simpo.beta is set but train.objective is 'sft'; use --train.objective simpo",
        ),
        (["--objective", "dpo", "--orpo.beta", "0.2"], "orpo.beta is set but train.objective is 'dpo'"),
        (["--objective", "orpo", "--dpo.beta", "0.2"], "dpo.beta is set but train.objective is 'orpo'"),
        (["--objective", "simpo", "--simpo.beta", "0"], "simpo.beta must be > 0, got 0.0"),
        (["--objective", "simpo", "--simpo.gamma", "-1"], "simpo.gamma must be >= 0, got -1.0"),
        (["--objective", "simpo", "--simpo.sft_weight", "-1"], "simpo.sft_weight must be >= 0"),
        (["--objective", "orpo", "--orpo.beta", "-0.1"], "orpo.beta must be > 0, got -0.1"),
        (["--objective", "orpo", "--data.pack", "true"], "data.pack does not work with train.objective orpo"),
        (["--objective", "simpo", "--data.train_on_all", "true"], "data.train_on_all does not work"),
        (
            ["--objective", "simpo", "--cpo.sft_weight", "0"],
            "cpo.sft_weight is set but train.objective is 'simpo'",
        ),
        (["--objective", "cpo", "--cpo.beta", "0"], "cpo.beta must be > 0, got 0.0"),
        (
            ["--objective", "cpo", "--cpo.loss", "robust"],
            "cpo.loss must be one of sigmoid, ipo, hinge, got 'robust'",
        ),
        (
            ["--objective", "cpo", "--cpo.label_smoothing", "0.5"],
            "cpo.label_smoothing must be in [0, 0.5), got 0.5",
        ),
        (
            ["--objective", "cpo", "--cpo.loss", "ipo", "--cpo.label_smoothing", "0.1"],
            "cpo.label_smoothing works with cpo.loss sigmoid, not 'ipo'",
        ),
        (["--objective", "cpo", "--cpo.sft_weight", "-1"], "cpo.sft_weight must be >= 0, got -1.0"),
        (["--objective", "cpo", "--data.pack", "true"], "data.pack does not work with train.objective cpo"),
        (
            ["--objective", "simpo", "--train.fsdp", "true"],
            "train.fsdp does not work with train.objective simpo",
        ),
    ],
)
def test_bad_simpo_orpo_and_cpo_settings_are_refused(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert words in str(e.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["--lora.init", "pissa"],
        ["--lora.init", "olora"],
        ["--lora.use_kasa", "true"],
        ["--method", "ladder"],
    ],
    ids=["pissa", "olora", "kasa", "ladder"],
)
def test_what_dpo_refuses_for_its_reference_the_reference_free_objectives_accept(overrides):
    """DPO refuses these (its reference, the model with the adapters off, would not be where training starts);
    SimPO, ORPO and CPO have no reference."""
    with pytest.raises(ConfigError):
        load_config(None, ["--objective", "dpo", *overrides])
    for objective in ("simpo", "orpo", "cpo"):
        assert load_config(None, ["--objective", objective, *overrides]).train.objective == objective


@pytest.mark.parametrize(
    "objective, settings",
    [
        ("simpo", ("--simpo.beta", "2", "--simpo.gamma", "0.5")),
        ("orpo", ("--orpo.beta", "0.5")),
        ("cpo", ("--cpo.beta", "0.1")),  # the paper's, with its token loss (cpo.sft_weight 1)
    ],
)
def test_a_run_learns_the_preference(tmp_path, objective, settings):
    """12 steps on the tiny addition pairs: the held-out pairs' loss falls, the rewards rank the chosen answer
    first on most of them, and every step's record carries the rewards."""
    summary, _ = pairs_run(tmp_path, "--train.steps", "12", *settings, objective=objective)
    before, after = summary["before"], summary["after"]
    assert after["loss"] < before["loss"]
    assert after["reward_accuracy"] >= 0.75 and after["reward_margin"] > before["reward_margin"]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"objective: {objective}" in config and f"{objective}:" in config


@pytest.mark.parametrize(
    "objective, overrides",
    [
        ("simpo", ("--lora.init", "pissa")),
        ("orpo", ("--lora.use_kasa", "true", "--lora.r", "4")),
        ("orpo", ("--method", "ladder")),
        ("simpo", ("--method", "dylora")),
        ("orpo", ("--method", "adalora+loraplus")),
        ("cpo", ("--lora.init", "olora", "--cpo.loss", "ipo", "--cpo.beta", "0.5")),
    ],
    ids=["simpo-pissa", "orpo-kasa", "orpo-ladder", "simpo-dylora", "orpo-adalora-loraplus", "cpo-ipo-olora"],
)
def test_the_reference_free_objectives_train_with_each_method(tmp_path, objective, overrides):
    """8 steps: the held-out pairs' preference loss falls, and the adapter saved loads back."""
    summary, _ = pairs_run(tmp_path, "--train.steps", "8", *overrides, objective=objective)
    assert summary["after"]["loss"] < summary["before"]["loss"]
    assert (tmp_path / "run" / "adapter").is_dir()


def test_lorakit_eval_measures_simpo_orpo_and_cpo_on_the_base_and_the_adapter(tmp_path, capsys):
    """`lorakit eval --data pairs --objective orpo|simpo|cpo --compare-base`: with no reference, the base has
    rewards too; both sides' loss, reward accuracy and margin are `preference_eval`'s with that objective
    (1e-5), at the objective's own beta unless --beta is given. --objective without a file of pairs is
    refused."""
    import json

    import lorakit
    from lorakit.cli import main
    from lorakit.config import LoraConfig
    from lorakit.data.preference import encode_pairs, read_pairs
    from lorakit.train.config import RunConfig, TrainSection
    from lorakit.train.evaluate import preference_eval
    from lorakit.train.objectives import make_objective

    from runs import eval_pairs_setup
    from tiny import tiny_llama

    model, tok, data, args = eval_pairs_setup(tmp_path)
    rows, _ = encode_pairs(tok, read_pairs(data), max_len=256, chat=False)
    want = {}
    for objective, beta in (("orpo", None), ("simpo", 3.0), ("cpo", None)):
        cfg = RunConfig(train=TrainSection(objective=objective))
        getattr(cfg, objective).beta = beta or getattr(cfg, objective).beta
        want["base"] = preference_eval(model, rows, tok.pad_token_id, make_objective(cfg))
        with_adapter = tiny_llama()
        lorakit.inject(with_adapter, LoraConfig(r=4, alpha=8, targets="all-linear", init="random"))
        lorakit.save_adapter(with_adapter, tmp_path / "adapter")
        want["adapter"] = preference_eval(with_adapter, rows, tok.pad_token_id, make_objective(cfg))
        extra = ["--beta", str(beta)] if beta else []
        cmd = [*args, "--adapter", str(tmp_path / "adapter"), "--compare-base", "--objective", objective]
        assert main([*cmd, *extra, "--json"]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["objective"] == objective and report["beta"] == getattr(cfg, objective).beta
        for side in ("base", "adapter"):
            for k, v in want[side].items():
                assert report[side][f"preference_{k}"] == pytest.approx(v, abs=1e-5), (objective, side, k)
        assert want["base"]["reward_margin"] != pytest.approx(want["adapter"]["reward_margin"], abs=1e-3)
    assert main(["eval", "--model", str(tmp_path / "model"), "--task", "dates", "--objective", "orpo"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith("--objective and --beta measure preference pairs: give a --data file of pairs")
    )
