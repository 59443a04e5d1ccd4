"""The command lines the README and docs/ show are ones that work.

- Every `lorakit ...` line (in a code block or inline code) parses: the subcommand's options exist, `lorakit
  train`'s overrides name real fields with values of the right type, `lorakit bench`'s options are its own.
- Every `python benchmarks/X.py ...` and `bash scripts/X.sh` line names a file that exists, and the options it
  passes are ones that script declares.
- The README's main commands run, as written, on the real default model, with small step counts appended to
  the training runs (`lorakit serve`, `lorakit bench` and `torchrun` have their own tests: test_serve.py,
  test_bench.py, test_ddp.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from lorakit import bench, cli
from lorakit.errors import LorakitError
from lorakit.train.config import load_config

from tiny import cli_here

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*```")
INLINE = re.compile(r"`([^`\n]+)`")
LORAKIT = re.compile(
    r"^(?:\.venv/bin/)?lorakit\s|^torchrun\s.*-m lorakit\s|^(?:\.venv/bin/)?python -m lorakit\s"
)
SCRIPT = re.compile(r"^(?:\.venv/bin/)?python3? (benchmarks/\S+\.py)|^bash (scripts/\S+\.sh)")


def _commands(text: str) -> list[tuple[int, str, bool]]:
    """(line number, command, in a code block?) of every shell line in fenced blocks, `\\` continuations joined,
    `&&` split, and of every inline code span."""
    out: list[tuple[int, str, bool]] = []
    in_block, pending, start = False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_block, pending = not in_block, ""
            continue
        if in_block:
            if not pending:
                start = n
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            whole, pending = pending + line, ""
            out += [(start, part.strip(), True) for part in whole.split("&&")]
        else:
            out += [(n, span.strip(), False) for span in INLINE.findall(line)]
    return out


def _argv(command: str) -> list[str]:
    """The shell words of a documented command, without comments, `...` and the brackets of optional parts."""
    words = shlex.split(command, comments=True)
    words = [w for w in words if w not in ("...", "[", "]")]
    # an optional part's bracket opens or closes a word ("[--lora.corda_mode", "kpm]"); a value with balanced
    # brackets ("[[0, 20], [10, 30]]") is a value
    return [w.strip("[]") if w.count("[") != w.count("]") else w for w in words]


def _lorakit_argv(words: list[str]) -> list[str]:
    if "-m" in words and "lorakit" in words:
        return words[words.index("lorakit", words.index("-m")) + 1 :]
    return words[1:]


def documented() -> list[tuple[str, str, bool]]:
    """(file:line, command, whole?): a command in a code block is a whole one; one in running text may be a
    reference (`lorakit merge`) or hold placeholders (`--rank b`), so only its options are checked."""
    found = []
    for path in DOCS:
        for n, cmd, whole in _commands(path.read_text()):
            if not whole and "<" in cmd:  # output shown in running text (`lorakit <cmd>: error: ...`)
                continue
            if LORAKIT.match(cmd) or SCRIPT.match(cmd):
                found.append((f"{path.relative_to(ROOT)}:{n}", cmd, whole))
    return found


DOCUMENTED = documented()
LORAKIT_LINES = [pytest.param(c, w, id=f"{at} {c[:40]}") for at, c, w in DOCUMENTED if LORAKIT.match(c)]
SCRIPT_LINES = [pytest.param(c, id=f"{at} {c[:40]}") for at, c, _ in DOCUMENTED if SCRIPT.match(c)]
# argparse errors that a reference in running text may raise: it leaves out arguments or shows placeholders
REFERENCE_ERRORS = (
    "the following arguments are required",
    "one of the arguments",
    "invalid int value",
    "invalid float value",
)


def test_the_docs_show_commands():
    """The extraction finds the README's commands (so the tests below cannot pass on an empty list)."""
    readme = [cmd for where, cmd, _ in DOCUMENTED if where.startswith("README.md")]
    assert "lorakit train" in readme and "lorakit demo" in readme and len(LORAKIT_LINES) > 40


def _parse_or_fail(
    parser: argparse.ArgumentParser, argv: list[str], whole: bool = True
) -> tuple[argparse.Namespace, list[str]]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_known_args(argv)
    except SystemExit as e:
        if e.code == 0:  # --help
            return argparse.Namespace(command="help"), []
        message = err.getvalue().strip().splitlines()[-1]
        if not whole and any(r in message for r in REFERENCE_ERRORS):
            return argparse.Namespace(command="reference"), []
        pytest.fail(f"{' '.join(argv)}: {message}")


@pytest.mark.parametrize("command, whole", LORAKIT_LINES)
def test_documented_lorakit_command_parses(command, whole):
    argv = _lorakit_argv(_argv(command))
    args, rest = _parse_or_fail(cli.build_parser(), argv, whole)
    if args.command == "bench":
        _parse_or_fail(bench_parser(), rest)
    elif args.command == "train":
        overrides = rest[1:] if rest and not rest[0].startswith("--") else rest
        try:
            load_config(None, overrides)
        except LorakitError as e:
            pytest.fail(f"{command}: {e}")
    elif args.command not in ("help", "reference"):
        assert not rest, f"{command}: unrecognized arguments {rest}"


