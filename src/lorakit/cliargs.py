"""Argument types and error text for the `lorakit` command line: numbers checked where argparse reads them, so
a bad value is argparse's one error line before any model loads."""

from __future__ import annotations

import argparse
import math
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other error of the CLI: `lorakit train: error: ...`, and a
    pointer to --help instead of the usage block. Subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_in(low: int, high: int | None, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = _int_in(1, None, "a positive integer")
"""argparse type: an integer >= 1 (steps, ranks, lengths, batch sizes)."""
non_negative_int = _int_in(0, None, "an integer >= 0")
"""argparse type: an integer >= 0 (a size where 0 turns something off)."""
tcp_port = _int_in(1, 65535, "a TCP port 1..65535")
"""argparse type: a TCP port, 1..65535."""


def non_negative(text: str) -> float:
    """argparse type: a finite number >= 0 (a temperature, a wait in ms)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a size limit in MB)."""
    value = non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def os_error_line(e: OSError) -> str:
    """'PATH: reason' for an OSError from the system, else its text on one line."""
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}" + (f" -> {e.filename2}" if e.filename2 else "")
    return " ".join(str(e).split()) or type(e).__name__
