"""The output cap read by the model finder's own scan (README: Token budgets).

Property: on every path (one scan, the exact walk, the structural scan of
large bodies) the cap is the largest non-negative whole number among the
top-level ``max_tokens``, ``max_completion_tokens`` and ``max_output_tokens``,
as ``json.loads`` reads them (duplicates included), and the model found is
the same as without asking for the cap.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.inbound.json_model import _find_exact, find_json_model
from proxy.inbound.routable import find_model
from tests.unit.test_fuzz_findmodel import ENCODINGS, FUZZ, json_object, values, ws

CAP_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
caps = st.integers(min_value=-5, max_value=10**7) | values


@st.composite
def bodies_with_caps(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, Any]]]:
    pairs = draw(st.lists(st.tuples(st.text(max_size=8), values), max_size=4))
    pairs = [(k, v) for k, v in pairs if k != "model" and k not in CAP_KEYS]
    for _ in range(draw(st.integers(0, 3))):
        cap = (draw(st.sampled_from(CAP_KEYS)), draw(caps))
        pairs.insert(draw(st.integers(0, len(pairs))), cap)
    pairs.insert(draw(st.integers(0, len(pairs))), ("model", draw(st.text(max_size=12))))
    rnd = draw(st.randoms(use_true_random=False))
    text = ws(rnd) + json_object(pairs, rnd) + ws(rnd)
    return text.encode(draw(st.sampled_from(ENCODINGS)), "surrogatepass"), pairs


def expected_cap(pairs: list[tuple[str, Any]]) -> int | None:
    whole = [v for k, v in pairs if k in CAP_KEYS and type(v) is int and v >= 0]
    return max(whole) if whole else None


@pytest.mark.parametrize("exact_limit", [None, 0], ids=["small", "structural"])
@FUZZ
@given(bodies_with_caps())
def test_the_cap_is_the_largest_whole_number_json_reads(
    exact_limit: int | None, case: tuple[bytes, list[tuple[str, Any]]]
) -> None:
    body, pairs = case
    found = find_json_model(body, exact_limit, with_cap=True)
    assert found.output_cap == expected_cap(pairs)
    assert found.model == dict(pairs)["model"]
    assert found.model == json.loads(body)["model"]
    without = find_json_model(body, exact_limit)
    assert without.output_cap is None
    assert (without.model, without.start, without.end) == (found.model, found.start, found.end)
    assert _find_exact(body, with_cap=True).output_cap == expected_cap(pairs)


@pytest.mark.parametrize(
    ("body", "cap"),
    [
        (b'{"model":"m","max_tokens":128000}', 128000),
        (b'{"max_completion_tokens": 50, "model": "m", "max_tokens": 70}', 70),
        (b'{"model":"m","max_output_tokens":null}', None),
        (b'{"model":"m","max_tokens":100.0}', None),
        (b'{"model":"m","max_tokens":"100"}', None),
        (b'{"model":"m","max_tokens":-1}', None),
        (b'{"model":"m","max_tokens":1,"max_tokens":9}', 9),  # a duplicate: the larger
        (b'{"model":"m","options":{"max_tokens":5}}', None),  # nested: not the request's
    ],
)
def test_cases(body: bytes, cap: int | None) -> None:
    assert find_model(body, "application/json", with_cap=True).output_cap == cap


def test_a_large_body_has_its_cap_read_by_the_structural_scan() -> None:
    blob = "A" * (2 << 20)
    body = json.dumps({"model": "m", "input": blob, "max_output_tokens": 321}).encode()
    assert find_json_model(body, with_cap=True).output_cap == 321


def test_a_form_has_no_cap() -> None:
    body = (
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        b'--b\r\nContent-Disposition: form-data; name="max_tokens"\r\n\r\n9\r\n--b--\r\n'
    )
    found = find_model(body, "multipart/form-data; boundary=b", with_cap=True)
    assert (found.model, found.output_cap) == ("whisper-1", None)