def bench_parser() -> argparse.ArgumentParser:
    """`lorakit bench`'s own parser, as `bench.parse_args` builds it."""
    parsers: list[argparse.ArgumentParser] = []
    real = argparse.ArgumentParser.parse_args

    def capture(self, argv=None, namespace=None):
        parsers.append(self)
        return real(self, [], namespace)

    argparse.ArgumentParser.parse_args = capture
    try:
        bench.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = real
    return parsers[0]


@pytest.mark.parametrize("command", SCRIPT_LINES)
def test_documented_script_exists_and_takes_its_options(command):
    words = _argv(command)
    m = SCRIPT.match(command)
    script = ROOT / (m.group(1) or m.group(2))
    assert script.is_file(), f"{command}: {script.relative_to(ROOT)} does not exist"
    if "from lorakit.bench import main" in script.read_text():  # bench_step.py is `lorakit bench`
        _parse_or_fail(bench_parser(), words[2:])
        return
    declared = set(re.findall(r"""["'](--[a-z0-9][a-z0-9-]*)["']""", script.read_text()))
    own, passed = (words[: words.index("--")], words[words.index("--") + 1 :]) if "--" in words else (words, [])
    used = {w.split("=")[0] for w in own if w.startswith("--")}
    assert used <= declared, f"{command}: {sorted(used - declared)} not declared in {script.name}"
    if passed:  # after a bare --: `lorakit train` overrides the script passes on (bench_qlora_quality, bench_loftq)
        load_config(None, passed)


# ------------------------------------------------------------------------------------------------------------
# The README's main commands, run
# ------------------------------------------------------------------------------------------------------------

SMALL = [
    "--train.steps",
    "2",
    "--train.batch_size",
    "2",
    "--data.n_train",
    "16",
    "--data.n_eval",
    "4",
    "--eval.limit",
    "2",
    "--eval.max_new_tokens",
    "4",
    "--train.save_every",
    "0",
]
# In README order; each must be shown verbatim in the README. Placeholder paths are made before they are used.
RUN = [
    "lorakit train",
    "lorakit eval --adapter runs/train/adapter --data dev.jsonl",
    'lorakit generate --adapter runs/train/adapter "Rewrite this date in ISO format (YYYY-MM-DD), answer with '
    'the date only: May 4, 1937"',
    "lorakit inspect out/adapter",
    "lorakit inspect --r 16 --targets q_proj,v_proj",
    "lorakit merge --adapter out/adapter --out merged/",
    "lorakit extract --tuned merged/ --out back/ -r 32",
    "lorakit train --data.train_file chat.jsonl --data.eval_file dev.jsonl --model path/to/hf_folder",
    "lorakit combine a/ b/ --weights 0.7 0.3 --method cat --out ab/",
    "lorakit train --objective dpo --dpo.sft_weight 1",  # before dylora's run: convert reads its adapter
    "lorakit train --method dylora",
    "lorakit convert --adapter runs/train/adapter --rank 4 --out r4/",
    "lorakit inspect --quantize nf4",
    "lorakit train --help",
]


def _data(tmp: Path) -> None:
    rows = [
        {"prompt": "Rewrite this date in ISO format (YYYY-MM-DD): May 4, 1937", "completion": "1937-05-04"},
        {"prompt": "Rewrite this date in ISO format (YYYY-MM-DD): 2 Jan 2001", "completion": "2001-01-02"},
    ]
    (tmp / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in rows
    ]
    (tmp / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chat * 4))


def _after(command: str, tmp: Path) -> None:
    """Make the placeholder folders later commands name, from what this one wrote."""
    if command == "lorakit train":
        for name in ("out/adapter", "a", "b"):
            shutil.copytree(tmp / "runs/train/adapter", tmp / name)
    elif command.startswith("lorakit merge"):
        (tmp / "path/to").mkdir(parents=True)
        (tmp / "path/to/hf_folder").symlink_to(tmp / "merged", target_is_directory=True)


@pytest.mark.real_model
@pytest.mark.slow
def test_readme_main_commands_run(tmp_path, monkeypatch, capsys):
    readme_commands = [_argv(cmd) for where, cmd, _ in DOCUMENTED if where.startswith("README.md")]
    missing = [c for c in RUN if _argv(c) not in readme_commands]
    assert not missing, f"the README no longer shows {missing}; update RUN"
    monkeypatch.chdir(tmp_path)
    _data(tmp_path)
    for command in RUN:
        argv = _lorakit_argv(_argv(command))
        if argv[0] == "train" and "--help" not in argv:
            argv += SMALL
        proc = cli_here(capsys, *argv)
        assert proc.returncode == 0, f"{command}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        _after(command, tmp_path)
    assert (tmp_path / "r4/adapter_config.json").is_file() and (tmp_path / "ab/adapter_config.json").is_file()
    assert (tmp_path / "merged/config.json").is_file() and (tmp_path / "back/extract.json").is_file()
