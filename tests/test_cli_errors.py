"""Every `lorakit` command answers a bad or truncated file with ONE line, `lorakit <cmd>: error: ...`, naming
the file, and exit status 2 (no traceback). The commands run in-process (`lorakit.cli.main`) on a tiny Llama
saved as a Hugging Face folder with a character tokenizer: no download, seconds per command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import lorakit
from lorakit import LoraConfig
from lorakit.cli import main

from tiny import randomize, tiny_llama


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from fsdp_worker import char_tokenizer

    root = tmp_path_factory.mktemp("cli")
    model = tiny_llama()
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    randomize(model)
    good = lorakit.save_adapter(model, root / "good")
    (root / "data.jsonl").write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    return {"root": root, "model": root / "model", "good": good, "data": root / "data.jsonl"}


def _damaged(files, tmp_path, how: str) -> Path:
    """A copy of the good adapter, damaged as `how` says."""
    path = tmp_path / f"adapter-{how}"
    shutil.copytree(files["good"], path)
    st, cfg = path / "adapter_model.safetensors", path / "adapter_config.json"
    if how == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        st.write_bytes(b"")
    elif how == "garbage-header":  # a header length far beyond the file
        st.write_bytes(b"\xff" * 8 + b"{}")
    elif how == "weights-dir":  # a folder where the weights file should be
        st.unlink()
        st.mkdir()
    elif how == "config-list":
        cfg.write_text("[1, 2]")
    elif how == "config-dir":
        cfg.unlink()
        cfg.mkdir()
    elif how == "config-binary":
        cfg.write_bytes(b"\xff\xfe\x00garbage")
    else:
        raise AssertionError(how)
    return path


def _commands(files, adapter: Path, out: Path) -> dict[str, list[str]]:
    m = ["--model", str(files["model"])]
    return {
        "merge": ["merge", *m, "--adapter", str(adapter), "--out", str(out)],
        "inspect": ["inspect", str(adapter)],
        "inspect-apply": ["inspect", str(adapter), *m],
        "generate": ["generate", "1+1=", *m, "--adapter", str(adapter), "--max-new-tokens", "1", "--no-chat"],
        "eval": [
            "eval",
            "--data",
            str(files["data"]),
            *m,
            "--adapter",
            str(adapter),
            "--max-new-tokens",
            "1",
        ],
        "combine": ["combine", str(adapter), str(files["good"]), "--method", "cat", "--out", str(out)],
        "convert": ["convert", "--adapter", str(adapter), "--rank", "1", "--out", str(out)],
    }


DAMAGE = ["truncated", "empty", "garbage-header", "weights-dir", "config-list", "config-dir", "config-binary"]


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize(
    "command", ["merge", "inspect", "inspect-apply", "generate", "eval", "combine", "convert"]
)
def test_bad_adapter_file_is_one_line_for_every_command(files, tmp_path, capsys, command, how):
    adapter = _damaged(files, tmp_path, how)
    argv = _commands(files, adapter, tmp_path / "out")[command]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    name = argv[0]
    last = err[-1]
    assert "Traceback" not in "\n".join(err) and not any(line.startswith("  File ") for line in err)
    assert last.startswith(f"lorakit {name}: error: {adapter}"), err[-5:]
    assert [line for line in err if line.startswith("lorakit ")] == [last]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["merge", "combine"])
def test_output_path_that_is_a_file_is_one_line(files, tmp_path, capsys, command):
    out = tmp_path / "out"
    out.write_text("not a folder")
    argv = _commands(files, files["good"], out)[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"lorakit {command}: error: {out}: exists and is not a folder"
    assert out.read_text() == "not a folder"


def test_missing_data_file_and_model_are_one_line(files, tmp_path, capsys):
    assert main(["eval", "--data", str(tmp_path / "none.jsonl"), "--model", str(files["model"])]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lorakit eval: error: {tmp_path / 'none.jsonl'}: data file not found"
    )
    assert main(["generate", "hi", "--model", str(tmp_path / "nomodel")]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith(f"lorakit generate: error: model path {str(tmp_path / 'nomodel')!r} does not exist")
    )


def test_eval_fields_are_checked_in_one_line(files, tmp_path, capsys):
    data = tmp_path / "qa.csv"
    data.write_text("question,answer\n1+1=,2\n")
    model = ["--model", str(files["model"])]
    for fields, want in (
        ("{prompt: question, answers: answer}", "--fields: maps 'answers', which is none of lorakit's keys"),
        ("[question]", "--fields: must map lorakit's keys to column names"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["eval", "--data", str(data), "--fields", fields, *model])
        assert e.value.code == 2
        assert want in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["eval", "--task", "dates", "--fields", "{prompt: question}", *model]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "lorakit eval: error: --fields names the columns of a --data file: give --data too"
    assert main(["eval", "--data", str(data), *model]) == 2  # without fields: the columns are named
    assert "qa.csv:2: unknown fields ['answer', 'question']" in capsys.readouterr().err


def test_a_system_refusal_is_one_line_naming_the_path(files, tmp_path, capsys):
    """An OSError no lorakit check foresaw (here: the output's parent is a file, so mkdir fails) still ends as
    one line naming the path, not a traceback."""
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker / "sub" / "out"
    assert (
        main(["combine", str(files["good"]), str(files["good"]), "--method", "cat", "--out", str(out)]) == 2
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lorakit combine: error: ") and str(blocker) in last, last


def test_eval_with_nothing_left_after_truncation_says_so(files, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "what is one plus one? ", "completion": "2"}) + "\n")
    argv = [
        "eval",
        "--data",
        str(data),
        "--model",
        str(files["model"]),
        "--max-len",
        "4",
        "--max-new-tokens",
        "1",
    ]
    assert main([*argv, "--no-chat"]) == 0
    out = capsys.readouterr().out
    assert "eval loss: n/a (no example has a token left to evaluate after truncation to 4 tokens)" in out
    assert "eval loss: 0.0000" not in out


@pytest.mark.parametrize(
    "argv,option,value",
    [
        (["generate", "hi", "--max-new-tokens", "-3"], "--max-new-tokens", "-3"),
        (["generate", "hi", "--temperature", "nan"], "--temperature", "nan"),
        (["generate", "hi", "--temperature", "-1"], "--temperature", "-1"),
        (["eval", "--data", "x.jsonl", "--max-len", "0"], "--max-len", "0"),
        (["eval", "--data", "x.jsonl", "--limit", "-1"], "--limit", "-1"),
        (["inspect", "--r", "0"], "--r", "0"),
        (["demo", "--steps", "0"], "--steps", "0"),
        (["serve", "--port", "70000"], "--port", "70000"),
        (["serve", "--wait-ms", "inf"], "--wait-ms", "inf"),
        (["serve", "--max-batch", "0"], "--max-batch", "0"),
        (["serve", "--prefix-cache-mb", "-1"], "--prefix-cache-mb", "-1"),
        (["serve", "--prefill-chunk", "-5"], "--prefill-chunk", "-5"),
        (["serve", "--prefill-chunk", "1.5"], "--prefill-chunk", "1.5"),
    ],
)
def test_bad_numeric_options_are_refused_before_anything_loads(capsys, argv, option, value):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last.startswith(f"lorakit {argv[0]}: error: argument {option}: expected ") and repr(value) in last
    ), last


@pytest.mark.parametrize(
    "argv",
    [["generate"], ["merge", "--adapter", "x"], ["nosuch"], ["inspect", "--r", "0"], ["eval", "--data"]],
    ids=["missing-positional", "missing-option", "unknown-command", "bad-value", "option-without-value"],
)
def test_argument_errors_are_one_line(capsys, argv):
    """argparse's own errors too: one line on stderr, naming the command, with a pointer to --help (no usage
    block above it)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    prog = "lorakit" if argv[0] == "nosuch" else f"lorakit {argv[0]}"
    assert err.startswith(f"{prog}: error: ") and err.rstrip().endswith(f"(see {prog} --help)")


@pytest.mark.parametrize("name", ["my adapter", ".hidden", "x" * 257])
def test_a_served_adapter_name_out_of_the_rule_is_refused_before_anything_loads(files, capsys, name):
    """Served names take letters, digits and _ - . : / @ + (the bank maps them to the model's adapter names).
    Anything else is refused in one line at start-up, before the model loads."""
    assert main(["serve", "--model", str(files["model"]), "--adapter", f"{name}={files['good']}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"lorakit serve: error: adapter name {name!r}: use 1 to 256 letters, digits and _ - . : / @ +, starting "
        "with a letter, a digit, _ or - (no spaces)"
    ), err
