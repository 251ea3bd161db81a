"""Text PostgreSQL can store (app/text.py): NUL and lone surrogates become U+FFFD, everything
else is kept, and clean text comes back as the same object (no copy per streamed delta)."""

from __future__ import annotations

from app.text import REPLACEMENT, is_storable, storable, storable_json


def test_clean_text_comes_back_as_it_is() -> None:
    for text in ["", "plain ascii", " w12@1732180000.123456", "héllo wörld", "emoji \U0001f600"]:
        assert storable(text) is text
        assert is_storable(text)


def test_nul_is_replaced_in_ascii_and_in_other_text() -> None:
    assert storable("a\x00b") == f"a{REPLACEMENT}b"
    assert storable("é\x00") == f"é{REPLACEMENT}"
    assert not is_storable("a\x00b")
    assert not is_storable("é\x00")


def test_lone_surrogates_are_replaced() -> None:
    assert storable("x\ud800y") == f"x{REPLACEMENT}y"
    assert storable("\udfff") == REPLACEMENT
    assert not is_storable("x\ud800y")


def test_json_values_are_cleaned_through_and_through() -> None:
    value = {"k\x00": ["a\ud800", {"n": 1, "s": "ok"}], "t": ("x\x00",)}
    assert storable_json(value) == {
        f"k{REPLACEMENT}": [f"a{REPLACEMENT}", {"n": 1, "s": "ok"}],
        "t": [f"x{REPLACEMENT}"],
    }
