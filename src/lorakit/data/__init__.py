"""Training data: files (JSONL, JSON, CSV, Parquet) in lorakit's three shapes or Alpaca's, ShareGPT's and TRL's,
chat templates, label masking, packing, built-in tasks."""

from lorakit.data.jsonl import DataError, read_examples, read_jsonl
from lorakit.data.tokenize import Encoded, encode_dataset, encode_example

__all__ = ["DataError", "Encoded", "encode_dataset", "encode_example", "read_examples", "read_jsonl"]
