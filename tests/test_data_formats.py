"""Training data in the files and shapes other tools write: JSON arrays, CSV/TSV and Parquet; Alpaca, ShareGPT,
TRL's conversational prompt/completion and OpenAI's message weights; column renaming; and their bad inputs (tool
calls' among them: their reading and rendering are tests/test_data_tools.py's)."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from lorakit.data.jsonl import DataError, parse_examples, read_examples
from lorakit.data.tokenize import encode_example

from tiny import learned_text, write_jsonl

pa = pytest.importorskip("pyarrow")  # a test extra (pyproject's `test` and `data`): CI has it
pq = pytest.importorskip("pyarrow.parquet")


def _csv(path, rows, delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


def _parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


ALPACA = [
    {
        "instruction": "Translate to French",
        "input": "cat",
        "output": "chat",
        "system": "Be brief.",
        "history": [["Hi", "Hello!"]],
    },
    {"instruction": "Say hi", "input": "", "output": "hi", "system": "", "history": []},
]
ALPACA_MESSAGES = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Translate to French\ncat"},  # LLaMA-Factory joins them with a newline
        {"role": "assistant", "content": "chat"},
    ],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
]


def test_alpaca_records_become_the_conversation_llama_factory_builds(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA, indent=2))  # a JSON array over many lines, as Alpaca's files are
    assert read_examples(path) == [{"messages": m} for m in ALPACA_MESSAGES]


@pytest.mark.parametrize("suffix", [".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet"])
def test_every_file_type_reads_the_same_examples(tmp_path, suffix):
    path = tmp_path / f"alpaca{suffix}"
    if suffix in (".csv", ".tsv"):
        _csv(path, ALPACA, "\t" if suffix == ".tsv" else ",")  # history as a JSON cell
    elif suffix == ".parquet":
        _parquet(path, ALPACA)
    else:
        write_jsonl(path, ALPACA)  # a .json file of one record per line is JSON Lines
    assert read_examples(path) == [{"messages": m} for m in ALPACA_MESSAGES]


def test_a_csv_cell_longer_than_csvs_guard_reads(tmp_path):
    """csv's field_size_limit (128 KiB) guards against runaway quotes; a long document is a real cell."""
    import csv as csvmodule

    before = csvmodule.field_size_limit()
    long = "word " * 60_000  # 300 KB
    (ex,) = read_examples(_csv(tmp_path / "doc.csv", [{"text": long}]))
    assert ex == {"text": long}
    assert csvmodule.field_size_limit() == before  # the process's setting is left as it was


def test_parquet_nulls_are_absent_values(tmp_path):
    """A Parquet column holds a value for every row, so Arrow gives an absent key as None: an absent input,
    system prompt or message weight."""
    alpaca = [{"instruction": "a", "input": None, "output": "b", "system": None}]
    assert read_examples(_parquet(tmp_path / "a.parquet", alpaca)) == [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    ]
    msgs = [  # one row's assistant message has a weight, so the column (a struct field) exists in every message
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0},
                      {"role": "user", "content": "x"}, {"role": "assistant", "content": "z"}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "z"}]},
    ]  # fmt: skip
    table = pa.Table.from_pylist(msgs)
    assert table.to_pylist()[1]["messages"][0] == {"role": "user", "content": "x", "weight": None}
    pq.write_table(table, tmp_path / "m.parquet")
    assert read_examples(tmp_path / "m.parquet") == msgs


def test_sharegpt_from_value_and_role_content(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "Q1"},
                {"from": "gpt", "value": "A1"},
                {"from": "human", "value": "Q2"},
                {"from": "gpt", "value": "A2"},
            ],
            "system": "S",
        },
        {"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    ]
    assert read_examples(write_jsonl(tmp_path / "s.jsonl", rows)) == [
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"},
            ]
        },
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    ]


def test_trl_conversational_prompt_completion_learns_the_completion_only(tmp_path):
    row = {
        "prompt": [
            {"role": "user", "content": "1?"},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "2?"},
        ],
        "completion": [{"role": "assistant", "content": "two"}],
    }
    (ex,) = read_examples(write_jsonl(tmp_path / "c.jsonl", [row]))
    assert ex["messages"] == [
        *row["prompt"][:1],
        {**row["prompt"][1], "weight": 0},
        row["prompt"][2],
        *row["completion"],
    ]


def test_openai_content_parts_are_joined_and_other_parts_refused(tmp_path):
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    row = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": [parts[1]]}]}
    assert read_examples(write_jsonl(tmp_path / "p.jsonl", [row])) == [
        {"messages": [{"role": "user", "content": "Hello, world"}, {"role": "assistant", "content": "world"}]}
    ]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}
    row["messages"][0]["content"] = [parts[0], image]
    with pytest.raises(
        DataError, match=r"p\.jsonl:1: messages\[0\] has a 'image_url' content part: lorakit trains"
    ):
        read_examples(write_jsonl(tmp_path / "p.jsonl", [row]))


