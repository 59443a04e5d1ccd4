"""The package's layering, read from the source with `ast`: one direction of dependency, no import loop.

Every `import` counts for the direction of dependency, at the top of a module, inside a function or under
`TYPE_CHECKING`; the loop check counts the imports that run (not type-only ones). The day someone adds an import
that runs upward, or closes a loop, this fails and names it. The core is listed bottom up; each of its
modules may import the foundation and the core modules below it, nothing else. Plug-ins (quant/, variants/,
mixed) and everything above (bank, train/, serve/, the CLI) build on the core and register with it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "lorakit"

# no lorakit imports of their own beyond each other (and data.tokenize for the IGNORE label)
FOUNDATION = ["errors", "envflags", "checks", "atomic", "readers", "dropout", "device", "walk", "data.tokenize", "data.jsonl", "data.files", "data.shapes", "data.toolcalls", "data.preference", "data"]
CORE = [  # bottom up: each may import only what stands before it (and the foundation)
    "peft_keys",
    "config_checks",
    "config",
    "handlers",
    "attention",
    "fused",
    "head",
    "lean",
    "blocks",
    "layers",
    "task_types",
    "token_rows",
    "saved",
    "params",
    "targeting",
    "registry",
    "siblings",
    "tying",
    "control",
    "replicate",
    "inject",
    "formats",
    "classifier_heads",
    "embeddings",
    "plain_lora",
    "saved_plan",
    "lora_format",
    "io",
]
PLUGINS_AND_ABOVE = ("quant", "variants", "mixed", "memory", "bank", "train", "serve", "ui")


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """'lorakit.x.y' -> 'x.y' (the package itself: ''), or None for another package."""
    if name == "lorakit":
        return ""
    return name.removeprefix("lorakit.") if name.startswith("lorakit.") else None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks (annotations only: never run)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return inside


def imports_of(module: str, *, runtime: bool = False) -> set[str]:
    """The lorakit modules `module` imports, anywhere in its file (a `from pkg import sub` counts as `pkg.sub`).
    With `runtime`, imports under `if TYPE_CHECKING:` (type annotations, never executed) are left out."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree) if runtime else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {t for a in node.names if (t := _target(a.name)) is not None}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1]
                absolute = "lorakit." + ".".join([*base, *([node.module] if node.module else [])]).strip(".")
            else:
                absolute = node.module or ""
            t = _target(absolute)
            if t is None:
                continue
            subs = [f"{t}.{a.name}".lstrip(".") for a in node.names if f"{t}.{a.name}".lstrip(".") in MODULES]
            found |= set(subs) if subs and len(subs) == len(node.names) else {t}
    found.discard(module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}
RUNTIME = {m: imports_of(m, runtime=True) for m in MODULES}


def test_the_core_imports_only_downward():
    allowed = set(FOUNDATION)
    for module in CORE:
        bad = sorted(GRAPH[module] - allowed)
        assert not bad, (
            f"core module lorakit.{module} imports {bad}: the core imports only the modules below it"
        )
        allowed.add(module)


def test_the_core_never_imports_plugins_or_what_stands_above():
    for module in CORE + FOUNDATION:
        up = sorted(t for t in GRAPH[module] if t.split(".")[0] in PLUGINS_AND_ABOVE)
        assert not up, f"lorakit.{module} imports {up}"


def test_the_foundation_imports_only_the_foundation():
    for module in FOUNDATION:
        bad = sorted(GRAPH[module] - set(FOUNDATION))
        assert not bad, f"lorakit.{module} imports {bad}"


def test_variants_do_not_import_the_trainer():
    for module in MODULES:
        if module.startswith("variants") or module.startswith("quant") or module == "mixed":
            bad = sorted(
                t for t in GRAPH[module] if t.split(".")[0] in ("train", "serve", "bank", "cli", "bench")
            )
            assert not bad, f"plug-in lorakit.{module} imports {bad}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t not in graph:
                continue
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_loop():
    """Among the imports that run (a method's type hint naming the RunConfig that lists the methods is no loop)."""
    loop = _cycle(RUNTIME)
    assert loop is None, "import loop: " + " -> ".join(f"lorakit.{m}" for m in loop)


@pytest.mark.parametrize(
    "graph, loop",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": set(), "c": {"a", "b"}}, None),
    ],
)
def test_the_loop_finder_finds_loops(graph, loop):
    assert _cycle(graph) == loop


def test_the_import_reader_sees_imports_inside_functions(tmp_path, monkeypatch):
    src = tmp_path / "lorakit"
    src.mkdir()
    (src / "__init__.py").write_text("")
    (src / "low.py").write_text("def f():\n    from lorakit.high import g\n    import lorakit.other\n")
    (src / "high.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import low\n"
    )
    (src / "other.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", src)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", _modules())
    assert imports_of("low") == {"high", "other"} and imports_of("high") == {"low"}
    assert imports_of("high", runtime=True) == set()
