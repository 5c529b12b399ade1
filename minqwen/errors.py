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
    """An int (NumPy's too), not a bool: what a count, a token id or a seed must be."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_finite_number(value) -> bool:
    """A real number (as above) that is neither NaN nor ±inf, and as a float too: an int literal
    too long for a float (10**400) is refused here rather than overflowing later, far from its field."""
    try:
        return is_real_number(value) and np.isfinite(float(value))
    except OverflowError:
        return False
