"""Numbers in structured output: which texts a JSON Schema `number` or `integer` (with its bounds and its
`multipleOf`) allows, and which starts of them can still become one.

    adult = Num(integer=True, lo=Fraction(18), hi=Fraction(150))
    adult.prefix("17")   # False: 17 is too small, 170 to 179 too big
    adult.prefix("2")    # True: 20 to 29 fit (adult.whole("2") is False)
    adult.whole("150")   # True
    quarter = Num(step=Fraction(1, 4), hi=Fraction(1))
    quarter.prefix("0.3")  # False: no multiple of 0.25 in [0.3, 0.4)

Bounds and steps are compared exactly, as fractions (never floats). A start is allowed while some number that
continues it is within the bounds (and a multiple of the step): its digits so far limit the magnitudes it can reach
to spans, "12" to 12 (and 12.x), 120-129.x, 1200-1299.x, ..., "12.3" to [12.3, 12.4). A bounded number is written
without an exponent and never as -0, and a bounded `number` with at most `DIGITS` significant digits.

`multipleOf` counts exactly, as JSON Schema means it: 0.3 is a multiple of 0.1 (a validator that divides floats,
as Python's jsonschema does, says it is not). The integers that are multiples of 2.5 are those of 5: an integer
node's step is the numerator of its multipleOf (`schema_keywords.number`).
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
MAX_STEP_DECIMALS = 9
"""Most decimal places the multiples of a `number`'s multipleOf may need (0.000000001 at the finest): so that its
multiples keep 6 integer digits within DIGITS."""


def decimals(step: Fraction) -> int:
    """Decimal places of `step`, a fraction whose denominator divides a power of ten (as a JSON number's does)."""
    n = 0
    while (step * 10**n).denominator != 1:
        n += 1
    return n


@dataclass(eq=False)
class Num:
    integer: bool = False
    lo: Fraction | None = None  # the least value allowed (None: no bound), exact
    hi: Fraction | None = None
    lo_open: bool = False  # the bound itself is not allowed (exclusiveMinimum)
    hi_open: bool = False
    step: Fraction | None = None  # allowed: the multiples of this (None: any)

    @property
    def bounded(self) -> bool:
        return self.lo is not None or self.hi is not None or self.step is not None

    @property
    def _places(self) -> int:
        """Decimal places the multiples of the step need (0 without a step)."""
        return decimals(self.step) if self.step is not None and not self.integer else 0

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
        if not self.integer:
            body = text.lstrip("-")
            if len(body.replace(".", "").lstrip("0")) > DIGITS:
                return False
            if len(body.split(".")[0].lstrip("0")) > DIGITS - self._places:  # a multiple must fit in DIGITS
                return False
        return self._reachable(text)

    def whole(self, text: str) -> bool:
        """`text` (a start that `prefix` allows) is a whole number this node allows."""
        if not text[-1:].isdigit():
            return False
        if not self.bounded:
            return True
        value = Fraction(text)
        if self.step is not None and (value / self.step).denominator != 1:
            return False
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
            if hi is None and (self.integer or self.step is None):
                return True  # longer and longer: past any least value, and spans longer than any step
            most = 10 ** (DIGITS - self._places)  # (a number's integer part within DIGITS, `prefix`)
            spans, scale = [], 1
            while (d * scale <= hi) if hi is not None else (d * scale < most):
                spans.append((Fraction(d * scale), Fraction((d + 1) * scale)))
                scale *= 10
        return any(self._meets(a, b, lo, lo_open, hi, hi_open) for a, b in spans)

    def _meets(self, a, b, lo, lo_open, hi, hi_open) -> bool:
        """Some number of [a, b) (b None: no end; integers only, for an integer node; multiples of the step only,
        with one) is within the bounds."""
        if self.integer or self.step is not None:  # the least multiple in [a, b) and the bounds: within them?
            step = self.step if self.step is not None else Fraction(1)
            first = max(_multiple_from(a, step, False), _multiple_from(lo, step, lo_open))
            if b is not None and first >= b:
                return False
            return hi is None or first < hi or (first == hi and not hi_open)
        low, low_closed = (a, True) if a > lo else (lo, not lo_open) if a < lo else (a, not lo_open)
        if b is None and hi is None:
            return True
        if b is None or (hi is not None and hi < b):
            high, high_closed = hi, not hi_open
        else:
            high, high_closed = b, False
        return low < high or (low == high and low_closed and high_closed)


def _multiple_from(x: Fraction, step: Fraction, strictly: bool) -> Fraction:
    """The least multiple of `step` at or above `x` (above, when `strictly`)."""
    k = math.ceil(x / step)
    if strictly and k * step == x:
        k += 1
    return k * step
