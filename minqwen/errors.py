"""The one exception type minqwen raises for bad input."""


class MinqwenError(Exception):
    """Something about the input (a file, a tensor, a config field, an argument) is wrong.

    The message always names the offending thing and, where it helps, what was expected,
    so that a newcomer can fix it without reading minqwen's source.
    """
