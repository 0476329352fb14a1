"""What an error message may quote of what a caller sent: a bounded excerpt, never the whole value.

A caller controls task ids, header values, field names, JSON numbers and file headers; a message that
echoes one whole can be made as large as the request (or, for a number past Python's 4300-digit limit of
``str(int)``, fail to be made at all). Imports nothing beyond the standard library, so the stores, the
formats and the API can all share it.
"""

from __future__ import annotations

import math

EXCERPT_CHARS = 64  # the most characters of a quoted value a message shows
_INT_DIGITS = 20  # integers with more digits are shown by their leading digits and their length
_LEADING_DIGITS = 12


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` quoted as ``repr`` quotes it, whole when it quotes to ``limit`` characters or fewer, else
    its beginning followed by ``… (N characters)``. Escapes are never split, and the quoted part stays
    near ``limit`` characters whatever the text holds."""
    kept, width = [], 0
    for char in text:
        char_width = len(repr(char)) - 2  # 1, or 4 to 10 for a character repr escapes
        if width + char_width > limit:
            return f"{''.join(kept)!r}… ({len(text)} characters)"
        kept.append(char)
        width += char_width
    return repr(text)


def excerpt_int(value: int) -> str:
    """``value`` in decimal when it has at most 20 digits, else its first 12 digits and its length
    (``123456789012…(301 digits)``); never fails, however large ``value`` is."""
    magnitude = abs(value)
    if magnitude < 10**_INT_DIGITS:
        return str(value)
    digits = _decimal_digits(magnitude)
    leading = magnitude // 10 ** (digits - _LEADING_DIGITS)
    return f"{'-' if value < 0 else ''}{leading}…({digits} digits)"


def _decimal_digits(magnitude: int) -> int:
    """How many decimal digits a positive integer has, without ``str`` (which refuses over 4300 digits)."""
    digits = int(math.log10(magnitude)) + 1  # a float estimate: off by one at most, near powers of ten
    if 10 ** (digits - 1) > magnitude:
        return digits - 1
    if 10**digits <= magnitude:
        return digits + 1
    return digits
