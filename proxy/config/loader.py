"""Reading a routes file: YAML with unique keys, ``${VAR}`` expansion, then the sections.

``load_settings`` reads the file and ``parse_settings`` takes a tree already
loaded; both raise only :class:`ConfigError`. ``${VAR}`` and
``${VAR:-default}`` are expanded in every string of the tree before any
section is parsed, so the validators see the text that will be used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .fields import Node
from .limits import rate_limit_section
from .sections import (
    auth_section,
    log_section,
    metrics_section,
    routes_section,
    server_section,
)
from .settings import (
    ConfigError,
    EnvSubstitution,
    LogSettings,
    MetricsSettings,
    ServerSettings,
    Settings,
)
from .upstreams import upstreams_section

__all__ = ["load_settings", "parse_settings"]


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(node: Node, environ: Mapping[str, str], noted: list[EnvSubstitution]) -> object:
    """Replace ${VAR} / ${VAR:-default} in every string of the tree (in place).

    Expansions that are empty or fell back to the default go to ``noted``.
    """
    value = node.value
    if isinstance(value, str):

        def repl(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in environ:
                text = environ[name]
                if not text:
                    noted.append(EnvSubstitution(node.path, name, True, False))
                return text
            if default is not None:
                noted.append(EnvSubstitution(node.path, name, not default, True))
                return default
            raise node.error(
                f"environment variable {name} is not set (and no ${{{name}:-default}})"
            )

        return _ENV_REF.sub(repl, value)
    if isinstance(value, dict):
        for key in list(value):
            if isinstance(key, str):
                value[key] = _expand_env(node.child(key), environ, noted)
        return value
    if isinstance(value, list):
        for i in range(len(value)):
            value[i] = _expand_env(node.child(i), environ, noted)
        return value
    return value


_TOP_KEYS = ("server", "log", "metrics", "rate_limit", "auth", "upstreams", "routes")


def parse_settings(
    data: object, source: str = "routes.yaml", environ: Mapping[str, str] | None = None
) -> Settings:
    """Validate an already-loaded YAML tree. Raises only :class:`ConfigError`."""
    root = Node(source, "", data)
    if data is None:
        raise root.error("the file is empty")
    root.mapping(_TOP_KEYS)
    noted: list[EnvSubstitution] = []
    _expand_env(root, os.environ if environ is None else environ, noted)
    # Parsed in this order, so a file with several mistakes reports the same first one.
    upstreams = upstreams_section(root.child("upstreams"))
    routes = routes_section(root.child("routes"), upstreams)
    rate_limit, storage, fail_open = rate_limit_section(root.child("rate_limit"))
    auth_keys = auth_section(root.child("auth"))
    return Settings(
        source=source,
        server=root.opt("server", server_section, ServerSettings()),
        log=root.opt("log", log_section, LogSettings()),
        metrics=root.opt("metrics", metrics_section, MetricsSettings()),
        rate_limit=rate_limit,
        rate_limit_storage=storage,
        rate_limit_fail_open=fail_open,
        upstreams=upstreams,
        routes=routes,
        auth_keys=auth_keys,
        env_substitutions=tuple(noted),
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (YAML 1.2 says they are an error)."""


def _construct_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "unhashable mapping key", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_settings(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> Settings:
    """Read, expand and validate a routes file. Raises only :class:`ConfigError`."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{source}: cannot read: {exc.strerror if isinstance(exc, OSError) else exc}"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    return parse_settings(data, source, environ)
