"""Text that PostgreSQL can store. `text` and `jsonb` reject NUL (U+0000), and a lone surrogate
(U+D800..U+DFFF without its pair) cannot be encoded as UTF-8 at all. User input with either is
refused with a 400 (app/http/validation.py); model and tool output cannot be refused (the
answer is already paid for), so every string of it passes `storable()` before it goes
anywhere (live parts, history, last_error, titles, summaries): each such character becomes
U+FFFD and the rest of the answer is kept.

And JSON text, read and written fast: `json_loads` and `json_dumps` use orjson (a tenth of the
standard library's cost: they run for every part flushed and every stream frame) and fall back
to the standard library for what orjson cannot read or write exactly."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

REPLACEMENT = "\ufffd"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def is_storable(text: str) -> bool:
    if text.isascii():  # O(1) in CPython: a flag of the string; ASCII has no surrogates
        return "\x00" not in text
    return _UNSTORABLE.search(text) is None


def storable(text: str) -> str:
    """`text` with every NUL and lone surrogate replaced by U+FFFD (`text` itself, without a
    copy, in the usual case: this runs on every streamed delta, hence the ASCII fast path)."""
    if text.isascii():
        if "\x00" not in text:
            return text
    elif _UNSTORABLE.search(text) is None:
        return text
    return _UNSTORABLE.sub(REPLACEMENT, text)


def storable_json(value: Any) -> Any:
    """A JSON value (dicts, lists, strings, scalars) with every string and key `storable()`.
    Returns `value` itself when nothing needed replacing."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable(str(k)): storable_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable_json(item) for item in value]
    return value


# Integers beyond 64 bits: orjson reads them as floats (losing digits), the standard library
# exactly. Any such number has a run of at least 20 digits.
_LONG_DIGITS = re.compile(r"\d{20}")


def json_loads(text: str) -> Any:
    """JSON text from the database (jsonb, notification payloads) as Python values: orjson, a
    tenth of the standard library's cost, where it reads exactly what the standard library
    does; the standard library for what it does not (integers beyond 64 bits, numbers beyond
    a double)."""
    if _LONG_DIGITS.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


def json_dumps(data: Any) -> bytes:
    """Compact UTF-8 JSON, as `json.dumps(separators=(",", ":"), ensure_ascii=False)` writes
    it, by orjson (floats with an exponent are written the shortest way, `1e-7` for `1e-07`);
    the standard library for what orjson does not encode (integers beyond 64 bits, keys that
    are not strings)."""
    try:
        return orjson.dumps(data)
    except TypeError:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
