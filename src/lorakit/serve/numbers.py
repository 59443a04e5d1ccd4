"""Numbers in structured output: which texts a JSON Schema `number` or `integer` (with its bounds) allows, and
which starts of them can still become one.

    adult = Num(integer=True, lo=Fraction(18), hi=Fraction(150))
    adult.prefix("17")   # False: 17 is too small, 170 to 179 too big
    adult.prefix("2")    # True: 20 to 29 fit (adult.whole("2") is False)
    adult.whole("150")   # True

Bounds are compared exactly, as fractions (never floats). A start is allowed while some number that continues it
is within the bounds: its digits so far limit the magnitudes it can reach to spans, "12" to 12 (and 12.x),
120-129.x, 1200-1299.x, ..., "12.3" to [12.3, 12.4). A bounded number is written without an exponent and never as
-0, and a bounded `number` with at most `DIGITS` significant digits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

_NUMBER = re.compile(r"-?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*|(?:\.[0-9]+)?[eE][+-]?[0-9]*)?)?")
_DECIMAL = re.compile(r"-?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?)?")
_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)?")
r"""The prefixes of a JSON number, -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?, cut anywhere; of one without an
exponent; of an integer."""
DIGITS = 15
"""Most significant digits of a bounded number (not an integer): decimals of up to 15 digits compare as the
doubles they parse to do, so a validator working in floats agrees with our exact bounds."""


@dataclass(eq=False)
class Num:
    integer: bool = False
    lo: Fraction | None = None  # the least value allowed (None: no bound), exact
    hi: Fraction | None = None
    lo_open: bool = False  # the bound itself is not allowed (exclusiveMinimum)
    hi_open: bool = False

    @property
    def bounded(self) -> bool:
        return self.lo is not None or self.hi is not None

    def prefix(self, text: str) -> bool:
        """`text` is the start of a number this node allows (a bounded number is written without an exponent, and
        never as -0)."""
        if self.integer:
            if not _INTEGER.fullmatch(text):
                return False
        elif not (_DECIMAL if self.bounded else _NUMBER).fullmatch(text):
            return False
        if not self.bounded:
            return True
        if not self.integer and len(text.lstrip("-").replace(".", "").lstrip("0")) > DIGITS:
            return False
        return self._reachable(text)

    def whole(self, text: str) -> bool:
        """`text` (a start that `prefix` allows) is a whole number this node allows."""
        if not text[-1:].isdigit():
            return False
        if not self.bounded:
            return True
        value = Fraction(text)
        return self._inside(value) and not (value == 0 and text.startswith("-"))

    def _inside(self, v: Fraction) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return self.hi is None or not (v > self.hi or (self.hi_open and v == self.hi))

    def _reachable(self, text: str) -> bool:
        """Some completion of `text` is within the bounds. Its digits so far limit the magnitudes it can reach
        to spans [a, b): "12" to 12 (and 12.x), 120-129.x, 1200-1299.x, ...; "12.3" to [12.3, 12.4)."""
        if text == "":  # either sign
            return self._reach(True, "") or self._reach(False, "")
        return self._reach(text.startswith("-"), text.lstrip("-"))

    def _reach(self, negative: bool, body: str) -> bool:
        # the bounds on the magnitude m of a number of this sign (negative: lo <= -m <= hi)
        if negative:
            lo, lo_open = (-self.hi, self.hi_open) if self.hi is not None else (None, False)
            hi, hi_open = (-self.lo, self.lo_open) if self.lo is not None else (None, False)
        else:
            lo, lo_open, hi, hi_open = self.lo, self.lo_open, self.hi, self.hi_open
        if lo is None or lo < 0 or (negative and lo == 0):  # (no "-0": a negative sign is for a number < 0)
            lo, lo_open = Fraction(0), negative
        if hi is not None and hi < 0:
            return False
        if body == "":
            spans = [(Fraction(0), None)]
        elif "." in body:
            whole, frac = body.split(".")
            a = Fraction(f"{whole}.{frac}" if frac else whole)
            spans = [(a, a + Fraction(1, 10 ** len(frac)))]
        elif body == "0":
            spans = [(Fraction(0), Fraction(1))]
        else:
            d = int(body)
            if hi is None:
                return True  # longer and longer: past any least value
            spans, scale = [], 1
            while d * scale <= hi:
                spans.append((Fraction(d * scale), Fraction((d + 1) * scale)))
                scale *= 10
        return any(self._meets(a, b, lo, lo_open, hi, hi_open) for a, b in spans)

    def _meets(self, a, b, lo, lo_open, hi, hi_open) -> bool:
        """Some number of [a, b) (b None: no end; integers only, for an integer node) is within the bounds."""
        if self.integer:  # the least and the greatest integer of [a, b) within the bounds
            first = max(a, math.floor(lo) + 1 if lo_open else math.ceil(lo))
            ends = [b - 1] if b is not None else []
            if hi is not None:
                ends.append(math.ceil(hi) - 1 if hi_open else math.floor(hi))
            return not ends or first <= min(ends)
        low, low_closed = (a, True) if a > lo else (lo, not lo_open) if a < lo else (a, not lo_open)
        if b is None and hi is None:
            return True
        if b is None or (hi is not None and hi < b):
            high, high_closed = hi, not hi_open
        else:
            high, high_closed = b, False
        return low < high or (low == high and low_closed and high_closed)
