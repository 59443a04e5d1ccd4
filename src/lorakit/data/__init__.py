"""Training data: files (JSONL, JSON, CSV, Parquet, Arrow, `datasets` folders) in lorakit's three shapes or
Alpaca's, ShareGPT's and TRL's, preference pairs for DPO, chat templates, label masking, packing, built-in
tasks."""

from lorakit.data.jsonl import DataError, read_examples, read_jsonl
from lorakit.data.preference import Pair, encode_pairs, read_pairs
from lorakit.data.tokenize import Encoded, encode_dataset, encode_example

__all__ = [
    "DataError",
    "Encoded",
    "Pair",
    "encode_dataset",
    "encode_example",
    "encode_pairs",
    "read_examples",
    "read_jsonl",
    "read_pairs",
]
