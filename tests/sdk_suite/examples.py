"""Example answers for every endpoint of the openai SDK, built from its own types.

Run with the interpreter the SDK is installed in::

    python examples.py SDK_SOURCE_DIR OUT.json

The SDK's ``api.md`` files list each method as
``<code title="post /chat/completions">... -> <a href="./src/openai/types/...">Type</a></code>``:
the HTTP method, the path template and the type the SDK parses the answer
into. For each, the smallest JSON value that type accepts is written out:
required fields only, the first member of a union or ``Literal``, empty lists
and maps. The recording upstream of tests/integration/test_sdk_suite.py
answers with it, so the SDK's own tests get an answer they can parse (the
role a mock server built from the OpenAPI document plays in the SDK's CI).
Nothing here imports oaimux: this file runs in the SDK's own environment.
"""

from __future__ import annotations

import builtins
import collections.abc
import datetime
import enum
import importlib
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pydantic
import typing_extensions
from openai import pagination

_METHOD = re.compile(r'<code title="(\w+) ([^"]+)">.*?\) -> (.*?)</code>')
_LINKED = re.compile(r'<a href="\./src/([^"]+)\.py">([^<]+)</a>')
_GENERIC = re.compile(r"(\w+)\[(\w+)\]")
_BINARY = {"HttpxBinaryResponseContent", "BinaryAPIResponse", "bytes"}
_MAX_DEPTH = 40


class Unknown(Exception):
    """A type this generator does not know how to fill."""


def example(tp: Any, depth: int = 0) -> Any:
    """The smallest JSON value that validates as ``tp``."""
    if depth > _MAX_DEPTH:
        raise Unknown(f"too deep at {tp!r}")
    if isinstance(tp, typing_extensions.TypeAliasType) or isinstance(
        tp, getattr(typing, "TypeAliasType", ())
    ):
        return example(tp.__value__, depth + 1)
    origin = typing_extensions.get_origin(tp)
    args = typing_extensions.get_args(tp)
    if origin is typing_extensions.Annotated or origin is typing.Annotated:
        return example(args[0], depth + 1)
    if tp is Any or tp is object:
        return {}
    if tp is None or tp is type(None):
        return None
    if origin is typing.Literal or origin is typing_extensions.Literal:
        value = args[0]
        return value.value if isinstance(value, enum.Enum) else value
    if origin is typing.Union or origin is types.UnionType:
        if type(None) in args:
            return None
        return example(args[0], depth + 1)
    if origin in (list, tuple, set, frozenset) or _is_abc(origin, "Sequence", "Iterable"):
        return []
    if origin is dict or _is_abc(origin, "Mapping"):
        return {}
    if tp is bool:
        return True
    if tp is int:
        return 0
    if tp is float:
        return 0.0
    if tp is str:
        return "string"
    if tp is datetime.datetime:
        return "2024-01-01T00:00:00Z"
    if tp is datetime.date:
        return "2024-01-01"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return next(iter(tp)).value
    if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
        return {
            field.alias or name: example(field.annotation, depth + 1)
            for name, field in tp.model_fields.items()
            if field.is_required()
        }
    raise Unknown(repr(tp))


def _is_abc(origin: Any, *names: str) -> bool:
    return any(origin is getattr(collections.abc, name) for name in names)


def resolve(returns: str) -> Any:
    """The type named by the part of an api.md line after ``->``."""
    linked = _LINKED.search(returns)
    text = linked.group(2) if linked else returns.strip()
    generic = _GENERIC.fullmatch(text)
    page = getattr(pagination, generic.group(1)) if generic else None
    name = generic.group(2) if generic else text
    if linked is None:
        item: Any = Any  # a page of a type api.md does not link: an empty page is still one
    else:
        module = importlib.import_module(linked.group(1).replace("/", "."))
        item = getattr(module, name, None) or getattr(builtins, name)
    return page[item] if page is not None else item


def endpoints(api_md: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for method, target, returns in _METHOD.findall(api_md):
        path, _, query = target.partition("?")
        entry: dict[str, Any] = {"method": method.upper(), "path": path, "query": query}
        text = _LINKED.sub(r"\2", returns).strip()
        if text in _BINARY:
            entry["kind"] = "binary"
        elif text == "None":
            entry["kind"] = "empty"
        else:
            try:
                entry["body"] = example(resolve(returns))
                entry["kind"] = "json"
            except (Unknown, AttributeError, ImportError) as exc:
                entry["kind"] = "json"
                entry["body"] = {}
                entry["unknown"] = str(exc)
        out.append(entry)
    return out


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    # The top-level api.md links some resources' own (src/openai/resources/*/api.md).
    documents = [source / "api.md", *sorted((source / "src").rglob("api.md"))]
    table = [entry for doc in documents for entry in endpoints(doc.read_text(encoding="utf-8"))]
    target.write_text(json.dumps(table, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
