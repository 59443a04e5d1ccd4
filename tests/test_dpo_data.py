"""DPO's data: preference pairs read in five shapes, named errors, and labels on the answers only."""

from __future__ import annotations

import json

import pytest

from lorakit.data.files import DataError
from lorakit.data.preference import encode_pairs, parse_pairs, read_pairs
from lorakit.data.tokenize import IGNORE

from tiny import write_jsonl

PROMPT = [{"role": "user", "content": "Capital of France?"}]
CHOSEN = [{"role": "assistant", "content": "Paris."}]
REJECTED = [{"role": "assistant", "content": "Lyon."}]


def _one(record, suffix=".jsonl", fields=None):
    data = (json.dumps(record) + "\n").encode()
    return parse_pairs(data, "x" + suffix, fields)[0]


# -- shapes -----------------------------------------------------------------------------------------------------------


def test_explicit_text_pair_is_two_prompt_completion_examples():
    pair = _one({"prompt": "2+2=", "chosen": "4", "rejected": "5"})
    assert pair == {
        "chosen": {"prompt": "2+2=", "completion": "4"},
        "rejected": {"prompt": "2+2=", "completion": "5"},
    }


def test_conversational_shapes_agree():
    """TRL's explicit and implicit prompts, OpenAI's preference format and ShareGPT's all give the same pair."""
    explicit = _one({"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED})
    implicit = _one({"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED})
    openai = _one(
        {"input": {"messages": PROMPT}, "preferred_output": CHOSEN, "non_preferred_output": REJECTED}
    )
    sharegpt = _one(
        {
            "conversations": [{"from": "human", "value": "Capital of France?"}],
            "chosen": {"from": "gpt", "value": "Paris."},
            "rejected": {"from": "gpt", "value": "Lyon."},
        }
    )
    assert explicit == implicit == openai == sharegpt
    assert explicit["chosen"] == {"messages": PROMPT + CHOSEN}


def test_earlier_assistant_turns_are_not_learned():
    """Alpaca's history and a conversation's earlier answers are context: weight 0; the answer is learned."""
    alpaca = _one(
        {
            "instruction": "And of Spain?",
            "history": [["Capital of France?", "Paris."]],
            "system": "Be brief.",
            "chosen": "Madrid.",
            "rejected": "Barcelona.",
        }
    )
    msgs = alpaca["chosen"]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[2]["weight"] == 0 and "weight" not in msgs[4] and msgs[4]["content"] == "Madrid."
    assert alpaca["rejected"]["messages"][-1]["content"] == "Barcelona."
    conv = _one({"prompt": PROMPT + CHOSEN + PROMPT, "chosen": CHOSEN, "rejected": REJECTED})
    assert conv["chosen"]["messages"][1]["weight"] == 0


def test_openai_tools_and_csv_with_fields(tmp_path):
    tools = [{"type": "function", "function": {"name": "capital", "parameters": {"type": "object"}}}]
    call = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "capital", "arguments": {"c": "FR"}}}],
        }
    ]
    pair = _one(
        {
            "input": {"messages": PROMPT, "tools": tools},
            "preferred_output": call,
            "non_preferred_output": REJECTED,
        }
    )
    assert pair["chosen"]["tools"][0]["name"] == "capital" and pair["chosen"]["messages"][-1]["tool_calls"]
    csv = tmp_path / "p.csv"
    csv.write_text("question,good,bad\n2+2=,4,5\n")
    assert read_pairs(csv, {"prompt": "question", "chosen": "good", "rejected": "bad"}) == [
        {"chosen": {"prompt": "2+2=", "completion": "4"}, "rejected": {"prompt": "2+2=", "completion": "5"}}
    ]


@pytest.mark.parametrize(
    "records, words",
    [
        ([{"prompt": "a", "completion": "b"}], "p.jsonl:1: not a preference pair (an example for supervised"),
        ([{"question": "a"}], "p.jsonl:1: not a preference pair; expected"),
        (
            [{"instruction": "a", "output": "b"}],
            "p.jsonl:1: not a preference pair (an example for supervised",
        ),
        (
            [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"chosen": PROMPT, "rejected": PROMPT}],
            "p.jsonl:2: a pair",
        ),
        ([{"prompt": "a", "chosen": 3, "rejected": "c"}], "p.jsonl:1: a text 'prompt' needs a text 'chosen'"),
        ([{"chosen": "a b", "rejected": "a c"}], "texts need a 'prompt'"),
        ([{"prompt": PROMPT, "chosen": PROMPT, "rejected": REJECTED}], "'chosen' has no assistant message"),
        (
            [{"prompt": PROMPT, "chosen": [{"role": "assistant"}], "rejected": REJECTED}],
            "p.jsonl:1: chosen: messages",
        ),
        (
            [
                {
                    "conversations": [{"from": "human", "value": "q"}],
                    "chosen": {"from": "human", "value": "a"},
                    "rejected": "b",
                }
            ],
            "'chosen' must be the assistant's turn",
        ),
        (
            [{"input": "q", "preferred_output": CHOSEN, "non_preferred_output": REJECTED}],
            "'input' must be an object",
        ),
        ([], "no preference pairs (the file is empty)"),
    ],
)
def test_bad_pairs_name_the_record(tmp_path, records, words):
    path = write_jsonl(tmp_path / "p.jsonl", records)
    with pytest.raises(DataError) as e:
        read_pairs(path)
    assert words in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_labels_cover_the_answers_only(tok):
    """On SmolLM2's tokenizer: both sides share the prompt's tokens, and only each answer (with the template's
    end of turn) is learned; a tie teaches nothing and is dropped, counted."""
    pairs = [_one({"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED})]
    pairs.append(_one({"prompt": "x", "chosen": "same", "rejected": "other"}))
    pairs[1]["rejected"] = pairs[1]["chosen"]
    rows, stats = encode_pairs(tok, pairs, max_len=256)
    assert stats["dropped"] == 1 and len(rows) == 1
    c, r = rows[0].chosen, rows[0].rejected
    start = next(i for i, y in enumerate(c.labels) if y != IGNORE)
    assert c.input_ids[:start] == r.input_ids[:start] and all(y == IGNORE for y in r.labels[:start])
    assert tok.decode([y for y in c.labels if y != IGNORE]) == "Paris.<|im_end|>\n"
    assert tok.decode([y for y in r.labels if y != IGNORE]) == "Lyon.<|im_end|>\n"