def test_fields_rename_columns(tmp_path):
    path = _csv(tmp_path / "qa.csv", [{"question": "2+2?", "answer": "4", "id": "7"}])
    assert read_examples(path, {"prompt": "question", "completion": "answer"}) == [
        {"prompt": "2+2?", "completion": "4", "id": "7"}
    ]
    assert parse_examples(path.read_bytes(), "qa.csv", {"prompt": "question", "completion": "answer"})[0][
        "prompt"
    ] == ("2+2?")


@pytest.mark.parametrize(
    "name,content,fields,match",
    [
        (
            "x.json",
            '[{"instruction": "a", "output": 3}]',
            None,
            r"x\.json: record 1: 'output' must be a string",
        ),
        (
            "x.json",
            '[{"instruction": "a", "output": "b", "history": [["q"]]}]',
            None,
            r"record 1: 'history' must be",
        ),
        (
            "x.json",
            '[{"instruction": "a", "output": "b"}, 3]',
            None,
            r"x\.json: record 2: expected a JSON object",
        ),
        ("x.json", '[\n{"instruction": "a",\n "output": "b"\n}}', None, r"x\.json:4: not valid JSON"),
        ("x.json", '{\n "data": []\n}', None, r"x\.json: one JSON object; expected a JSON array"),
        ("x.json", "[]", None, r"x\.json: no examples"),
        (
            "x.jsonl",
            '{"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}',
            None,
            r"x\.jsonl:1: conversations\[1\] needs a 'from' in",
        ),
        (
            "x.jsonl",
            '{"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]}',
            None,
            r"conversations\[1\]: a function_call's value must be \{\"name\"",
        ),
        (
            "x.jsonl",
            '{"conversations": [{"from": "gpt", "value": "a"}], "tools": "[{\\"name\\": \\"f g\\"}]"}',
            None,
            r"x\.jsonl:1: tools\[0\]'s name must be 1 to 64 letters",
        ),
        (
            "x.jsonl",
            '{"conversations": [{"from": "gpt", "value": "a"}], "tools": "[oops"}',
            None,
            r"'tools' is text that is not JSON",
        ),
        (
            "x.jsonl",
            '{"conversations": [{"from": "gpt", "value": "a"}], "tools": [{"name": "f"}, {"name": "f"}]}',
            None,
            r"tools\[1\]: the function 'f' is listed twice",
        ),
        (
            "x.jsonl",
            '{"messages": [{"role": "user", "content": "q", "tool_calls": [{"function": {"name": "f"}}]}, {"role": "assistant", "content": "a"}]}',
            None,
            r"messages\[0\]: 'tool_calls' must be an assistant's non-empty list",
        ),
        (
            "x.jsonl",
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]}',
            None,
            r"messages\[1\]: the arguments of 'f' must be an object, or its JSON text",
        ),
        (
            "x.jsonl",
            '{"tools": [{"type": "function", "function": {"name": "g"}}], "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]}',
            None,
            r"messages\[1\]: calls 'f', which the record's 'tools' do not offer: \['g'\]",
        ),
        (
            "x.jsonl",
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null}]}',
            None,
            r"messages\[1\] needs a 'role' in .* and a string 'content' \(or an assistant's 'tool_calls'\)",
        ),
        ("x.jsonl", '{"conversations": []}', None, r"'conversations' must be a non-empty list"),
        (
            "x.jsonl",
            '{"instruction": "a", "output": "b"}\n{"conversations": [{"from": "gpt", "value": "a"}]}',
            None,
            r"x\.jsonl:2: a sharegpt example in a file of alpaca examples",
        ),
        (
            "x.jsonl",
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}',
            None,
            r"messages\[1\]: 'weight' is 0 or 1, on assistant messages",
        ),
        (
            "x.jsonl",
            '{"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}',
            None,
            r"got 1 on a user message",
        ),
        (
            "x.jsonl",
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}',
            None,
            r"x\.jsonl:1: no assistant message to learn from",
        ),
        (
            "x.jsonl",
            '{"prompt": [{"role": "user", "content": "q"}], "completion": "a"}',
            None,
            r"a 'prompt' of messages needs a 'completion' of messages",
        ),
        (
            "x.jsonl",
            '{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]}',
            None,
            r"the 'completion' has no assistant message",
        ),
        ("x.csv", "prompt,completion\na,b\nc,d,e\n", None, r"x\.csv:3: 3 cells in a file of 2 columns"),
        ("x.csv", "prompt,prompt\na,b\n", None, r"x\.csv:1: the header row needs distinct"),
        ("x.csv", 'messages\n"[{oops"\n', None, r"x\.csv:2: column 'messages' must hold a JSON list"),
        ("x.csv", "prompt,completion\n", None, r"x\.csv: no examples"),
        (
            "x.csv",
            "question,answer\na,b\n",
            {"prompt": "question", "completion": "reply"},
            r"x\.csv:2: no column 'reply'",
        ),
        (
            "x.csv",
            "question,answer\na,b\n",
            {"question": "prompt"},
            r"data\.fields maps 'question', which is none",
        ),
        (
            "x.csv",
            "question,answer\na,b\n",
            {"prompt": "q", "completion": "q"},
            r"maps two keys to one column",
        ),
        ("x.tsv", 'prompt\tcompletion\n"a\tb\n', None, r"x\.tsv:\d+: (1 cells|not valid CSV)"),
    ],
)
def test_bad_files_are_one_line_naming_the_record(tmp_path, name, content, fields, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=match) as e:
        read_examples(path, fields)
    assert "\n" not in str(e.value)


