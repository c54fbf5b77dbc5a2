"""argparse types that check a flag where it is parsed and say what was expected and what was found
(shared by the CLI, `python -m dsv3ref`, and the converter, `python -m dsv3ref.convert`)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [low, high) (no upper bound when high is None)."""
    span = f">= {low}" if high is None else f"in [{low}, {high})"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {span}, found {text!r}") from None
        if value < low or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"expected an integer {span}, found {value}")
        return value
    return parse


def number(low: float = 0.0, *, open_low: bool = False, high: float | None = None) -> Callable[[str], float]:
    """argparse type: a finite number >= low (> low with open_low), <= high."""
    span = f"{'>' if open_low else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a finite number {span}, found {text!r}") from None
        if not (math.isfinite(value) and (value > low if open_low else value >= low)
                and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"expected a finite number {span}, found {text}")
        return value
    return parse
