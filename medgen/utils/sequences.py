"""One helper for "a number or one value per axis" arguments (tile sizes, margins, spacings).

MONAI's :func:`monai.utils.ensure_tuple_rep` does the repetition; this adds the error message that
names the argument, and refuses booleans and strings, which ``ensure_tuple_rep`` would accept.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from monai.utils import ensure_tuple_rep

__all__ = ["per_axis"]


def per_axis(value: Any, n: int, name: str = "value") -> tuple:
    """``value`` repeated ``n`` times if it is a number, else ``tuple(value)`` of length ``n``.

    Args:
        value: A number (int, float, Fraction) or a sequence of ``n`` of them.
        n: Number of axes.
        name: The argument's name, for the error message.

    Raises:
        ValueError: ``value`` is a bool or a string, or a sequence of another length.
    """
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name} must be a number or a sequence of {n}, got {value!r}")
    if isinstance(value, (int, float, Fraction)):
        return (value,) * n
    if not isinstance(value, Sequence) and not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a number or a sequence of {n}, got {value!r}")
    values = tuple(value)
    if len(values) != n:
        raise ValueError(f"{name} must be a number or a sequence of {n}, got {value!r}")
    return ensure_tuple_rep(values, n)
