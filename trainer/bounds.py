"""
Numeric ranges for the Config tables that trainer/config.py validate() reads (`bounds`). A module of its own, free
of torch, so that torch-free stages (the tokenizer) declare theirs too; trainer/config.py re-exports them.

    bounds = {"lr": at_least(0), "beta": above(0), "top_p": between(0, 1), "beta1": between(0, 1, high_open=True)}
"""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Bound:
    """A numeric range; None = unbounded on that side. NaN and infinity are outside every range: NaN compares
    false with everything, so without the check it would pass any bound, and no setting is meant to be infinite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value) -> bool:
        if not is_finite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


def at_least(low: float) -> Bound:
    return Bound(low)


def above(low: float) -> Bound:
    return Bound(low, low_open=True)


def between(low: float, high: float, *, high_open: bool = False) -> Bound:
    return Bound(low, high, high_open=high_open)


def is_finite(value) -> bool:
    """False for a NaN or infinite float; True for any int (math.isfinite would overflow on a huge one)."""
    return not isinstance(value, float) or math.isfinite(value)
