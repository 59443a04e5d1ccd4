"""Data files and tokenisation: the three JSONL shapes, line-numbered errors, label masking, packing, tasks."""

from __future__ import annotations

import json

import pytest

from lorakit.data.jsonl import DataError, read_jsonl
from lorakit.data.tasks import make_task
from lorakit.data.tokenize import IGNORE, Encoded, encode_dataset, encode_example, pack

from tiny import learned_text


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize(
    "rows,match",
    [
        pytest.param(
            ['{"prompt": "a", "completion": "b"}', "{oops"], r"x\.jsonl:2: not valid JSON", id="bad-json"
        ),
        pytest.param(
            [{"question": "a", "answer": "b"}],
            r"x\.jsonl:1: unknown fields \['answer', 'question'\]",
            id="fields",
        ),
        pytest.param(
            [{"text": "a"}, {"prompt": "p", "completion": "c"}],
            r"x\.jsonl:2: a prompt_completion example",
            id="mixed",
        ),
        pytest.param(
            [{"messages": [{"role": "user", "content": "hi"}]}],
            r"x\.jsonl:1: no assistant message",
            id="no-asst",
        ),
        pytest.param(
            [{"messages": [{"role": "robot", "content": "hi"}]}],
            r"x\.jsonl:1: messages\[0\] needs a 'role'",
            id="bad-role",
        ),
        pytest.param(
            [{"prompt": 3, "completion": "c"}], r"x\.jsonl:1: 'prompt' must be a string", id="not-string"
        ),
        pytest.param([[1, 2]], r"x\.jsonl:1: expected a JSON object", id="not-object"),
        pytest.param([""], r"x\.jsonl: no examples", id="empty"),
    ],
)
def test_bad_files_name_the_line(tmp_path, rows, match):
    with pytest.raises(DataError, match=match):
        read_jsonl(_write(tmp_path / "x.jsonl", rows))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_jsonl(tmp_path / "nope.jsonl")


@pytest.mark.real_model
def test_prompt_completion_learns_only_the_completion(tok):
    enc = encode_example(tok, {"prompt": "Say hi", "completion": "Hello there"}, max_len=256)
    assert learned_text(tok, enc).strip() == "Hello there<|im_end|>"
    assert "Say hi" in tok.decode(enc.input_ids)
    every = encode_example(
        tok, {"prompt": "Say hi", "completion": "Hello there"}, max_len=256, train_on_all=True
    )
    assert every.labels == every.input_ids


@pytest.mark.real_model
def test_messages_learn_only_assistant_turns(tok):
    ex = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "One?"},
            {"role": "assistant", "content": "Uno."},
            {"role": "user", "content": "Two?"},
            {"role": "assistant", "content": "Dos."},
        ]
    }
    enc = encode_example(tok, ex, max_len=256)
    learned = learned_text(tok, enc)
    assert "Uno." in learned and "Dos." in learned
    assert "One?" not in learned and "Be brief" not in learned and "Two?" not in learned
    full = tok.apply_chat_template(ex["messages"], tokenize=False)
    assert tok.decode(enc.input_ids) == full  # the pieces add up to the template's rendering


@pytest.mark.real_model
def test_truncation_is_counted_and_empty_rows_dropped(tok):
    long = {"prompt": "word " * 300, "completion": "end"}
    rows, stats = encode_dataset(tok, [long, {"prompt": "a", "completion": "b"}], max_len=64)
    assert stats["truncated"] == 1 and stats["dropped"] == 1 and len(rows) == 1
    assert all(len(r.input_ids) <= 64 for r in rows)


@pytest.mark.real_model
def test_text_shape_learns_everything(tok):
    enc = encode_example(tok, {"text": "plain words"}, max_len=32)
    assert enc.labels == enc.input_ids and tok.decode(enc.input_ids).endswith(tok.eos_token)


def test_packing():
    rows = [Encoded([1, 2, 3], [IGNORE, 2, 3]), Encoded([4, 5], [4, 5]), Encoded([6, 7, 8, 9], [6, 7, 8, 9])]
    packed = pack(rows, max_len=6)
    assert [r.input_ids for r in packed] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert packed[0].labels == [IGNORE, 2, 3, IGNORE, 5]  # the first token of a packed example is not learned


def test_builtin_task_is_seeded_and_disjoint():
    train, ev = make_task("dates", n_train=300, n_eval=50, seed=1)
    again, ev2 = make_task("dates", n_train=300, n_eval=50, seed=1)
    assert train == again and ev == ev2
    assert not {e["prompt"] for e in ev} & {t["prompt"] for t in train}
    for ex in train[:50]:
        y, m, d = ex["completion"].split("-")
        assert len(y) == 4 and 1 <= int(m) <= 12 and 1 <= int(d) <= 31
    with pytest.raises(DataError, match="unknown built-in task 'nope'"):
        make_task("nope")


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(DataError, match=r"^.*x\.jsonl:3: not valid UTF-8 text \(byte 14 of the line\)$"):
        read_jsonl(f)


def test_a_byte_order_mark_is_accepted(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "from notepad"}\n')
    assert read_jsonl(f) == [{"text": "from notepad"}]


def test_a_folder_is_not_a_data_file(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(DataError, match=r"d\.jsonl: a folder, neither a data file nor a `datasets` folder"):
        read_jsonl(tmp_path / "d.jsonl")


def test_an_unhashable_role_is_a_clear_error(tmp_path):
    rows = [{"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    with pytest.raises(DataError, match=r"x\.jsonl:1: messages\[0\] needs a 'role'"):
        read_jsonl(_write(tmp_path / "x.jsonl", rows))
