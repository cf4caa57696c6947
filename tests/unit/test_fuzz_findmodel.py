"""Property tests: the model finder agrees with ``json.loads`` and fails only with InvalidRequest.

Both scanning modes are checked: the exact one (small bodies) and the
structural one (bodies over ``EXACT_LIMIT``, forced here with
``exact_limit=0``). JSON text is produced by a serializer that varies what
JSON allows to vary (whitespace, ``\\uXXXX`` escapes in keys and values,
number spellings, key order, duplicate keys), so "model" also arrives as
``"\\u006dodel"`` and friends.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.inbound.json_model import _find_exact, find_json_model
from proxy.inbound.model import FoundModel, ModelAbsent, rewrite_model
from proxy.inbound.multipart_model import find_multipart_model

MODES = pytest.mark.parametrize("exact_limit", [None, 0], ids=["exact", "structural"])
# OAIMUX_FUZZ_EXAMPLES=5000 for a long run; the suite's default keeps it quick.
FUZZ = settings(
    max_examples=int(os.environ.get("OAIMUX_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
models = st.text(min_size=0, max_size=30)
_SPACES = ["", " ", "\n", "\t", "\r\n  ", "  "]


def ws(rnd: random.Random) -> str:
    return rnd.choice(_SPACES)


def json_text(value: Any, rnd: random.Random) -> str:
    """``value`` as JSON text, spelled in one of the many ways JSON permits."""
    if isinstance(value, str):
        return json_string(value, rnd)
    if isinstance(value, dict):
        return json_object(list(value.items()), rnd)
    if isinstance(value, list):
        items = [json_text(v, rnd) for v in value]
        return "[" + ws(rnd) + ("," + ws(rnd)).join(items) + ws(rnd) + "]"
    if isinstance(value, float) and rnd.random() < 0.5:
        text = repr(value)
        return text if "e" in text else f"{text}E0"
    return json.dumps(value)


def json_string(text: str, rnd: random.Random) -> str:
    escape_rate = rnd.choice([0.0, 0.1, 0.5, 1.0])
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\' or code < 0x20 or 0xD800 <= code <= 0xDFFF or rnd.random() < escape_rate:
            if code > 0xFFFF:
                hi, lo = divmod(code - 0x10000, 0x400)
                out.append(f"\\u{0xD800 + hi:04x}\\u{0xDC00 + lo:04X}")
            else:
                out.append(f"\\u{code:04x}" if rnd.random() < 0.5 else f"\\u{code:04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def json_object(pairs: list[tuple[str, Any]], rnd: random.Random) -> str:
    parts = [
        ws(rnd) + json_string(k, rnd) + ws(rnd) + ":" + ws(rnd) + json_text(v, rnd) + ws(rnd)
        for k, v in pairs
    ]
    return "{" + ws(rnd) + ",".join(parts) + "}" if parts else "{" + ws(rnd) + "}"


ENCODINGS = ["utf-8"] * 4 + ["utf-16-le", "utf-16-be", "utf-8-sig", "utf-32"]


@st.composite
def request_bodies(
    draw: st.DrawFn, model_count: int | None = None, string_model: bool = False
) -> tuple[bytes, list[tuple[str, Any]]]:
    """A JSON object body (UTF-8 or another JSON encoding) and its key/value pairs in order."""
    pairs = draw(st.lists(st.tuples(st.text(max_size=8), values), max_size=5))
    pairs = [(k, v) for k, v in pairs if k != "model"]
    count = draw(st.integers(0, 2)) if model_count is None else model_count
    for _ in range(count):
        model: Any = draw(models if string_model else models | values)
        pairs.insert(draw(st.integers(0, len(pairs))), ("model", model))
    rnd = draw(st.randoms(use_true_random=False))
    text = ws(rnd) + json_object(pairs, rnd) + ws(rnd)
    encoding = draw(st.sampled_from(ENCODINGS))
    return text.encode(encoding, "surrogatepass"), pairs


def model_keys(pairs: list[tuple[str, Any]]) -> list[Any]:
    return [v for k, v in pairs if k == "model"]


@MODES
@FUZZ
@given(request_bodies())
@example((b'{"\\u006dodel": "gpt-4o"}', [("model", "gpt-4o")]))
@example((b'{"model": "a", "\\u006Dodel": "b"}', [("model", "a"), ("model", "b")]))
def test_agrees_with_json_loads(
    exact_limit: int | None, case: tuple[bytes, list[tuple[str, Any]]]
) -> None:
    body, pairs = case
    assert json.loads(body) == dict(pairs)  # the generator makes valid JSON
    found_models = model_keys(pairs)
    try:
        found = find_json_model(body, exact_limit=exact_limit)
    except InvalidRequest as err:
        if len(found_models) > 1:
            assert err.code == "ambiguous_model"
        else:
            assert err.code == "missing_model", err.message
            assert not found_models or not isinstance(found_models[0], str)
            # Only a model that is not there at all may be routed by path.
            assert isinstance(err, ModelAbsent) == (not found_models)
        return
    assert len(found_models) == 1 and isinstance(found_models[0], str)
    assert found.model == found_models[0] == json.loads(body)["model"]
    # The offsets point at exactly the model's encoded value.
    codec = found.codec
    assert json.loads(body[found.start : found.end].decode(codec, "surrogatepass")) == found.model


@MODES
@FUZZ
@given(request_bodies(model_count=1, string_model=True), models)
def test_rewrite_changes_only_the_model(
    exact_limit: int | None, case: tuple[bytes, list[tuple[str, Any]]], new_model: str
) -> None:
    body, pairs = case
    found = find_json_model(body, exact_limit=exact_limit)
    out = rewrite_model(body, found, new_model)
    assert json.loads(out) == {**json.loads(body), "model": new_model}
    # Every byte outside the value is the client's own.
    assert out[: found.start] == body[: found.start]
    assert out[len(out) - (len(body) - found.end) :] == body[found.end :]
    # And the rewritten body routes to the new model: one parse decides.
    assert find_json_model(out, exact_limit=exact_limit).model == new_model


def json_loads_model(body: bytes) -> tuple[bool, Any]:
    """What a strict upstream would make of ``body``: (valid object with one model?, model)."""
    seen: list[Any] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen.append(pairs)
        return dict(pairs)

    try:
        data = json.loads(body, object_pairs_hook=hook)
    except (ValueError, RecursionError):
        return False, None
    if not isinstance(data, dict):
        return False, None
    top = seen[-1]
    models_at_top = [v for k, v in top if k == "model"]
    if len(models_at_top) != 1 or not isinstance(models_at_top[0], str):
        return False, None
    return True, models_at_top[0]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    body, _ = draw(request_bodies())
    for _ in range(draw(st.integers(1, 4))):
        if not body:
            break
        at = draw(st.integers(0, len(body) - 1))
        op = draw(st.sampled_from(["delete", "insert", "replace", "truncate"]))
        byte = draw(
            st.sampled_from(
                [
                    b'"',
                    b"\\",
                    b",",
                    b":",
                    b"{",
                    b"}",
                    b"[",
                    b"]",
                    b" ",
                    b"\x00",
                    b"\xff",
                    b"m",
                    b"u",
                ]
            )
        )
        if op == "delete":
            body = body[:at] + body[at + 1 :]
        elif op == "insert":
            body = body[:at] + byte + body[at:]
        elif op == "replace":
            body = body[:at] + byte + body[at + 1 :]
        else:
            body = body[:at]
    return body


@MODES
@FUZZ
@given(st.binary(max_size=200) | mutated())
def test_any_bytes_raise_only_invalid_request(exact_limit: int | None, body: bytes) -> None:
    valid, expected = json_loads_model(body)
    try:
        found = find_json_model(body, exact_limit=exact_limit)
    except InvalidRequest:
        # Refusing valid JSON is allowed only for ambiguity (two model keys is
        # excluded above), so a valid single-model body must never be refused.
        assert not valid, body
        return
    assert isinstance(found, FoundModel)
    if exact_limit is None:
        # The exact scan accepts exactly what json.loads accepts.
        assert valid and found.model == expected, body
    elif valid:
        assert found.model == expected
    # The structural scan may pass a body whose non-model values are broken
    # (the upstream validates those); the model it found is still a JSON string.


# Bodies shaped to reach every branch of the one-scan road: "model" first,
# last, between scalars or between containers; "model" also as a nested key,
# as a string value and inside quoted text (candidates the road must reject);
# keys spelled with \\u escapes; non-ASCII text on either side of the model.
_TRICKY_KEYS = ["model", "messages", "tools", "stream", "x", "Model", "modelx", ""]
tricky_strings = st.sampled_from(
    [
        "model",
        '"model"',
        'say "model": "x"',
        "\\",
        '\\"model',
        "h\u00e9llo \u2603",
        "\U0001f600",
        "",
    ]
) | st.text(max_size=6)
tricky_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | tricky_strings,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(_TRICKY_KEYS) | st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def tricky_bodies(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, Any]]]:
    """A UTF-8 JSON object body and its top-level pairs in order (keys may repeat)."""
    pairs = draw(
        st.lists(
            st.tuples(st.sampled_from(_TRICKY_KEYS[1:]) | st.text(max_size=4), tricky_values),
            max_size=5,
        )
    )
    pairs = [(k, v) for k, v in pairs if k != "model"]
    for _ in range(draw(st.sampled_from([1, 1, 1, 1, 0, 2]))):
        model: Any = draw(tricky_strings | tricky_values)
        pairs.insert(draw(st.integers(0, len(pairs))), ("model", model))
    rnd = draw(st.randoms(use_true_random=False))
    text = json_object(pairs, rnd)
    if draw(st.booleans()):
        text = ws(rnd) + text + ws(rnd)
    return text.encode("utf-8", "surrogatepass"), pairs


def reference(body: bytes | bytearray) -> tuple[str, Any]:
    """The answer built on ``json.loads`` alone, for a body it accepts."""
    tops: list[list[tuple[str, Any]]] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        tops.append(pairs)
        return dict(pairs)

    data = json.loads(body, object_pairs_hook=hook)
    if not isinstance(data, dict):
        return ("error", "missing_model")
    models = [v for k, v in tops[-1] if k == "model"]  # the top level closes last
    if len(models) > 1:
        return ("error", "ambiguous_model")
    if not models:
        return ("error", "absent")  # missing_model, but routable by path
    if not isinstance(models[0], str):
        return ("error", "missing_model")
    return ("found", models[0])


def answer(body: bytes | bytearray, find: Any = find_json_model) -> tuple[str, Any]:
    try:
        return ("found", find(body))
    except InvalidRequest as err:
        return ("error", (err.code, err.message, isinstance(err, ModelAbsent)))


@FUZZ
@given(tricky_bodies())
@example((b'{"messages":[],"\\u006dodel":"a","tools":[{"model":"b"}]}', []))
@example((b'{"x":[1],"model":"a","t":{"model":"a"},"s":"\\"model\\": \\"a\\""}', []))
@example(('{"x":["\u00e9"],"model":"\u2603","y":{"z":"\u00e9"}}'.encode(), []))
def test_one_scan_agrees_with_a_json_loads_reference(
    case: tuple[bytes, list[tuple[str, Any]]],
) -> None:
    body, _ = case
    want = reference(body)
    got = answer(body)
    if want[0] == "error":
        absent = want[1] == "absent"
        code = "missing_model" if absent else want[1]
        assert got[0] == "error" and got[1][0] == code and got[1][2] == absent, (body, got)
        return
    assert got[0] == "found", (body, got)
    found = got[1]
    assert found.model == want[1]
    assert (found.json_value, found.codec) == (True, "utf-8")
    # The offsets hold the top-level value itself, not an equal one nested
    # elsewhere: replacing exactly those bytes changes the top-level model only.
    out = rewrite_model(body, found, "\u2603-rewritten")
    assert out[: found.start] == body[: found.start]
    assert out[len(out) - (len(body) - found.end) :] == body[found.end :]
    assert reference(out) == ("found", "\u2603-rewritten")
    assert json.loads(out) == {**json.loads(body), "model": "\u2603-rewritten"}


@FUZZ
@given(tricky_bodies().map(lambda case: case[0]) | mutated() | st.binary(max_size=120))
def test_one_scan_gives_the_long_ways_answers(body: bytes) -> None:
    """Every answer, error messages included, is the one the long walk gives."""
    want = answer(body, _find_exact)
    assert answer(body) == want, body
    assert answer(bytearray(body)) == want, body


BOUNDARY = "fuzzb0undary"
names = st.sampled_from(["model", "file", "prompt", "language", "Model", "model ", "x"])
contents = st.binary(max_size=30).filter(
    lambda b: f"--{BOUNDARY}".encode() not in b and b"\r\n--" not in b
)


@st.composite
def forms(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, bytes]]]:
    parts = draw(st.lists(st.tuples(names, contents), max_size=5))
    out = b"" if not draw(st.booleans()) else b"preamble\r\n"
    for name, content in parts:
        filename = '; filename="a.wav"' if name == "file" and draw(st.booleans()) else ""
        quoted = f'"{name}"' if draw(st.booleans()) or " " in name else name
        out += (
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name={quoted}{filename}\r\n\r\n".encode()
            + content
            + b"\r\n"
        )
    out += f"--{BOUNDARY}--\r\n".encode()
    return out, parts


@FUZZ
@given(forms())
def test_multipart_finds_the_one_model_field(case: tuple[bytes, list[tuple[str, bytes]]]) -> None:
    body, parts = case
    model_parts = [content for name, content in parts if name == "model"]
    try:
        found = find_multipart_model(body, BOUNDARY.encode())
    except InvalidRequest as err:
        if len(model_parts) > 1:
            # Refused: as ambiguous, or for the first model value's own fault.
            assert err.code in ("ambiguous_model", "missing_model")
        elif not model_parts or not model_parts[0]:
            assert err.code == "missing_model"
            assert isinstance(err, ModelAbsent) == (not model_parts)
        else:
            # Only a value that is not UTF-8 text is refused.
            with pytest.raises(UnicodeDecodeError):
                model_parts[0].decode("utf-8")
        return
    assert len(model_parts) == 1
    assert found.model == model_parts[0].decode("utf-8")
    assert body[found.start : found.end] == model_parts[0]
    out = rewrite_model(body, found, "rewritten-model")
    assert find_multipart_model(out, BOUNDARY.encode()).model == "rewritten-model"


@st.composite
def mangled_forms(draw: st.DrawFn) -> bytes:
    body, _ = draw(forms())
    for _ in range(draw(st.integers(1, 4))):
        if not body:
            break
        at = draw(st.integers(0, len(body) - 1))
        piece = draw(
            st.sampled_from(
                [b"\r\n", b"--", b'"', b";", b"\\", b":", b"\r", f"--{BOUNDARY}".encode(), b""]
            )
        )
        cut = draw(st.integers(0, 3))
        body = body[:at] + piece + body[at + cut :]
    return body


@FUZZ
@given(st.binary(max_size=300) | mangled_forms(), st.sampled_from([BOUNDARY, "x", "-" * 70]))
def test_multipart_any_bytes_raise_only_invalid_request(body: bytes, boundary: str) -> None:
    try:
        found = find_multipart_model(body, boundary.encode())
    except InvalidRequest as err:
        assert err.code in ("invalid_multipart", "missing_model", "ambiguous_model")
        return
    assert found.model
    assert body[found.start : found.end].decode("utf-8") == found.model
