"""train.keep_best and train.early_stop: the run ends with its best evaluated state, or stops when evaluations
stop improving (tiny Llama, the addition task, a constant learning rate of 0.05 whose eval loss is lowest at step
4 of 16 and then rises).

The oracle is a plain run of as many steps as the best state had: the same seed and constant learning rate take
the same steps, so its adapter is the best state's, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.train.config import load_config

from runs import addition_run

RUN = ("--train.eval_every", "2", "--train.lr", "0.05", "--train.schedule", "constant")


def _evals(run_dir) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["eval_loss"]) for r in map(json.loads, lines) if "eval_loss" in r]


def _adapter(run_dir) -> dict[str, torch.Tensor]:
    return lorakit.read_adapter(run_dir / "adapter")[1]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The run without either setting, 16 steps (its evaluations), and the 4-step run (the best state's adapter)."""
    root = tmp_path_factory.mktemp("best")
    (root / "full").mkdir()
    (root / "four").mkdir()
    addition_run(root / "full", "--train.steps", "16", *RUN)
    addition_run(root / "four", "--train.steps", "4", *RUN)
    evals = _evals(root / "full" / "run")
    assert min(evals[1:], key=lambda e: e[1])[0] == 4, evals  # the scenario: lowest at step 4, higher after
    return {"evals": evals, "four": _adapter(root / "four" / "run")}


def test_keep_best_ends_with_the_lowest_evaluated_state(tmp_path, plain):
    """The adapter saved is the step-4 state's (bitwise: the 4-step run's), the "after" evaluation is its eval
    loss (1e-6: the same state evaluated again), and the curve keeps the last state's evaluation at step 16."""
    summary, _ = addition_run(tmp_path, "--train.steps", "16", *RUN, "--train.keep_best", "true")
    best = dict(plain["evals"][1:])[4]
    assert summary["best"]["step"] == 4 and summary["best"]["restored"] is True
    assert summary["best"]["metric"] == "loss" and summary["best"]["value"] == pytest.approx(best, abs=1e-9)
    assert summary["after"]["loss"] == pytest.approx(best, abs=1e-6)
    assert _same(_adapter(tmp_path / "run"), plain["four"])
    assert _evals(tmp_path / "run") == plain["evals"]  # the training itself is the plain run's


def test_the_last_state_is_kept_when_it_is_the_best(tmp_path):
    """A run whose eval loss falls to the end (lr 0.01, cosine) keeps its last state: nothing is restored, and
    the best is the last step's evaluation."""
    summary, _ = addition_run(
        tmp_path, "--train.steps", "8", "--train.eval_every", "2", "--train.keep_best", "true"
    )
    evals = _evals(tmp_path / "run")
    assert evals[-1][0] == 8 and evals[-1][1] < min(loss for step, loss in evals[1:-1])
    assert summary["best"] == {
        "metric": "loss",
        "value": evals[-1][1],
        "step": 8,
        "since": 0,
        "kept": True,
        "restored": False,
    }
    assert summary["after"]["loss"] == evals[-1][1]


@pytest.mark.parametrize("keep", [False, True], ids=["stop", "stop-and-keep"])
def test_early_stop_after_evaluations_without_improvement(tmp_path, plain, keep):
    """early_stop 2: steps 6 and 8 do not lower step 4's eval loss, so the run stops after step 8 with the
    plain run's evaluations up to there; with keep_best too, it ends with the step-4 state."""
    extra = ("--train.keep_best", "true") if keep else ()
    summary, _ = addition_run(tmp_path, "--train.steps", "16", *RUN, "--train.early_stop", "2", *extra)
    assert summary["steps"] == 8 and summary["stopped_early"] is True
    assert _evals(tmp_path / "run") == plain["evals"][:5]  # steps 0, 2, 4, 6 and 8
    assert summary["best"]["step"] == 4 and summary["best"]["since"] == 2
    assert _same(_adapter(tmp_path / "run"), plain["four"]) is keep
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped_early"] is True


def test_a_resumed_run_keeps_the_best_of_the_steps_before_it(tmp_path, plain):
    """Interrupted in step 11 (Ctrl-C: the checkpoint of step 11 is written) and resumed: the checkpoint
    carried the step-4 state (best.safetensors), so the run ends with it, as the uninterrupted run does; and
    early_stop's count of evaluations without improvement goes on from the checkpoint's (3: steps 6, 8 and 10;
    with early_stop 4 the run stops after step 12's)."""
    from lorakit.train.loop import TrainingError

    def interrupt(rec):
        if rec.get("step") == 11 and "loss" in rec:
            raise KeyboardInterrupt

    args = ("--train.steps", "16", *RUN, "--train.keep_best", "true", "--train.save_every", "5")
    with pytest.raises(TrainingError, match="interrupted at step 11"):
        addition_run(tmp_path, *args, callbacks=[interrupt])
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000011"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["best"]["step"] == 4 and state["best"]["since"] == 3 and state["best"]["kept"] is True
    assert (checkpoint / "best.safetensors").is_file()
    summary, _ = addition_run(tmp_path, *args, "--train.resume", "auto", "--train.early_stop", "4")
    assert summary["resumed_from"] == 11 and summary["steps"] == 12 and summary["stopped_early"] is True
    assert summary["best"]["step"] == 4 and summary["best"]["restored"] is True
    assert _same(_adapter(tmp_path / "run"), plain["four"])


