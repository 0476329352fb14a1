"""``prefix_store.storage.excerpt``: what a message may quote of a caller's string or integer."""

from __future__ import annotations

import ast

import pytest

from prefix_store.storage.excerpt import EXCERPT_CHARS, excerpt, excerpt_int


@pytest.mark.parametrize("text", ["", "summarize", "x" * EXCERPT_CHARS, "it's", "tab\there"])
def test_a_short_text_is_quoted_whole(text: str) -> None:
    assert excerpt(text) == repr(text)


def test_a_long_text_is_cut_and_its_length_told() -> None:
    shown = excerpt("a" * 60_000)
    assert shown == repr("a" * EXCERPT_CHARS) + "… (60000 characters)"


@pytest.mark.parametrize("char", ["\x00", "\x1b", "\u2028", "\U000e0001", "\\"])
def test_escapes_are_never_split_and_stay_within_the_limit(char: str) -> None:
    shown = excerpt(char * 5000)
    quoted, _, told = shown.partition("… ")
    assert told == "(5000 characters)"
    kept = ast.literal_eval(quoted)  # a whole quoted string: no escape was cut in half
    assert kept and kept == char * len(kept) and len(quoted) <= EXCERPT_CHARS + 2


@pytest.mark.parametrize("value", [0, 7, -12, 10**20 - 1, -(10**20 - 1)])
def test_an_integer_of_up_to_20_digits_is_written_out(value: int) -> None:
    assert excerpt_int(value) == str(value)


@pytest.mark.parametrize("digits", [21, 22, 301, 4300, 4301, 10_000])
def test_a_longer_integer_is_shown_by_its_leading_digits_and_its_length(digits: int) -> None:
    assert excerpt_int(10 ** (digits - 1)) == f"100000000000…({digits} digits)"
    assert excerpt_int(10**digits - 1) == f"999999999999…({digits} digits)"  # just under the next power
    assert excerpt_int(-(10 ** (digits - 1)) * 4) == f"-400000000000…({digits} digits)"
