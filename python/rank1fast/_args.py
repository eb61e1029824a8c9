"""Argument checks: argparse types shared by the subcommands (``type=positive_int``: a bad
value is a usage error naming the value, before any work starts) and :func:`check_int` for the
Python API."""

from __future__ import annotations

import argparse
import operator
from typing import Any

from .errors import InvalidArgumentError


def check_int(name: str, value: Any, low: int, *, optional: bool = False) -> None:
    """Refuse ``value`` unless it is an integer (an ``int`` or anything ``operator.index``
    takes, such as ``numpy.int64``; not a bool) of at least ``low`` (or None when
    ``optional``).

    Raises:
        InvalidArgumentError: naming ``name``, the bound and the value.
    """
    if optional and value is None:
        return
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < low:
        either = " or None" if optional else ""
        raise InvalidArgumentError(
            f"{name} must be an integer of at least {low}{either}, got {value!r}"
        )


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value
