"""Find the ``model`` a request names, and rewrite it, without re-serialising the body.

JSON bodies: :func:`find_json_model` walks the top-level object only. Keys are
decoded with the standard library's C ``scanstring`` (so ``"\\u006dodel"`` is
``model``, as the JSON standard says) and each value is consumed by the C
scanner ``json.loads`` itself uses, so the body is validated exactly as
``json.loads`` would validate it, yet no Python loop runs over anything but
the top-level keys. Two top-level ``model`` keys are refused as ambiguous: a
parser that keeps the first and one that keeps the last would disagree about
where the request goes (README, "One parse decides").

Asked to (a token budget applies, README: Token budgets), the same walk also
reads the request's output cap: the largest whole-number top-level
``max_tokens``, ``max_completion_tokens`` or ``max_output_tokens``. Never a
second parse: the cap's values are among the top-level pairs already in hand.

Most bodies take a shorter road to the same answer (:func:`_find_in_one_scan`):
one C scan of the whole body yields its top-level pairs, and the model's
offsets are then found by stepping over the few top-level values beside it.
Whatever that road does not handle goes the long way, which also words every
error, so both give the same answers.

Multipart bodies: :func:`find_multipart_model` finds the ``model`` form field
by scanning part headers (RFC 7578), refusing two of them.

Rewrites (``rewrite_model``) splice new bytes in place of the old value; every
other byte of the body is kept as it came.
"""

from __future__ import annotations

import json
import json.decoder
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from ..errors import InvalidRequest

__all__ = [
    "FoundModel",
    "ModelAbsent",
    "MultipartModelScan",
    "find_json_model",
    "find_multipart_model",
    "multipart_boundary",
    "part_name",
    "rewrite_model",
]

