"""The routing table: which route serves a model id or a path.

Built once per configuration (and again when model discovery reports new
ids); immutable afterwards. Routes are tried in file order and the first match
wins. Exact ids are looked up in a dict, so the common case costs one lookup;
a glob listed before an exact id still wins over it, as the file says.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..config.settings import Route

__all__ = ["Match", "RouteTable"]

_CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class Match:
    """A model resolved to its route, and the model id the upstream is to receive."""

    route: Route
    upstream_model: str

    @property
    def rewritten(self) -> bool:
        return self.route.rewrite_model is not None or bool(self.route.prefix)


class RouteTable:
    """Resolve model ids and paths to routes; list the ids for ``/v1/models``.

    ``discovered`` maps the index of a ``models: discover`` route to the ids its
    upstream reported (without the prefix).
    """

    def __init__(
        self, routes: Iterable[Route], discovered: Mapping[int, Iterable[str]] | None = None
    ) -> None:
        self.routes = tuple(routes)
        self.discovered = {i: tuple(ids) for i, ids in (discovered or {}).items()}
        self._exact: dict[str, tuple[int, Route, str]] = {}
        self._globs: list[Route] = []
        self._path_routes: list[Route] = [r for r in self.routes if r.path is not None]
        self.default: Route | None = next((r for r in self.routes if r.default), None)
        for route in self.routes:
            if route.model is not None:
                if route.is_glob:
                    self._globs.append(route)
                else:
                    self._exact.setdefault(
                        route.model, (route.index, route, route.rewrite_model or route.model)
                    )
            elif route.discover:
                for upstream_id in self.discovered.get(route.index, ()):
                    self._exact.setdefault(
                        route.prefix + upstream_id, (route.index, route, upstream_id)
                    )
        self._cache: dict[str, Match | None] = {}

    def resolve(self, model: str) -> Match | None:
        """The first route matching ``model``, or ``None``."""
        cache = self._cache
        try:
            return cache[model]
        except KeyError:
            pass
        match = self._resolve(model)
        if len(cache) >= _CACHE_LIMIT:
            # Bounded: a client inventing model ids cannot grow memory.
            cache.clear()
        cache[model] = match
        return match

    def _resolve(self, model: str) -> Match | None:
        exact = self._exact.get(model)
        limit = exact[0] if exact is not None else len(self.routes)
        for route in self._globs:
            if route.index >= limit:
                break
            if fnmatchcase(model, route.model or ""):
                return Match(route, route.rewrite_model or model)
        if exact is not None:
            return Match(exact[1], exact[2])
        return None

    def resolve_path(self, path: str) -> Route | None:
        """The route for a request with no model: the first ``path`` glob, else the default.

        ``path`` is the part after ``/v1/`` (or after ``/``), e.g. ``files/file-abc``.
        """
        for route in self._path_routes:
            pattern = route.path or ""
            if fnmatchcase(path, pattern):
                return route
        return self.default

    def model_ids(self) -> list[str]:
        """Ids for ``/v1/models``: exact ids, aliases and discovered ids, in file order."""
        seen: dict[str, None] = {}
        for route in self.routes:
            if route.model is not None and not route.is_glob:
                seen.setdefault(route.model)
            elif route.discover:
                for upstream_id in self.discovered.get(route.index, ()):
                    seen.setdefault(route.prefix + upstream_id)
        return list(seen)
