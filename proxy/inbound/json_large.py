"""The top-level ``model`` of a JSON body over 1 MiB, found by a structural scan.

Larger bodies are nearly always one or two base64 blobs (images, audio).
Decoding them to text and scanning every character, as json.loads must,
costs ~2 ns/byte and a second copy of the body; the structural scan here
jumps from quote to quote with bytes.find (memchr) and keeps no copy.
"""

from __future__ import annotations

import json.decoder
import re
from collections.abc import Callable
from typing import Any

from .model import (
    CAP_KEYS,
    FoundModel,
    ModelAbsent,
    ambiguous_model,
    invalid_json,
    missing_model,
    output_cap,
)

__all__ = ["EXACT_LIMIT", "TooManySteps", "find_structural"]

# The standard library's C string decoder, as json_model.py uses it.
_scan_string: Callable[[str, int, bool], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]

# Bodies over this many bytes take the structural scan (json_model.py the rest).
EXACT_LIMIT = 1 << 20
# A body of many small values would cost the structural scan one Python step
# each; past this many steps the exact C scan is faster, so we switch to it.
_STRUCTURAL_STEPS = 4096

_B_WS = re.compile(rb"[ \t\n\r]*")
_B_STRUCT = re.compile(rb'["\[\]{}]')
_B_PRIMITIVE = re.compile(
    rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null|NaN|-?Infinity"
)
_QUOTE, _BACKSLASH = 0x22, 0x5C
_CLOSER = {0x5B: 0x5D, 0x7B: 0x7D}


class TooManySteps(Exception):
    """The body is made of many small values: the exact C scan is the faster way."""


def _string_end(body: bytes | bytearray, pos: int) -> int:
    """Index after the string whose opening quote is at ``pos``."""
    i = pos + 1
    while True:
        j = body.find(b'"', i)
        if j < 0:
            raise invalid_json(f"unterminated string starting at byte {pos}")
        k = j - 1
        while body[k] == _BACKSLASH:
            k -= 1
        if (j - 1 - k) % 2 == 0:  # an even run of backslashes: the quote is real
            return j + 1
        i = j + 1


def _value_end(body: bytes | bytearray, pos: int, budget: list[int]) -> int:
    """Index after the value at ``pos``: strings and brackets are checked, not contents."""
    if pos >= len(body):
        raise invalid_json(f"expected a value at byte {pos}")
    first = body[pos]
    if first == _QUOTE:
        return _string_end(body, pos)
    closer = _CLOSER.get(first)
    if closer is None:
        m = _B_PRIMITIVE.match(body, pos)
        if m is None:
            raise invalid_json(f"expected a value at byte {pos}")
        return m.end()
    stack = [closer]
    i = pos + 1
    search = _B_STRUCT.search
    while stack:
        budget[0] -= 1
        if budget[0] < 0:
            raise TooManySteps
        m = search(body, i)
        if m is None:
            raise invalid_json(f"unbalanced brackets from byte {pos}")
        at = m.start()
        ch = body[at]
        if ch == _QUOTE:
            i = _string_end(body, at)
        elif ch in _CLOSER:
            stack.append(_CLOSER[ch])
            i = at + 1
        elif stack.pop() != ch:
            raise invalid_json(f"mismatched bracket at byte {at}")
        else:
            i = at + 1
    return i


def _ws_end(body: bytes | bytearray, pos: int) -> int:
    m = _B_WS.match(body, pos)
    return pos if m is None else m.end()


def _decode_string(body: bytes | bytearray, start: int, end: int) -> str:
    try:
        value, _ = _scan_string(
            body[start + 1 : end].decode("utf-8", "surrogatepass") + '"', 0, True
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise invalid_json(str(exc)) from None
    return value


def find_structural(body: bytes | bytearray, with_cap: bool = False) -> FoundModel:
    """The top-level walk of :func:`find_json_model` on UTF-8 bytes, for large bodies.

    Top-level keys and the model's value are decoded exactly as json.loads
    would; other values are only checked for terminated strings and balanced
    brackets (the upstream validates the rest). Raises TooManySteps when the
    body turns out to be made of many small values.
    """
    n = len(body)
    budget = [_STRUCTURAL_STEPS]
    pos = _ws_end(body, 0)
    if pos >= n or body[pos] != 0x7B:
        raise TooManySteps  # not an object: let the exact scan word the error
    pos = _ws_end(body, pos + 1)
    found: FoundModel | None = None
    missing = False
    caps: list[tuple[str, Any]] = []  # the cap pairs met, when with_cap
    if pos < n and body[pos] == 0x7D:
        pos += 1
    else:
        while True:
            if pos >= n or body[pos] != _QUOTE:
                raise invalid_json(f"expected a property name at byte {pos}")
            key_end = _string_end(body, pos)
            key = _decode_string(body, pos, key_end)
            pos = _ws_end(body, key_end)
            if pos >= n or body[pos] != 0x3A:
                raise invalid_json(f"expected ':' at byte {pos}")
            pos = _ws_end(body, pos + 1)
            value_start = pos
            pos = _value_end(body, pos, budget)
            if key == "model":
                if found is not None or missing:
                    raise ambiguous_model()
                if body[value_start] == _QUOTE:
                    found = FoundModel(
                        _decode_string(body, value_start, pos), value_start, pos, True
                    )
                else:
                    missing = True
            elif with_cap and key in CAP_KEYS:
                caps.append((key, _whole_number(body, value_start, pos)))
            pos = _ws_end(body, pos)
            if pos < n and body[pos] == 0x2C:
                pos = _ws_end(body, pos + 1)
                continue
            if pos < n and body[pos] == 0x7D:
                pos += 1
                break
            raise invalid_json(f"expected ',' or '}}' at byte {pos}")
    if _ws_end(body, pos) != n:
        raise invalid_json(f"extra data at byte {pos}")
    if missing:
        raise missing_model()
    if found is None:
        raise ModelAbsent()
    return found._replace(output_cap=output_cap(caps)) if caps else found


_B_INTEGER = re.compile(rb"-?(?:0|[1-9][0-9]*)")


def _whole_number(body: bytes | bytearray, start: int, end: int) -> int | None:
    """The value between ``start`` and ``end`` as json.loads would give it, if it
    is an integer (the structural scan does not decode values)."""
    if _B_INTEGER.fullmatch(body, start, end) is None:
        return None
    return int(body[start:end])
