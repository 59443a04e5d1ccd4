"""The benchmarks, examples and scripts run outside the suite (minutes each, some against PEFT), so a name they import
from lorakit that a refactor moved would only fail when someone next runs them: `bench_full.py` still imported
`lorakit.train.run._encode` after it had become `lorakit.train.datasets.encode_examples`. This reads
every `from lorakit... import name` in them with `ast` and checks that the module has the name."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("benchmarks", "examples", "scripts")


def _imports() -> list[tuple[str, int, str, str]]:
    """(file, line, module, name) of every absolute `from lorakit... import name` in FOLDERS."""
    out = []
    for folder in FOLDERS:
        for f in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.level == 0
                    and (node.module or "").startswith("lorakit")
                ):
                    for alias in node.names:
                        out.append((str(f.relative_to(ROOT)), node.lineno, node.module, alias.name))
    return out


IMPORTS = _imports()


def test_the_scripts_import_something_from_lorakit():
    """The walk finds what it checks (a broken walk would pass the test below with nothing to check)."""
    assert len(IMPORTS) > 50 and len({f for f, _, _, _ in IMPORTS}) > 20


@pytest.mark.parametrize("module", sorted({m for _, _, m, _ in IMPORTS}))
def test_every_name_the_scripts_import_from_lorakit_exists(module):
    mod = importlib.import_module(module)
    missing = [
        f"{f}:{line} imports {name} from {module}, which has no such name"
        for f, line, m, name in IMPORTS
        if m == module and name != "*" and not hasattr(mod, name) and not _submodule(module, name)
    ]
    assert not missing, "\n".join(missing)


def _submodule(module: str, name: str) -> bool:
    """`from lorakit.serve import app` names a submodule, which need not be imported yet."""
    try:
        importlib.import_module(f"{module}.{name}")
    except ImportError:
        return False
    return True
