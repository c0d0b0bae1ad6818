"""`ConfigError` and the bounded text its messages quote.

Every error a user can cause in a run configuration is a `ConfigError` whose message is one line
naming the key path, the value seen and what would be valid; the CLI prints it and exits with
code 2. A message quotes what the user wrote, which may be a megabyte string or an integer of a
thousand digits: `short` and `clip` keep the line readable and cheap to build.
"""

from __future__ import annotations

import math
import reprlib


class ConfigError(ValueError):
    """A user error in a run configuration (one line, printed without a traceback)."""


PRINTABLE_INT = 10 ** 30  # larger ints are shown by their size


class _BoundedRepr(reprlib.Repr):
    """repr() for messages: reprlib cuts long strings, lists and mappings; an integer too long
    to print (Python 3.11+ refuses str() beyond 4300 digits) is shown by its size."""

    def repr_int(self, x: int, level: int) -> str:
        if abs(x) < PRINTABLE_INT:
            return repr(x)
        sign = "negative " if x < 0 else ""
        return f"<{sign}integer of ~{int(x.bit_length() * math.log10(2)) + 1} digits>"


_repr = _BoundedRepr()
_repr.maxstring = _repr.maxother = 60
short = _repr.repr  # repr() of a value for a message, at most ~60 characters


def clip(text: str, limit: int = 80) -> str:
    """`text` (a key or path, printed without quotes) cut to about `limit` characters."""
    return text if len(text) <= limit else f"{text[:limit - 20]}...{text[-15:]}"
