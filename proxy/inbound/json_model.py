"""The top-level ``model`` of a JSON body, found without parsing the body.

:func:`find_json_model` walks the top-level object only. Keys are
decoded with the standard library's C ``scanstring`` (so ``"\\u006dodel"`` is
``model``, as the JSON standard says) and each value is consumed by the C
scanner ``json.loads`` itself uses, so the body is validated exactly as
``json.loads`` would validate it, yet no Python loop runs over anything but
the top-level keys. Two top-level ``model`` keys are refused as ambiguous: a
parser that keeps the first and one that keeps the last would disagree about
where the request goes (README, "One parse decides").

Most bodies take a shorter road to the same answer (:func:`_find_in_one_scan`):
one C scan of the whole body yields its top-level pairs, and the model's
offsets are then found by stepping over the few top-level values beside it.
Whatever that road does not handle goes the long way (:func:`_find_exact`),
which also words every error, so both give the same answers. Bodies over
1 MiB take the structural scan of json_large.py.
"""

from __future__ import annotations

import json
import json.decoder
import re
from collections.abc import Callable
from typing import Any

from .json_large import EXACT_LIMIT, TooManySteps, find_structural
from .model import (
    CAP_KEYS,
    FoundModel,
    ModelAbsent,
    ambiguous_model,
    invalid_json,
    missing_model,
    output_cap,
)

__all__ = ["find_json_model", "scan_member", "skip_whitespace"]

