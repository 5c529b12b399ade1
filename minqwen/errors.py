"""The one exception type minqwen raises for bad input, and the type checks its messages rest on."""

import numpy as np


class MinqwenError(Exception):
    """Something about the input (a file, a tensor, a config field, an argument) is wrong.

    The message always names the offending thing and, where it helps, what was expected,
    so that a newcomer can fix it without reading minqwen's source.
    """


def is_real_number(value) -> bool:
    """An int or float (NumPy's too), not a bool or a string: what a numeric option must be."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def is_whole_number(value) -> bool:
    """An int (NumPy's too), not a bool: what a count, a token id or a seed must be.

    (NumPy counts its timedelta64 among its integers; a duration is no token id.)"""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_, np.timedelta64))


def whole_number_array(value) -> np.ndarray | None:
    """``value`` (token ids, say) as a NumPy array of integers of any shape, or None where it is
    not one: text, a ragged nesting of lists, floats, bools, timedelta64, Python ints past int64.
    An empty sequence is an empty int64 array, whatever NumPy would make of it."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError):  # ragged lists; objects NumPy cannot take in
        return None
    if array.size == 0 and array.dtype.kind in "fiu":
        return array.astype(np.int64)
    return array if array.dtype.kind in "iu" else None


def is_finite_number(value) -> bool:
    """A real number (as above) that is neither NaN nor ±inf, and as a float too: an int literal
    too long for a float (10**400) is refused here rather than overflowing later, far from its field."""
    try:
        return is_real_number(value) and np.isfinite(float(value))
    except OverflowError:
        return False
