"""Argument checks shared by every layer of the package.

Each check returns the value normalized to a plain Python type (a NumPy
integer becomes an `int`, so configs stay JSON-serializable) or raises a
`ValueError` that names the argument, the allowed range and what it received.
Booleans are never accepted as numbers: `FeedForward(True)` is a mistake,
not a width of 1.
"""

import math
import numbers

import keras
import numpy as np


def _is_bool(value):
    return isinstance(value, (bool, np.bool_))


def _range_text(low, high, low_inclusive=True, high_inclusive=True):
    if low is not None and high is not None:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        return f"in {left}{low}, {high}{right}"
    if low is not None:
        return f"{'>=' if low_inclusive else '>'} {low}"
    if high is not None:
        return f"{'<=' if high_inclusive else '<'} {high}"
    return ""


def check_int(name, value, low=None, high=None):
    """An integer (Python or NumPy, not bool) in `[low, high]`, as an `int`."""
    ok = isinstance(value, numbers.Integral) and not _is_bool(value)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        raise ValueError(
            f"`{name}` must be an integer {_range_text(low, high)}. Received: {name}={value!r}"
        )
    return int(value)


def check_float(name, value, low=None, high=None, low_inclusive=True, high_inclusive=True):
    """A finite real number (not bool) within the bounds, as a `float`."""
    ok = isinstance(value, numbers.Real) and not _is_bool(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        bounds = _range_text(low, high, low_inclusive, high_inclusive)
        raise ValueError(f"`{name}` must be a number {bounds}. Received: {name}={value!r}")
    return float(value)


def check_positive(name, value):
    """A finite number > 0, as a `float`."""
    return check_float(name, value, low=0, low_inclusive=False)


def check_non_negative(name, value):
    """A finite number >= 0, as a `float`."""
    return check_float(name, value, low=0)


def check_rate(name, value):
    """A probability-like rate in `[0, 1)` (dropout, jitter), as a `float`."""
    return check_float(name, value, low=0, high=1, high_inclusive=False)


def check_bool(name, value):
    """A Python or NumPy bool, as a `bool`."""
    if not _is_bool(value):
        raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
    return bool(value)


def check_choice(name, value, choices):
    """One of `choices` (compared with `==`)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}. Received: {name}={value!r}")
    return value


def check_units(name, value, allow_empty=False):
    """Layer widths: an int >= 1 or a list of them, as a tuple of ints."""
    if isinstance(value, numbers.Integral) and not _is_bool(value):
        value = (value,)
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty):
        what = "a list" if allow_empty else "a non-empty list"
        raise ValueError(
            f"`{name}` must be a positive integer or {what} of positive integers. "
            f"Received: {name}={value!r}"
        )
    for units in value:
        if _is_bool(units) or not isinstance(units, numbers.Integral) or units < 1:
            raise ValueError(
                f"Every entry of `{name}` must be an integer >= 1. Received: {name}={value!r}"
            )
    return tuple(int(units) for units in value)


def check_float_dtype(name, dtype):
    """A floating dtype, standardized (`"float32"`, `"bfloat16"`, ...)."""
    try:
        standardized = keras.backend.standardize_dtype(dtype)
    except (ValueError, TypeError):
        standardized = None
    if standardized is None or not keras.backend.is_float_dtype(standardized):
        raise ValueError(f"`{name}` must be a floating dtype. Received: {name}={dtype!r}")
    return standardized


class renamed_arguments:
    """Reports errors of the checks inside under the caller's argument names.

    A layer that forwards its argument `router_jitter` to a router's `jitter`
    validates it once, in the router, and its users still read the name they
    typed: `with renamed_arguments(jitter="router_jitter"): TopKRouter(...)`.
    """

    def __init__(self, **names):
        self.names = names

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not ValueError:
            return False
        message = str(exc)
        for inner, outer in self.names.items():
            message = message.replace(f"`{inner}`", f"`{outer}`")
            message = message.replace(f" {inner}=", f" {outer}=")
        if message != str(exc):
            raise ValueError(message) from None
        return False


def is_per_stage(value):
    """Whether layer widths `value` are given per stage: a list holding a list."""
    return isinstance(value, (list, tuple)) and any(
        isinstance(spec, (list, tuple)) for spec in value
    )


def check_units_per_stage(name, value, num_stages):
    """Layer widths for each of `num_stages` stages, as a tuple of tuples of ints.

    `value` is either one spec for every stage (an int >= 1 or a list of
    them, as `check_units` takes) or a list of `num_stages` specs, one per
    stage, at least one of them itself a list: `[[64, 32], [32]]` gives the
    first stage two layers and the second one.
    """
    if not is_per_stage(value):
        return (check_units(name, value),) * num_stages
    if len(value) != num_stages:
        raise ValueError(
            f"`{name}` given per stage must have one entry per stage ({num_stages}), "
            f"each a positive integer or a non-empty list of them. Received: {name}={value!r}"
        )
    return tuple(check_units(f"{name}[{i}]", spec) for i, spec in enumerate(value))