# The standard library's own scanner and string decoder (C-accelerated), so the
# model finder accepts and rejects exactly what json.loads does.
_DECODER = json.JSONDecoder()
_scan_value: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_scan_string: Callable[[str, int, bool], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_skip_ws: Callable[[str, int], re.Match[str]] = json.decoder.WHITESPACE.match  # type: ignore[attr-defined]
skip_whitespace = _skip_ws
# The same scanner, but objects come out as tuples of (key, value) pairs, in
# body order with repeated keys kept: the top level's duplicates stay visible.
_scan_pairs: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder(
    object_pairs_hook=tuple
).scan_once  # type: ignore[attr-defined]


def find_json_model(
    body: bytes | bytearray, exact_limit: int | None = None, with_cap: bool = False
) -> FoundModel:
    """Return the top-level ``model`` of a JSON object body (``with_cap``: and
    the request's output cap, read from the same walk's top-level pairs, never
    a second parse; README, "Token budgets").

    Raises :class:`InvalidRequest` with code ``invalid_json`` when ``json.loads``
    would reject the body, :class:`ModelAbsent` (``missing_model``) when the
    object has no top-level ``model``, ``missing_model`` when it is not a
    string or the body is not an object, and ``ambiguous_model`` when there
    are two.

    Bodies over ``exact_limit`` bytes (1 MiB) are UTF-8 checked structurally
    instead (see :func:`find_structural`): the same answer for every valid
    JSON object, at memchr speed for the base64 blobs that make bodies large.
    """
    if len(body) > (EXACT_LIMIT if exact_limit is None else exact_limit):
        encoding = json.detect_encoding(body)
        if encoding == "utf-8":
            try:
                return find_structural(body, with_cap)
            except TooManySteps:
                pass  # many small values: the C scanner below is faster
    elif len(body) > 1 and body[0] in _OBJECT_OPENING and body[1]:
        # Two non-NUL bytes, the first "{" or whitespace: what
        # json.detect_encoding calls UTF-8 (BOMs and UTF-16/32 start otherwise).
        found = _find_in_one_scan(body, with_cap)
        if found is not None:
            return found
    return _find_exact(body, with_cap)


_OBJECT_OPENING = b"{ \t\n\r"
_WS = frozenset(" \t\n\r")  # JSON's whitespace (RFC 8259 §2), as json.decoder.WHITESPACE
_CONTAINERS = frozenset((tuple, list))  # objects and arrays, as _scan_pairs returns them
# "model" may also be a nested key or a string value after the top-level key:
# past this many candidates, stepping from the start is the cheaper way.
_MAX_CANDIDATES = 4
# Up to this many characters, searching the whole body for a second "model"
# (~1.5 ns a character) costs less than stepping over the values after it.
_SEARCH_LIMIT = 4096


def _find_in_one_scan(body: bytes | bytearray, with_cap: bool = False) -> FoundModel | None:
    """:func:`find_json_model` for a UTF-8 body, or None: take the long way.

    :func:`_scan_pairs` validates the body exactly as ``json.loads`` does and
    gives the top-level pairs, so whether ``model`` is there, once, as a
    string, is known without a Python step per key. Only its offsets are left
    to find, by stepping over the top-level values on the cheaper side of it
    (:func:`_offsets_after`, :func:`_offsets_before`). Returns None for
    anything invalid or not an object: the long way words the error.
    """
    try:
        text = body.decode("utf-8", "surrogatepass")
        pos = 0 if text[0] == "{" else _skip_ws(text, 0).end()
        if text[pos] != "{":
            return None
        pairs, end = _scan_pairs(text, pos)
    except (UnicodeDecodeError, IndexError, StopIteration, ValueError, RecursionError):
        return None
    n = len(text)
    if end != n and _skip_ws(text, end).end() != n:
        return None  # extra data: let the long way word it
    index = -1
    for i, pair in enumerate(pairs):
        if pair[0] == "model":
            if index >= 0:
                raise ambiguous_model()
            index = i
    if index < 0:
        raise ModelAbsent()
    model = pairs[index][1]
    if type(model) is not str:  # json gives str exactly, never a subclass
        raise missing_model()
    following = len(pairs) - index - 1
    if index == 0:
        if text.startswith('"model":"', pos + 1):  # compact JSON: nothing to step over
            start = pos + 9
            stop = _scan_string(text, pos + 10, True)[1]
        else:
            start, stop = _offsets_after(text, pos, 0)
    elif following and not any(type(value) in _CONTAINERS for _, value in pairs[:index]):
        start, stop = _offsets_after(text, pos, index)  # steps over scalars only
    else:
        span = _offsets_before(text, following, end)
        start, stop = _offsets_after(text, pos, index) if span is None else span
    if not text.isascii():  # O(1): CPython knows
        # Offsets in code points become byte offsets; encode the shorter side.
        width = len(text[start:stop].encode("utf-8", "surrogatepass"))
        if start <= n - stop:
            start = len(text[:start].encode("utf-8", "surrogatepass"))
            stop = start + width
        else:
            stop = len(body) - len(text[stop:].encode("utf-8", "surrogatepass"))
            start = stop - width
    if with_cap:
        return FoundModel(model, start, stop, True, "utf-8", output_cap(pairs))
    return FoundModel(model, start, stop, True)


def _past_ws(text: str, pos: int) -> int:
    """The index after the whitespace at ``pos``, within an object (text goes on).

    One space, as in ``json.dumps``' default ``": "`` and ``", "``, costs no
    regex match.
    """
    pos += 1
    return _skip_ws(text, pos).end() if text[pos] in _WS else pos


def _past_pair(text: str, pos: int) -> int:
    """The index after the value of the pair whose key opens at ``pos``."""
    _, pos = _scan_string(text, pos + 1, True)
    if text[pos] in _WS:
        pos = _past_ws(text, pos)
    pos += 1  # the colon
    if text[pos] in _WS:
        pos = _past_ws(text, pos)
    _, pos = _scan_value(text, pos)
    return pos


def _offsets_after(text: str, pos: int, index: int) -> tuple[int, int]:
    """Where the value of pair ``index`` of the valid object at ``pos`` sits.

    Steps from the opening brace over the pairs before it with the C scanner.
    """
    pos += 1
    for _ in range(index):
        if text[pos] in _WS:
            pos = _past_ws(text, pos)
        pos = _past_pair(text, pos)
        if text[pos] in _WS:
            pos = _past_ws(text, pos)
        pos += 1  # the comma
    if text[pos] in _WS:
        pos = _past_ws(text, pos)
    _, pos = _scan_string(text, pos + 1, True)
    if text[pos] in _WS:
        pos = _past_ws(text, pos)
    pos += 1
    if text[pos] in _WS:
        pos = _past_ws(text, pos)
    return pos, _scan_string(text, pos + 1, True)[1]


def _offsets_before(text: str, following: int, end: int) -> tuple[int, int] | None:
    """Where the top-level model value sits, found from the end of the object.

    ``end`` is one past the object's closing brace, ``following`` the number of
    pairs after the model. Candidates are the ``"model"`` strings nearest the
    end. In a small body without ``\\u006`` (how every escape of d, e, l, m or
    o begins) the key is spelled ``"model"``, so a sole candidate is the key.
    Otherwise a candidate is checked by stepping on from it: its last quote
    closes a string (it follows a letter,
    so it is not escaped), so the steps follow the body's real structure. The
    string it closes is the model key when a colon, a string value and
    ``following`` pairs lead exactly onto the closing brace: that makes it the
    top-level key in the model's place, which the scan decoded as "model". A
    string nested deeper meets its own container's closer first. None when no
    candidate passes.
    """
    at = text.rfind('"model"', 0, end)
    if at < 0:
        return None
    if (
        following  # else the check below is one step
        and len(text) <= _SEARCH_LIMIT
        and "\\u006" not in text
        and text.find('"model"') == at
    ):
        return _string_value_after(text, at)
    for _ in range(_MAX_CANDIDATES):
        span = _string_value_after(text, at)
        if span is not None and _pairs_then_brace(text, span[1], following, end):
            return span
        at = text.rfind('"model"', 0, at)
        if at < 0:
            return None
    return None


def _string_value_after(text: str, pos: int) -> tuple[int, int] | None:
    """The span of the string value after the candidate ``"model"`` at ``pos``, if
    the string it ends is a key and its value is a string."""
    pos += len('"model"')
    if text[pos] in _WS:
        pos = _past_ws(text, pos)
    if text[pos] != ":":
        return None  # a string value, not a key
    pos += 1
    if text[pos] in _WS:
        pos = _past_ws(text, pos)
    if text[pos] != '"':
        return None  # a nested key whose value is no string
    return pos, _scan_string(text, pos + 1, True)[1]


def _pairs_then_brace(text: str, pos: int, following: int, end: int) -> bool:
    """Whether ``following`` pairs and then the closing brace at ``end - 1`` come
    after the value that ends at ``pos``.

    The steps start at the end of a real string and the body is valid JSON, so
    each lands where the scanner's would: after a value comes a comma, or the
    closer of the value's container, where a nested candidate is refused.
    """
    for _ in range(following):
        if text[pos] in _WS:
            pos = _past_ws(text, pos)
        if text[pos] != ",":
            return False  # the candidate's object closes early: a nested one
        pos += 1
        if text[pos] in _WS:
            pos = _past_ws(text, pos)
        pos = _past_pair(text, pos)  # the next pair
    if text[pos] in _WS:
        pos = _past_ws(text, pos)
    return pos == end - 1


def _find_exact(body: bytes | bytearray, with_cap: bool = False) -> FoundModel:
    """The walk over the top-level object described in the module docstring."""
    try:
        encoding = json.detect_encoding(body)
        text = body.decode(encoding, "surrogatepass")
    except (UnicodeDecodeError, LookupError):
        raise invalid_json("not valid UTF-8/16/32 text") from None
    if text.startswith("\ufeff"):
        # json.loads refuses a BOM left in decoded text ("Unexpected UTF-8 BOM").
        raise invalid_json("unexpected byte order mark")
    n = len(text)
    pos = _skip_ws(text, 0).end()
    if pos >= n or text[pos] != "{":
        _check_is_json(text, pos)
        raise missing_model()
    pos = _skip_ws(text, pos + 1).end()
    found: tuple[str, int, int] | None = None
    caps: list[tuple[str, Any]] = []  # the cap pairs met, when with_cap
    if pos < n and text[pos] == "}":
        pos += 1
    else:
        while True:
            key, value, value_start, pos = scan_member(text, pos)
            if key == "model":
                if found is not None:
                    raise ambiguous_model()
                found = (value, value_start, pos) if isinstance(value, str) else ("", -1, -1)
            elif with_cap and key in CAP_KEYS:
                caps.append((key, value))
            pos = _skip_ws(text, pos).end()
            if pos < n and text[pos] == ",":
                pos = _skip_ws(text, pos + 1).end()
                continue
            if pos < n and text[pos] == "}":
                pos += 1
                break
            raise invalid_json(f"expected ',' or '}}' at character {pos}")
    if _skip_ws(text, pos).end() != n:
        raise invalid_json(f"extra data at character {pos}")
    if found is None:
        raise ModelAbsent()
    if found[1] < 0:
        raise missing_model()
    result = _in_bytes(body, text, encoding, found)
    return result._replace(output_cap=output_cap(caps)) if caps else result


def scan_member(text: str, pos: int) -> tuple[str, Any, int, int]:
    """The object member at ``pos``: its key, its value, where the value starts
    and the position after it; or the ``invalid_json`` error."""
    n = len(text)
    if pos >= n or text[pos] != '"':
        raise invalid_json(f"expected a property name at character {pos}")
    try:
        key, pos = _scan_string(text, pos + 1, True)
    except ValueError as exc:
        raise invalid_json(str(exc)) from None
    pos = _skip_ws(text, pos).end()
    if pos >= n or text[pos] != ":":
        raise invalid_json(f"expected ':' at character {pos}")
    pos = _skip_ws(text, pos + 1).end()
    value_start = pos
    try:
        value, pos = _scan_value(text, pos)
    except StopIteration:
        raise invalid_json(f"expected a value at character {pos}") from None
    except (ValueError, RecursionError) as exc:
        raise invalid_json(str(exc)) from None
    return key, value, value_start, pos


def _in_bytes(
    body: bytes | bytearray, text: str, encoding: str, found: tuple[str, int, int]
) -> FoundModel:
    """The model found at ``found``'s offsets in ``text`` (code points), with
    the offsets mapped to bytes of ``body``."""
    model, start, end = found
    if encoding == "utf-8":
        if text.isascii():
            return FoundModel(model, start, end, True)
        return FoundModel(
            model,
            len(text[:start].encode("utf-8", "surrogatepass")),
            len(text[:end].encode("utf-8", "surrogatepass")),
            True,
        )
    # Rare (UTF-16/32, or a UTF-8 BOM): offsets in code units are mapped to
    # bytes by encoding the prefix in the body's own encoding.
    bom = 0
    codec = encoding
    if encoding == "utf-8-sig":
        bom, codec = 3, "utf-8"
    elif encoding in ("utf-16", "utf-32"):
        # json.detect_encoding names these only when a BOM gives the byte order.
        width = 2 if encoding == "utf-16" else 4
        little = body[:width] in (b"\xff\xfe", b"\xff\xfe\x00\x00")
        bom, codec = width, f"{encoding}-{'le' if little else 'be'}"
    head = len(text[:start].encode(codec, "surrogatepass"))
    value = len(text[start:end].encode(codec, "surrogatepass"))
    return FoundModel(model, bom + head, bom + head + value, True, codec)


def _check_is_json(text: str, pos: int) -> None:
    """For a body that is not an object: invalid_json if json.loads refuses it."""
    try:
        _, end = _scan_value(text, pos)
    except StopIteration:
        raise invalid_json("the body is empty or not JSON") from None
    except (ValueError, RecursionError) as exc:
        raise invalid_json(str(exc)) from None
    if _skip_ws(text, end).end() != len(text):
        raise invalid_json(f"extra data at character {end}")
