"""What a request's ``model`` is and where it sits, the errors every finder
shares, and the rewrite that puts another model in its place.

The finders (json_model.py, json_large.py for bodies over 1 MiB,
multipart_model.py) all return a :class:`FoundModel`; :func:`rewrite_model`
splices new bytes in place of the old value, every other byte of the body
kept as it came.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from operator import itemgetter
from typing import Any, NamedTuple

from ..errors import InvalidRequest

__all__ = [
    "CAP_KEYS",
    "FoundModel",
    "ModelAbsent",
    "ambiguous_model",
    "invalid_json",
    "missing_model",
    "output_cap",
    "rewrite_model",
]


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
# and max_completion_tokens for reasoning models), Responses and Anthropic
# Messages (max_output_tokens, max_tokens).
CAP_KEYS = frozenset(("max_tokens", "max_completion_tokens", "max_output_tokens"))
_key_of = itemgetter(0)


def output_cap(pairs: Sequence[tuple[str, Any]]) -> int | None:
    """The largest whole-number cap among ``pairs`` (key, decoded value).

    The largest, so a body naming two caps (or one twice, which parsers read
    differently) is never reserved for less than the upstream may produce.
    Anything else (null, a float, a string) is no cap.
    """
    if CAP_KEYS.isdisjoint(map(_key_of, pairs)):  # most bodies: no Python step per pair
        return None
    cap: int | None = None
    for key, value in pairs:
        if key in CAP_KEYS and type(value) is int and value >= 0:
            if cap is None or value > cap:
                cap = value
    return cap


_MISSING_MESSAGE = "you must provide a model parameter"


class ModelAbsent(InvalidRequest):
    """The body names no model at all: a JSON object without a top-level
    ``model`` key, or a form without a ``model`` field.

    Such a request may still be routed by its path (README, Endpoints); a
    ``model`` that is there but unusable (not a string, empty, not UTF-8) is
    :func:`missing_model` and is refused whatever the routes say.
    """

    def __init__(self) -> None:
        super().__init__(_MISSING_MESSAGE, code="missing_model", param="model")


def missing_model() -> InvalidRequest:
    """A ``model`` that is there but unusable, or a body that is no object."""
    return InvalidRequest(_MISSING_MESSAGE, code="missing_model", param="model")


def invalid_json(detail: str) -> InvalidRequest:
    return InvalidRequest(
        f"We could not parse the JSON body of your request ({detail}). "
        "The OpenAI API expects a JSON payload.",
        code="invalid_json",
    )


def ambiguous_model() -> InvalidRequest:
    """Two top-level ``model`` keys: parsers keeping the first or the last would
    disagree about where the request goes (README, "One parse decides")."""
    return InvalidRequest(
        "the request names 'model' more than once", code="ambiguous_model", param="model"
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