def test_a_broken_parquet_file_is_one_line(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not a Parquet file PAR1")
    with pytest.raises(DataError, match=r"x\.parquet: not a readable Parquet file \(") as e:
        read_examples(tmp_path / "x.parquet")
    assert "\n" not in str(e.value)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = _parquet(tmp_path / "a.parquet", [{"text": "x"}])
    for mod in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # what `import pyarrow` sees where it is not installed
    with pytest.raises(
        DataError, match=r"a\.parquet: reading Parquet files needs pyarrow \(pip install pyarrow\)"
    ):
        read_examples(path)


# -- what training learns from them (the real tokenizer and chat template) -------------------------------------


@pytest.mark.real_model
def test_an_alpaca_record_trains_as_its_conversation(tok, tmp_path):
    (ex,) = read_examples(write_jsonl(tmp_path / "a.jsonl", ALPACA[:1]))
    enc = encode_example(tok, ex, max_len=512)
    twin = encode_example(tok, {"messages": ALPACA_MESSAGES[0]}, max_len=512)
    assert (enc.input_ids, enc.labels) == (twin.input_ids, twin.labels)
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(ALPACA_MESSAGES[0], tokenize=False)
    learned = learned_text(tok, enc)
    assert (
        "Hello!" in learned and "chat" in learned
    )  # history answers are learned too (LLaMA-Factory's default)
    assert "Translate" not in learned and "Be brief" not in learned


@pytest.mark.real_model
def test_weight_zero_leaves_an_assistant_message_unlearned(tok):
    msgs = [
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "Uno.", "weight": 0},
        {"role": "user", "content": "Two?"},
        {"role": "assistant", "content": "Dos.", "weight": 1},
    ]
    enc = encode_example(tok, {"messages": msgs}, max_len=256)
    learned = learned_text(tok, enc)
    assert "Dos." in learned and "Uno." not in learned
    plain = encode_example(
        tok, {"messages": [{k: v for k, v in m.items() if k != "weight"} for m in msgs]}, max_len=256
    )
    assert enc.input_ids == plain.input_ids  # the weight changes the labels only, never the text
    assert "Uno." in learned_text(tok, plain)
    every = encode_example(tok, {"messages": msgs}, max_len=256, train_on_all=True)
    assert every.labels == every.input_ids


def test_training_from_a_csv_with_renamed_columns_equals_training_fromwrite_jsonl(tmp_path):
    """The same examples in another file type are the same run: equal losses at every step (tiny Llama)."""
    from runs import addition_run

    (tmp_path / "a").mkdir()
    reference, _ = addition_run(tmp_path / "a", "--train.steps", "3")
    rows = [{"question": f"{i}+1=", "answer": str(i + 1)} for i in range(40)]
    root = tmp_path / "b"
    root.mkdir()
    _csv(root / "train.csv", rows[:32])
    _parquet(root / "eval.parquet", rows[32:])
    summary, _ = addition_run(
        root,
        *("--train.steps", "3", "--data.train_file", str(root / "train.csv")),
        *("--data.eval_file", str(root / "eval.parquet")),
        *("--data.fields", "{prompt: question, completion: answer}"),
    )

    def losses(run):
        return [
            r["loss"]
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        ]

    assert len(losses(root / "run")) == 3
    assert losses(root / "run") == losses(tmp_path / "a" / "run")  # bitwise: the same ops on the same batches
    assert summary["before"] == reference["before"] and summary["after"] == reference["after"]
    assert summary["data"] == reference["data"]