# The standard library's own scanner and string decoder (C-accelerated), so the
# model finder accepts and rejects exactly what json.loads does.
_DECODER = json.JSONDecoder()
_scan_value: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_scan_string: Callable[[str, int, bool], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_skip_ws: Callable[[str, int], re.Match[str]] = json.decoder.WHITESPACE.match  # type: ignore[attr-defined]
# The same scanner, but objects come out as tuples of (key, value) pairs, in
# body order with repeated keys kept: the top level's duplicates stay visible.
_scan_pairs: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder(
    object_pairs_hook=tuple
).scan_once  # type: ignore[attr-defined]


class FoundModel(NamedTuple):
    """The model's value and where its encoded form sits in the body (byte offsets).

    A tuple, made once per request: a frozen dataclass costs twice as much
    to build."""

    model: str
    start: int  # first byte of the value as it is encoded in the body
    end: int  # one past its last byte
    # For JSON the value is replaced by a JSON string; for multipart by raw bytes.
    json_value: bool
    codec: str = "utf-8"  # how a replacement value is encoded (the body's own encoding)
    # The request's output cap, when asked for and present (JSON bodies only).
    output_cap: int | None = None


# A request's own bound on its output, by API: Chat Completions (max_tokens,
# and max_completion_tokens for reasoning models), Responses (max_output_tokens).
_CAP_KEYS = frozenset(("max_tokens", "max_completion_tokens", "max_output_tokens"))


def _output_cap(pairs: Iterable[tuple[str, Any]]) -> int | None:
    """The largest whole-number cap among ``pairs`` (key, decoded value).

    The largest, so a body naming two caps (or one twice, which parsers read
    differently) is never reserved for less than the upstream may produce.
    Anything else (null, a float, a string) is no cap.
    """
    cap: int | None = None
    for key, value in pairs:
        if key in _CAP_KEYS and type(value) is int and value >= 0:
            if cap is None or value > cap:
                cap = value
    return cap


_MISSING_MESSAGE = "you must provide a model parameter"


class ModelAbsent(InvalidRequest):
    """The body names no model at all: a JSON object without a top-level
    ``model`` key, or a form without a ``model`` field.

    Such a request may still be routed by its path (README, Endpoints); a
    ``model`` that is there but unusable (not a string, empty, not UTF-8) is
    :func:`_missing` and is refused whatever the routes say.
    """

    def __init__(self) -> None:
        super().__init__(_MISSING_MESSAGE, code="missing_model", param="model")


def _missing() -> InvalidRequest:
    return InvalidRequest(_MISSING_MESSAGE, code="missing_model", param="model")


def _invalid_json(detail: str) -> InvalidRequest:
    return InvalidRequest(
        f"We could not parse the JSON body of your request ({detail}). "
        "The OpenAI API expects a JSON payload.",
        code="invalid_json",
    )


def find_json_model(
    body: bytes | bytearray, exact_limit: int | None = None, output_cap: bool = False
) -> FoundModel:
    """Return the top-level ``model`` of a JSON object body (with ``output_cap``,
    also the request's output cap, see the module docstring).

    Raises :class:`InvalidRequest` with code ``invalid_json`` when ``json.loads``
    would reject the body, :class:`ModelAbsent` (``missing_model``) when the
    object has no top-level ``model``, ``missing_model`` when it is not a
    string or the body is not an object, and ``ambiguous_model`` when there
    are two.

    Bodies over ``exact_limit`` bytes (1 MiB) are UTF-8 checked structurally
    instead (see :func:`_find_structural`): the same answer for every valid
    JSON object, at memchr speed for the base64 blobs that make bodies large.
    """
    if len(body) > (EXACT_LIMIT if exact_limit is None else exact_limit):
        encoding = json.detect_encoding(body)
        if encoding == "utf-8":
            try:
                return _find_structural(body, output_cap)
            except _TooManySteps:
                pass  # many small values: the C scanner below is faster
    elif len(body) > 1 and body[0] in _OBJECT_OPENING and body[1]:
        # Two non-NUL bytes, the first "{" or whitespace: what
        # json.detect_encoding calls UTF-8 (BOMs and UTF-16/32 start otherwise).
        found = _find_in_one_scan(body, output_cap)
        if found is not None:
            return found
    return _find_exact(body, output_cap)


_OBJECT_OPENING = b"{ \t\n\r"
_WS = frozenset(" \t\n\r")  # JSON's whitespace (RFC 8259 §2), as json.decoder.WHITESPACE
_CONTAINERS = frozenset((tuple, list))  # objects and arrays, as _scan_pairs returns them
# "model" may also be a nested key or a string value after the top-level key:
# past this many candidates, stepping from the start is the cheaper way.
_MAX_CANDIDATES = 4
# Up to this many characters, searching the whole body for a second "model"
# (~1.5 ns a character) costs less than stepping over the values after it.
_SEARCH_LIMIT = 4096


def _find_in_one_scan(body: bytes | bytearray, output_cap: bool = False) -> FoundModel | None:
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
                raise _ambiguous()
            index = i
    if index < 0:
        raise ModelAbsent()
    model = pairs[index][1]
    if type(model) is not str:  # json gives str exactly, never a subclass
        raise _missing()
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
    if output_cap:
        return FoundModel(model, start, stop, True, "utf-8", _output_cap(pairs))
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


def _ambiguous() -> InvalidRequest:
    return InvalidRequest(
        "the request names 'model' more than once", code="ambiguous_model", param="model"
    )


def _find_exact(body: bytes | bytearray, output_cap: bool = False) -> FoundModel:
    """The walk over the top-level object described in the module docstring."""
    caps: list[tuple[str, Any]] = []  # the cap pairs met, when output_cap
    try:
        encoding = json.detect_encoding(body)
        text = body.decode(encoding, "surrogatepass")
    except (UnicodeDecodeError, LookupError):
        raise _invalid_json("not valid UTF-8/16/32 text") from None
    if text.startswith("\ufeff"):
        # json.loads refuses a BOM left in decoded text ("Unexpected UTF-8 BOM").
        raise _invalid_json("unexpected byte order mark")
    n = len(text)
    pos = _skip_ws(text, 0).end()
    if pos >= n or text[pos] != "{":
        _check_is_json(text, pos)
        raise _missing()
    pos = _skip_ws(text, pos + 1).end()
    found: tuple[str, int, int] | None = None
    if pos < n and text[pos] == "}":
        pos += 1
    else:
        while True:
            if pos >= n or text[pos] != '"':
                raise _invalid_json(f"expected a property name at character {pos}")
            try:
                key, pos = _scan_string(text, pos + 1, True)
            except ValueError as exc:
                raise _invalid_json(str(exc)) from None
            pos = _skip_ws(text, pos).end()
            if pos >= n or text[pos] != ":":
                raise _invalid_json(f"expected ':' at character {pos}")
            pos = _skip_ws(text, pos + 1).end()
            value_start = pos
            try:
                value, pos = _scan_value(text, pos)
            except StopIteration:
                raise _invalid_json(f"expected a value at character {pos}") from None
            except (ValueError, RecursionError) as exc:
                raise _invalid_json(str(exc)) from None
            if key == "model":
                if found is not None:
                    raise InvalidRequest(
                        "the request names 'model' more than once",
                        code="ambiguous_model",
                        param="model",
                    )
                found = (value, value_start, pos) if isinstance(value, str) else ("", -1, -1)
            elif output_cap and key in _CAP_KEYS:
                caps.append((key, value))
            pos = _skip_ws(text, pos).end()
            if pos < n and text[pos] == ",":
                pos = _skip_ws(text, pos + 1).end()
                continue
            if pos < n and text[pos] == "}":
                pos += 1
                break
            raise _invalid_json(f"expected ',' or '}}' at character {pos}")
    if _skip_ws(text, pos).end() != n:
        raise _invalid_json(f"extra data at character {pos}")
    if found is None:
        raise ModelAbsent()
    if found[1] < 0:
        raise _missing()
    model, start, end = found
    if encoding != "utf-8":
        # Rare (UTF-16/32, or a UTF-8 BOM): offsets in code units must be mapped
        # to bytes by encoding the prefix in the body's own encoding.
        result = _with_byte_offsets(body, text, encoding, model, start, end)
    elif text.isascii():
        result = FoundModel(model, start, end, True)
    else:
        result = FoundModel(
            model,
            len(text[:start].encode("utf-8", "surrogatepass")),
            len(text[:end].encode("utf-8", "surrogatepass")),
            True,
        )
    return result._replace(output_cap=_output_cap(caps)) if caps else result


def _with_byte_offsets(
    body: bytes | bytearray, text: str, encoding: str, model: str, start: int, end: int
) -> FoundModel:
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
        raise _invalid_json("the body is empty or not JSON") from None
    except (ValueError, RecursionError) as exc:
        raise _invalid_json(str(exc)) from None
    if _skip_ws(text, end).end() != len(text):
        raise _invalid_json(f"extra data at character {end}")


# Larger bodies are nearly always one or two base64 blobs (images, audio).
# Decoding them to text and scanning every character, as json.loads must,
# costs ~2 ns/byte and a second copy of the body; the structural scan below
# jumps from quote to quote with bytes.find (memchr) and keeps no copy.
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


class _TooManySteps(Exception):
    pass


def _string_end(body: bytes | bytearray, pos: int) -> int:
    """Index after the string whose opening quote is at ``pos``."""
    i = pos + 1
    while True:
        j = body.find(b'"', i)
        if j < 0:
            raise _invalid_json(f"unterminated string starting at byte {pos}")
        k = j - 1
        while body[k] == _BACKSLASH:
            k -= 1
        if (j - 1 - k) % 2 == 0:  # an even run of backslashes: the quote is real
            return j + 1
        i = j + 1


def _value_end(body: bytes | bytearray, pos: int, budget: list[int]) -> int:
    """Index after the value at ``pos``: strings and brackets are checked, not contents."""
    if pos >= len(body):
        raise _invalid_json(f"expected a value at byte {pos}")
    first = body[pos]
    if first == _QUOTE:
        return _string_end(body, pos)
    closer = _CLOSER.get(first)
    if closer is None:
        m = _B_PRIMITIVE.match(body, pos)
        if m is None:
            raise _invalid_json(f"expected a value at byte {pos}")
        return m.end()
    stack = [closer]
    i = pos + 1
    search = _B_STRUCT.search
    while stack:
        budget[0] -= 1
        if budget[0] < 0:
            raise _TooManySteps
        m = search(body, i)
        if m is None:
            raise _invalid_json(f"unbalanced brackets from byte {pos}")
        at = m.start()
        ch = body[at]
        if ch == _QUOTE:
            i = _string_end(body, at)
        elif ch in _CLOSER:
            stack.append(_CLOSER[ch])
            i = at + 1
        elif stack.pop() != ch:
            raise _invalid_json(f"mismatched bracket at byte {at}")
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
        raise _invalid_json(str(exc)) from None
    return value


def _find_structural(body: bytes | bytearray, output_cap: bool = False) -> FoundModel:
    """The top-level walk of :func:`find_json_model` on UTF-8 bytes, for large bodies.

    Top-level keys and the model's value are decoded exactly as json.loads
    would; other values are only checked for terminated strings and balanced
    brackets (the upstream validates the rest). Raises _TooManySteps when the
    body turns out to be made of many small values.
    """
    n = len(body)
    budget = [_STRUCTURAL_STEPS]
    pos = _ws_end(body, 0)
    if pos >= n or body[pos] != 0x7B:
        raise _TooManySteps  # not an object: let the exact scan word the error
    pos = _ws_end(body, pos + 1)
    found: FoundModel | None = None
    missing = False
    caps: list[tuple[str, Any]] = []  # the cap pairs met, when output_cap
    if pos < n and body[pos] == 0x7D:
        pos += 1
    else:
        while True:
            if pos >= n or body[pos] != _QUOTE:
                raise _invalid_json(f"expected a property name at byte {pos}")
            key_end = _string_end(body, pos)
            key = _decode_string(body, pos, key_end)
            pos = _ws_end(body, key_end)
            if pos >= n or body[pos] != 0x3A:
                raise _invalid_json(f"expected ':' at byte {pos}")
            pos = _ws_end(body, pos + 1)
            value_start = pos
            pos = _value_end(body, pos, budget)
            if key == "model":
                if found is not None or missing:
                    raise InvalidRequest(
                        "the request names 'model' more than once",
                        code="ambiguous_model",
                        param="model",
                    )
                if body[value_start] == _QUOTE:
                    found = FoundModel(
                        _decode_string(body, value_start, pos), value_start, pos, True
                    )
                else:
                    missing = True
            elif output_cap and key in _CAP_KEYS:
                caps.append((key, _whole_number(body, value_start, pos)))
            pos = _ws_end(body, pos)
            if pos < n and body[pos] == 0x2C:
                pos = _ws_end(body, pos + 1)
                continue
            if pos < n and body[pos] == 0x7D:
                pos += 1
                break
            raise _invalid_json(f"expected ',' or '}}' at byte {pos}")
    if _ws_end(body, pos) != n:
        raise _invalid_json(f"extra data at byte {pos}")
    if missing:
        raise _missing()
    if found is None:
        raise ModelAbsent()
    return found._replace(output_cap=_output_cap(caps)) if caps else found


_B_INTEGER = re.compile(rb"-?(?:0|[1-9][0-9]*)")


def _whole_number(body: bytes | bytearray, start: int, end: int) -> int | None:
    """The value between ``start`` and ``end`` as json.loads would give it, if it
    is an integer (the structural scan does not decode values)."""
    if _B_INTEGER.fullmatch(body, start, end) is None:
        return None
    return int(body[start:end])


def multipart_boundary(content_type_params: dict[str, str]) -> bytes:
    """The boundary parameter of a multipart/form-data Content-Type (RFC 2046 §5.1.1)."""
    boundary = content_type_params.get("boundary", "")
    if not 1 <= len(boundary) <= 70:
        raise InvalidRequest(
            "multipart/form-data needs a boundary of 1 to 70 characters",
            code="invalid_multipart",
        )
    return boundary.encode("latin-1", "replace")


def find_multipart_model(body: bytes | bytearray, boundary: bytes) -> FoundModel:
    """Return the value of the ``model`` form field of a complete multipart body.

    Raises :class:`ModelAbsent` when no part is named ``model``,
    ``missing_model`` when its value is empty or not UTF-8, ``ambiguous_model``
    when two are, and ``invalid_multipart`` when the framing is broken.
    """
    delimiter = b"--" + boundary
    # The first delimiter may open the body or follow a preamble line (RFC 2046).
    if body.startswith(delimiter):
        pos = 0
    else:
        pos = body.find(b"\r\n" + delimiter)
        if pos < 0:
            raise _bad_multipart("no boundary found")
        pos += 2
    marker = b"\r\n" + delimiter
    found: FoundModel | None = None
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            break  # close delimiter
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            raise _bad_multipart("unterminated boundary line")
        headers_end = body.find(b"\r\n\r\n", line_end)
        if headers_end < 0:
            if body.startswith(b"\r\n", line_end + 2):
                headers_end = line_end
            else:
                raise _bad_multipart("part headers never end")
        content_start = headers_end + 4
        next_delim = body.find(marker, content_start)
        if next_delim < 0:
            raise _bad_multipart("no closing boundary")
        if part_name(body[line_end + 2 : headers_end]) == "model":
            if found is not None:
                raise InvalidRequest(
                    "the form names 'model' more than once", code="ambiguous_model", param="model"
                )
            raw = body[content_start:next_delim]
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(
                    "the model field is not UTF-8 text", code="missing_model", param="model"
                ) from None
            found = FoundModel(value, content_start, next_delim, False)
        pos = next_delim + 2
    if found is None:
        raise ModelAbsent()
    if not found.model:
        raise _missing()
    return found


class MultipartModelScan:
    """:func:`find_multipart_model` for a body that is still arriving, in one pass.

    ``feed(buf)`` is called with the body read so far (``buf`` only grows). It
    returns the model field once a prefix of the body, closed right after some
    delimiter, holds it: the answer :func:`find_multipart_model` gives for the
    first such closed prefix, and the same errors, found at the same
    delimiter. Each part is looked at once, when the delimiter after it
    arrives, so a form whose model comes last costs time linear in its size,
    where re-parsing every closed prefix would be quadratic (docs/decisions.md,
    "The multipart model scan is linear").

    After a close delimiter, or a model value that is not UTF-8 text, it looks
    no further: the parse of the whole body gives the answer then.
    """

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"--" + boundary
        self._marker = b"\r\n--" + boundary
        self._searched = 0  # every delimiter starting before this offset has been handled
        self._part = -1  # where the open part's delimiter starts (-1: none seen yet)
        self._found: FoundModel | None = None
        # A boundary holding CR or LF could overlap its own delimiters: leave
        # such a form to the whole-body parse (header values cannot hold them).
        self._done = b"\r" in boundary or b"\n" in boundary

    def feed(self, buf: bytes | bytearray) -> FoundModel | None:
        """The model field, if the delimiters in ``buf`` close it, else None."""
        marker = self._marker
        while not self._done:
            at = buf.find(marker, self._searched)
            if at < 0:
                self._searched = max(self._searched, len(buf) - len(marker) + 1)
                return None
            self._searched = at + len(marker)
            if self._part < 0 and not buf.startswith(self._delimiter):
                self._part = at + 2  # the first delimiter, after a preamble
                continue
            self._part_ending(buf, max(self._part, 0), at)
            if self._found is not None and self._found.model:
                return self._found
        return None

    def _part_ending(self, buf: bytes | bytearray, start: int, end: int) -> None:
        """One pass of find_multipart_model's loop for the part whose delimiter is at
        ``start``, in the body closed at the delimiter at ``end``. Searches stop
        where that closed body would differ from ``buf``."""
        pos = start + len(self._delimiter)
        if buf.startswith(b"--", pos):
            self._done = True  # the close delimiter: the whole-body parse decides
            return
        line_end = buf.find(b"\r\n", pos)  # at most ``end``: the delimiter opens with CRLF
        headers_end = buf.find(b"\r\n\r\n", line_end, end + 2)
        if headers_end < 0:
            if buf.startswith(b"\r\n", line_end + 2):
                headers_end = line_end
            else:
                raise _bad_multipart("part headers never end")
        content_start = headers_end + 4
        if content_start > end:
            raise _bad_multipart("no closing boundary")
        if part_name(buf[line_end + 2 : headers_end]) == "model":
            if self._found is not None:
                raise InvalidRequest(
                    "the form names 'model' more than once", code="ambiguous_model", param="model"
                )
            try:
                value = buf[content_start:end].decode("utf-8")
            except UnicodeDecodeError:
                self._done = True
                return
            self._found = FoundModel(value, content_start, end, False)
        self._part = end + 2


# RFC 7578 §4.2 parameters: token=token or token="quoted" (no quoted-pair).
_TOKEN_CHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_DISPOSITION_PARAM = re.compile(rf'\s*;\s*({_TOKEN_CHARS})\s*=\s*("[^"\\]*"|{_TOKEN_CHARS})\s*')


def part_name(header_block: bytes | bytearray) -> str | None:
    """The form field name of a part, as every form parser would read it.

    A part whose name parsers could read differently is refused
    (``invalid_multipart``), not guessed at (docs/faults.md, "Form parts that
    parsers read differently"): two
    ``Content-Disposition`` headers (parsers differ on which wins), a parameter
    given twice or in RFC 2231 ``name*=`` form, a backslash (aiohttp unescapes
    ``"mod\\el"`` to ``model``, Python's email parser keeps the backslash).
    The ``model`` part must be a plain field: no ``filename``, no
    ``Content-Transfer-Encoding`` (deprecated by RFC 7578 §4.7, and a decoder
    honouring it would see another value).
    """
    disposition: bytes | bytearray | None = None
    encoded = False
    for line in header_block.split(b"\r\n"):
        field, sep, value = line.partition(b":")
        if not sep:
            continue
        field = field.strip().lower()
        if field == b"content-disposition":
            if disposition is not None:
                raise _bad_multipart("a part has two Content-Disposition headers")
            disposition = value
        elif field == b"content-transfer-encoding":
            encoded = True
    if disposition is None:
        return None
    # latin-1 maps bytes 1:1, so the structure is read exactly; names compare as ASCII.
    text = disposition.decode("latin-1").strip()
    kind, _, rest = text.partition(";")
    if "\\" in text or kind.strip().lower() != "form-data":
        raise _bad_multipart("a part's Content-Disposition is not plain form-data")
    params: dict[str, str] = {}
    pos = len(kind)
    while pos < len(text):
        m = _DISPOSITION_PARAM.match(text, pos)
        if m is None:
            raise _bad_multipart("a part's Content-Disposition cannot be read one way only")
        key, given = m.group(1).lower(), m.group(2)
        if key in params or key.endswith("*"):
            raise _bad_multipart("a part's Content-Disposition cannot be read one way only")
        params[key] = given[1:-1] if given.startswith('"') else given
        pos = m.end()
    name = params.get("name")
    if name == "model" and ("filename" in params or encoded):
        raise _bad_multipart("the model field must be a plain form field")
    return name


def _bad_multipart(detail: str) -> InvalidRequest:
    return InvalidRequest(
        f"The multipart/form-data body could not be parsed: {detail}.", code="invalid_multipart"
    )


def rewrite_model(body: bytes | bytearray, found: FoundModel, new_model: str) -> bytes:
    """Return ``body`` with only the model's value replaced by ``new_model``.

    One copy of the body: the join reads the two sides through memoryviews
    (slicing bytes or a bytearray would copy each side first).
    """
    if found.json_value:
        encoded = json.dumps(new_model).encode(found.codec)
    else:
        encoded = new_model.encode("utf-8")
    with memoryview(body) as view:
        return b"".join((view[: found.start], encoded, view[found.end :]))
