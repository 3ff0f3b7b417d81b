"""Argument checks shared by the pure-math modules: each raises `ValueError` naming the argument and its valid range."""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor


def all_finite(x: Tensor) -> bool:
    """Whether every element of ``x`` is finite. A finite sum proves it (NaN and ±Inf propagate into a sum), which
    costs one reduction instead of an element-wise test; only a non-finite sum (or an overflow) is checked element
    by element."""
    x = x.detach()
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def check_finite(name: str, x: Tensor) -> None:
    if not all_finite(x):
        raise ValueError(f"{name} contains NaN or Inf; pass finite values.")


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer; got {value!r}.")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer; got {value!r}.") from None
    if v < low or (high is not None and v > high):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {rng}; got {v}.")
    return v


def check_fraction(
    name: str, value: object, low: float, high: float, closed_low: bool, closed_high: bool, meaning: str
) -> float:
    bad = isinstance(value, (bool, str, bytes))
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        bad, v = True, math.nan
    ok_low = v >= low if closed_low else v > low
    ok_high = v <= high if closed_high else v < high
    if bad or not math.isfinite(v) or not (ok_low and ok_high):
        rng = ("[" if closed_low else "(") + f"{low:g}, {high:g}" + ("]" if closed_high else ")")
        raise ValueError(f"{name} ({meaning}) must be in {rng}; got {value!r}.")
    return v