@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            ["--train.keep_best", "true"],
            "train.keep_best compares the periodic evaluations: set train.eval_every",
        ),
        (
            ["--train.early_stop", "3"],
            "train.early_stop compares the periodic evaluations: set train.eval_every",
        ),
        (["--train.early_stop", "-1"], "train.early_stop must be >= 0, got -1"),
        (
            ["--train.best_metric", "bleu"],
            "train.best_metric must be one of loss, accuracy, balanced_accuracy, f1, pearson, reward_accuracy, reward_margin, got 'bleu'",
        ),
        (
            ["--train.best_metric", "reward_margin"],
            "train.best_metric reward_margin is measured with a preference objective, not 'sft'",
        ),
        (
            ["--train.eval_every", "5", "--train.keep_best", "true", "--train.fsdp", "true"],
            "train.keep_best does not work with train.fsdp yet",
        ),
    ],
)
def test_settings_that_cannot_work_are_refused(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert words in str(e.value)


@pytest.mark.parametrize("method", ["dylora", "adalora", "ladder", "lora+loraplus"])
def test_keep_best_with_each_method(tmp_path, plain, method):
    """The other methods keep their best state too: the run restores the step-4 state (its "after" eval loss is
    the step-4 evaluation's, 1e-6) and saves it in the method's own layout."""
    extra = ("--adalora.tinit", "1", "--adalora.tfinal", "2") if method == "adalora" else ()
    summary, _ = addition_run(
        tmp_path, "--train.steps", "12", *RUN, "--train.keep_best", "true", "--method", method, *extra
    )
    evals = dict(_evals(tmp_path / "run"))
    step = min((s for s in evals if s > 0), key=evals.get)
    assert summary["best"]["step"] == step and summary["best"]["restored"] is (step != 12)
    assert summary["after"]["loss"] == pytest.approx(evals[step], abs=1e-6)
    assert (tmp_path / "run" / "adapter").is_dir()


def test_evaluations_leave_a_bf16_base_as_it_was(tmp_path):
    """A merge and unmerge would round a bfloat16 base (by up to 1e-3 here), and training goes on from the
    evaluated model: the evaluations decode unmerged on a 16-bit base, so the frozen weights stay bitwise those
    training started from, and keep_best's "after" evaluation repeats the best step's exactly."""
    from tiny import tiny_llama

    summary, model = addition_run(
        tmp_path, "--train.steps", "12", *RUN, "--train.keep_best", "true", dtype=torch.bfloat16
    )
    start = tiny_llama().to(torch.bfloat16).state_dict()
    frozen = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(torch.equal(p, start[n]) for n, p in frozen.items())
    if summary["best"]["restored"]:
        assert summary["after"]["loss"] == summary["best"]["value"]


@pytest.mark.parametrize(
    "metric, values, best_step, stop_step",
    [
        ("loss", [3.0, 2.0, 2.0, 2.5, 1.0], 2, 4),  # a tie is no improvement
        ("accuracy", [0.2, 0.5, 0.4, 0.5, 0.9], 2, 4),
        ("reward_margin", [-1.0, 0.5, float("nan"), 0.7, 0.6], 4, None),  # NaN: no better
    ],
)
def test_the_metric_and_its_direction(metric, values, best_step, stop_step):
    """`Best` on a sequence of evaluations of a tiny model: lower loss or higher accuracy and rewards is better;
    ties, NaN and a missing value are not; with early_stop 2 it stops at the second evaluation in a row without a
    better value, and keep_best's snapshot is the state of the best step (its tensors as they were then)."""
    from lorakit.train.best import Best
    from lorakit.train.config import TrainSection

    from tiny import tiny_llama

    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    best = Best(TrainSection(eval_every=1, keep_best=True, early_stop=2, best_metric=metric))
    stopped = None
    for step, value in enumerate(values, 1):
        with torch.no_grad():
            for p in lorakit.adapter_parameters(model):
                p.fill_(step)  # the state of each step tells itself apart
        if best.observe(step, {metric: value}, model, None):
            stopped = step
            break  # the run stops here
    assert best.step == best_step and stopped == stop_step
    assert all(bool((t == best_step).all()) for t in best.tensors.values())
    assert not best.better_than({metric: values[best_step - 1]})  # as good as the kept state: keep the last
    assert best.better_than({}) and best.better_than({metric: float("nan")})


def test_a_preference_run_keeps_its_best_reward_margin(tmp_path):
    """DPO with best_metric reward_margin: the state kept is the evaluation of the highest margin on the eval
    pairs, periodic or last, and the "after" evaluation repeats it (1e-6)."""
    from runs import pairs_run

    args = ("--train.steps", "8", "--train.eval_every", "2", "--train.keep_best", "true")
    summary, _ = pairs_run(tmp_path, *args, "--train.best_metric", "reward_margin")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    margins = {
        r["step"]: r["eval_reward_margin"] for r in map(json.loads, lines) if "eval_reward_margin" in r
    }
    step = max((s for s in margins if s > 0), key=margins.get)
    assert summary["best"]["metric"] == "reward_margin" and summary["best"]["step"] == step
    assert summary["after"]["reward_margin"] == pytest.approx(margins[step], abs=1e-6)
