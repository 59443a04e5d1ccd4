"""Training data: JSONL files in three shapes, chat templates, label masking, packing, built-in tasks."""

from lorakit.data.jsonl import DataError, read_jsonl
from lorakit.data.tokenize import Encoded, encode_dataset, encode_example

__all__ = ["DataError", "Encoded", "encode_dataset", "encode_example", "read_jsonl"]
