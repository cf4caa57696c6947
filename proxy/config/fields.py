"""The key-path cursor and the scalar validators every section parser uses.

A :class:`Node` is one value of the YAML tree together with its key path
(``routes[2].upstream``), so that any check can raise a :class:`ConfigError`
naming the file, the path and the value. The validators take a node and
return the typed value, or raise.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from .settings import ConfigError

__all__ = [
    "Node",
    "boolean",
    "header_name",
    "int_in",
    "nonempty_string",
    "nonneg_number",
    "positive_number",
    "show",
    "str_list",
    "string",
]

T = TypeVar("T")

# RFC 9110 §5.1: a field name is a token.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class Node:
    """A value in the YAML tree with its key path, for precise error messages."""

    __slots__ = ("file", "path", "value")

    def __init__(self, file: str, path: str, value: object) -> None:
        self.file = file
        self.path = path
        self.value = value

    def error(self, problem: str) -> ConfigError:
        where = self.path or "(top level)"
        return ConfigError(f"{self.file}: {where}: {problem}")

    def child(self, key: str | int) -> Node:
        if isinstance(key, int):
            path = f"{self.path}[{key}]"
            assert isinstance(self.value, list)
            return Node(self.file, path, self.value[key])
        path = f"{self.path}.{key}" if self.path else key
        assert isinstance(self.value, dict)
        return Node(self.file, path, self.value.get(key))

    def mapping(self, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(self.value, dict):
            raise self.error(f"expected a mapping, got {show(self.value)}")
        for key in self.value:
            if not isinstance(key, str):
                raise self.error(f"keys must be strings, got {show(key)}")
            if key not in allowed:
                raise self.error(f"unknown key {key!r} (allowed: {', '.join(allowed)})")
        return self.value

    def opt(self, key: str, kind: Callable[[Node], T], default: T) -> T:
        assert isinstance(self.value, dict)
        if key not in self.value or self.value[key] is None:
            return default
        return kind(self.child(key))


def show(value: object) -> str:
    """The value as an error message quotes it: its repr, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def string(node: Node) -> str:
    if not isinstance(node.value, str):
        raise node.error(f"expected a string, got {show(node.value)}")
    return node.value


def nonempty_string(node: Node) -> str:
    value = string(node)
    if not value:
        raise node.error("must not be empty")
    return value


def boolean(node: Node) -> bool:
    if not isinstance(node.value, bool):
        raise node.error(f"expected true or false, got {show(node.value)}")
    return node.value


def positive_number(node: Node) -> float:
    v = node.value
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 or v != v:
        raise node.error(f"expected a positive number, got {show(v)}")
    if v == float("inf"):
        raise node.error("must be finite")
    return float(v)


def nonneg_number(node: Node) -> float:
    v = node.value
    if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0 or v == float("inf"):
        raise node.error(f"expected a number >= 0, got {show(v)}")
    return float(v)


def int_in(lo: int, hi: int) -> Callable[[Node], int]:
    def parse(node: Node) -> int:
        v = node.value
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise node.error(f"expected a whole number from {lo} to {hi}, got {show(v)}")
        return v

    return parse


def str_list(node: Node) -> tuple[str, ...]:
    if not isinstance(node.value, list):
        raise node.error(f"expected a list, got {show(node.value)}")
    return tuple(nonempty_string(node.child(i)) for i in range(len(node.value)))


def header_name(node: Node) -> str:
    name = nonempty_string(node)
    if not _TOKEN.match(name):
        raise node.error(f"not a valid header name: {show(name)}")
    return name
