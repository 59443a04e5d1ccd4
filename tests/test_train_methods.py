"""The trainer's methods: a table that new methods join with `register_method`, and variants that know nothing of
the trainer (lorakit.train.methods imports lorakit.variants, never the other way)."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest

import lorakit
from lorakit.errors import ConfigError
from lorakit.train import methods
from lorakit.train.config import RunConfig, load_config
from lorakit.train.fields import help_text
from lorakit.train.methods import Method, make_method, register_method
from lorakit.variants.adalora import AdaLoraConfig
from lorakit.variants.dylora import DyLoraConfig
from lorakit.variants.ladder import LadderConfig

VARIANTS = Path(lorakit.__file__).parent / "variants"


def _imported_modules(path: Path) -> list[str]:
    """Every module an import statement of `path` names, wherever it stands (functions, TYPE_CHECKING)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return out


def test_variants_import_nothing_from_the_trainer():
    files = sorted(VARIANTS.glob("*.py"))
    assert len(files) > 5
    bad = {
        f.name: m
        for f in files
        for m in _imported_modules(f)
        if m == "lorakit.train" or m.startswith("lorakit.train.")
    }
    assert bad == {}


@pytest.mark.parametrize(
    "section, source, left_out",
    [
        ("dylora", DyLoraConfig, ()),
        ("adalora", AdaLoraConfig, ("rank_pattern",)),
        ("ladder", LadderConfig, ("mlp_ratio",)),
    ],
)
def test_method_sections_are_made_of_the_variant_configs_fields(section, source, left_out):
    """The run config's section of a method has its variant config's fields (defaults, docs), not copies."""
    obj = getattr(RunConfig(), section)
    assert {f.name: getattr(obj, f.name) for f in fields(obj)} == {
        f.name: f.default for f in fields(source) if f.name not in left_out
    }
    text = help_text()
    for f in fields(obj):
        assert (
            f.metadata["doc"]
            and f"--{section}.{f.name} (default: {getattr(obj, f.name)!r})  {f.metadata['doc']}" in text
        )
    assert "--adalora.init_r (default: 12)  Starting rank of every adapted layer." in text
    assert (
        "--adalora.total_step (default: None)  Total optimizer steps of the schedule (default: train.steps)."
        in text
    )


class CountingMethod(Method):
    """A test method: plain LoRA that counts its steps and refuses grad_accum > 2."""

    name = "counting"
    label = "Counting LoRA"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.steps = 0

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.train.grad_accum > 2:
            raise ConfigError("counting: train.grad_accum must be at most 2")

    def after_step(self, model, step: int) -> None:
        self.steps += 1


@pytest.fixture
def registry(monkeypatch):
    """The method table as it is, restored after the test."""
    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))
    return methods


def test_a_registered_method_is_picked_by_make_method(registry):
    with pytest.raises(ConfigError, match="unknown method 'counting'"):
        load_config(None, ["--method", "counting"])
    assert register_method(CountingMethod) is CountingMethod
    assert list(registry.METHODS) == ["lora", "dylora", "adalora", "ladder", "counting"]
    method = make_method(load_config(None, ["--method", "counting"]))
    assert type(method) is CountingMethod and method.label == "Counting LoRA"
    cfg = load_config(None, ["--method", "counting+loraplus", "--loraplus.ratio", "4"])
    assert type(make_method(cfg)) is CountingMethod and cfg.methods == ("counting", True)
    with pytest.raises(ConfigError, match=r"^counting: train.grad_accum must be at most 2$"):  # check_config
        load_config(None, ["--method", "counting", "--train.grad_accum", "3"])


def test_the_built_in_methods_are_in_the_table():
    assert {name: cls.__name__ for name, cls in methods.METHODS.items()} == {
        "lora": "Method",
        "dylora": "DyLoraMethod",
        "adalora": "AdaLoraMethod",
        "ladder": "LadderMethod",
    }
    assert type(make_method(load_config(None, []))) is Method


def test_register_method_refuses_what_is_not_a_method(registry):
    with pytest.raises(TypeError, match="must be a Method subclass"):
        register_method(object)
    with pytest.raises(ValueError, match="'loraplus'"):
        register_method(type("Plus", (Method,), {"name": "loraplus"}))
    with pytest.raises(ValueError, match="must be an identifier"):
        register_method(type("Odd", (Method,), {"name": "a+b"}))
