"""The package's shape, read from its source with ``ast`` (README, "Architecture").

Three rules, each checked on every module of ``proxy/``:

(a) Imports run downward only, and there is no import cycle between modules.
    Every import counts: at module level, inside a function (``cli.py`` imports
    lazily to start fast, which is fine as long as the import runs downward),
    and under ``TYPE_CHECKING``. The layers, highest first (``RANK``):

    - ``proxy/cli.py``, ``proxy/check.py``, ``proxy/__main__.py``: the top; they
      may import anything;
    - ``server/`` > ``outbound/`` > ``inbound/`` > ``runtime/`` >
      ``admission/`` and ``client/`` (siblings: neither imports the other);
    - under every one of those: ``observe/`` > ``config/`` > ``errors.py``,
      ``early_signals.py`` and ``demo.py`` (leaves that import nothing of the
      proxy but ``proxy/__init__.py``; the server starts the demo upstream and
      answers a SIGHUP that ``early_signals`` held, so both sit below it) >
      ``proxy/__init__.py`` (the version and the ``Server`` header).

    A module may import any module of its own folder (cycles aside) and any
    module of a lower layer; nothing else.
(b) Every module is at most 400 lines.
(c) Every function and method is at most 60 lines (from its ``def`` to its
    last line, nested functions included) and takes at most 6 parameters
    (``self`` and ``cls`` not counted; ``*args`` and ``**kwargs`` count one
    each). Declarative tables are exempt only when named in ``DECLARATIVE``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import proxy

PACKAGE = Path(proxy.__file__).parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 6

# Layer of each folder (subpackage) or top-level module; higher imports lower.
RANK: Mapping[str, int] = {
    "cli": 9,
    "check": 9,
    "__main__": 9,
    "server": 8,
    "outbound": 7,
    "inbound": 6,
    "runtime": 5,
    "admission": 4,
    "client": 4,
    "observe": 3,
    "config": 2,
    "errors": 1,
    "early_signals": 1,
    "demo": 1,
    "": 0,  # proxy/__init__.py
}

# Functions over the length bound because they are a table, not logic:
# "path::qualified name" -> why. None today.
DECLARATIVE: Mapping[str, str] = {}


@dataclass(frozen=True, slots=True)
class Import:
    importer: str  # dotted module name
    imported: str  # the module it names (a package's __init__ when not a submodule)
    line: int

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported}"


def sources(root: Path = PACKAGE) -> dict[str, str]:
    """Every module of the package: dotted name -> source text."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path.read_text(encoding="utf-8")
    return found


def path_of(module: str, modules: Mapping[str, str]) -> str:
    """``proxy.server.app`` -> ``proxy/server/app.py`` (``__init__.py`` for a package)."""
    is_package = any(other.startswith(module + ".") for other in modules)
    return module.replace(".", "/") + ("/__init__.py" if is_package else ".py")


def imports(modules: Mapping[str, str]) -> list[Import]:
    """Every import of one of ``modules`` by another, wherever it is written."""
    found = []
    for name, text in modules.items():
        is_package = path_of(name, modules).endswith("__init__.py")
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(text)):
            for target in _targets(node, package):
                if target.split(".")[0] == "proxy":
                    found.append(Import(name, _module_named(target, modules), node.lineno))
    return found


def _targets(node: ast.AST, package: str) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            parts = parts[: len(parts) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        # ``from pkg import name``: name is a submodule or a name in pkg.
        yield from (f"{base}.{alias.name}" for alias in node.names)


def _module_named(target: str, modules: Mapping[str, str]) -> str:
    while target not in modules and "." in target:
        target = target.rpartition(".")[0]
    return target


def layer(module: str) -> str:
    """The folder a module is in, or the top-level module's own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward(found: list[Import]) -> list[str]:
    """Imports that do not run downward (module docstring, rule a)."""
    bad = []
    for imp in found:
        here, there = layer(imp.importer), layer(imp.imported)
        if here == there or RANK[here] == 9 or RANK[there] < RANK[here]:
            continue
        bad.append(str(imp))
    return sorted(set(bad))


def cycles(found: list[Import]) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a loop
    (strongly connected components of the import graph, Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for imp in found:
        graph.setdefault(imp.importer, set()).add(imp.imported)
        graph.setdefault(imp.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1 or node in graph[node]:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def long_modules(modules: Mapping[str, str]) -> dict[str, int]:
    return {
        path_of(name, modules): lines
        for name, text in modules.items()
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES
    }


def functions(modules: Mapping[str, str]) -> Iterator[tuple[str, int, int]]:
    """``(path::qualified name, lines, parameters)`` of every function and method."""
    for name, text in modules.items():
        yield from _functions_in(ast.parse(text), path_of(name, modules) + "::")


def _functions_in(node: ast.AST, prefix: str) -> Iterator[tuple[str, int, int]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            args = child.args
            names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
            if names and names[0] in ("self", "cls"):
                names.pop(0)
            count = len(names) + (args.vararg is not None) + (args.kwarg is not None)
            assert child.end_lineno is not None
            yield prefix + child.name, child.end_lineno - child.lineno + 1, count
            yield from _functions_in(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from _functions_in(child, f"{prefix}{child.name}.")
        else:
            yield from _functions_in(child, prefix)


def long_functions(modules: Mapping[str, str]) -> dict[str, int]:
    return {
        where: lines
        for where, lines, _ in functions(modules)
        if lines > MAX_FUNCTION_LINES and where not in DECLARATIVE
    }


def many_parameters(modules: Mapping[str, str]) -> dict[str, int]:
    return {where: count for where, _, count in functions(modules) if count > MAX_PARAMETERS}


def _assert_kept(offenders: Mapping[str, object] | set[str], rule: str) -> None:
    found = sorted(offenders)
    details = (
        [f"{where}: {offenders[where]}" for where in found]
        if isinstance(offenders, dict)
        else found
    )
    assert not found, f"{rule}:\n  " + "\n  ".join(details)


# The rules on the package as it is.


def test_imports_run_downward_only() -> None:
    _assert_kept(
        set(upward(imports(sources()))),
        "imports that run upward or sideways (see this file's docstring for the layers)",
    )


def test_no_module_imports_itself_around_a_loop() -> None:
    found = cycles(imports(sources()))
    assert not found, "modules that import each other:\n  " + "\n  ".join(map(", ".join, found))


def test_the_supervisor_imports_the_serving_process_only() -> None:
    """``--workers`` is chosen by cli.py; workers.py forks processes that run
    process.py, and neither imports the other back (README, "Architecture")."""
    of_server = {
        imp.imported
        for imp in imports(sources())
        if imp.importer == "proxy.server.workers" and layer(imp.imported) == "server"
    }
    assert of_server == {"proxy.server.process"}


def test_every_layer_is_known() -> None:
    unknown = {layer(name) for name in sources()} - set(RANK)
    assert not unknown, f"give these folders or modules a place in RANK: {sorted(unknown)}"


def test_modules_are_at_most_400_lines() -> None:
    _assert_kept(long_modules(sources()), f"modules over {MAX_MODULE_LINES} lines")


def test_functions_are_at_most_60_lines() -> None:
    _assert_kept(long_functions(sources()), f"functions over {MAX_FUNCTION_LINES} lines")


def test_functions_take_at_most_6_parameters() -> None:
    _assert_kept(many_parameters(sources()), f"functions over {MAX_PARAMETERS} parameters")


def test_each_declarative_exemption_still_names_a_long_function() -> None:
    lengths = {where: lines for where, lines, _ in functions(sources())}
    stale = [w for w in DECLARATIVE if lengths.get(w, 0) <= MAX_FUNCTION_LINES]
    assert not stale, f"remove from DECLARATIVE: {stale}"


# Each rule can fail: the same checks on small made-up packages.


def test_an_upward_import_is_caught_at_module_and_function_level() -> None:
    made_up = {
        "proxy.client.pool": "from ..server import app\n",
        "proxy.runtime.runtime": "def f():\n    from ..inbound.route import Outbound\n",
        "proxy.admission.admission": "from proxy.client import pool\n",  # a sibling
        "proxy.server.app": "from ..client import pool\nfrom .. import cli\n",
        "proxy.inbound.route": "",
        "proxy.cli": "from .server import app\n",
        "proxy.client": "",
    }
    assert upward(imports(made_up)) == [
        "proxy.admission.admission -> proxy.client.pool",
        "proxy.client.pool -> proxy.server.app",
        "proxy.runtime.runtime -> proxy.inbound.route",
        "proxy.server.app -> proxy.cli",
    ]


def test_a_cycle_is_caught_within_one_folder() -> None:
    made_up = {
        "proxy.server": "",
        "proxy.server.a": "from . import b\n",
        "proxy.server.b": "def f():\n    from .c import x\n",
        "proxy.server.c": "from proxy.server.a import y\n",
        "proxy.server.d": "from . import a\n",
    }
    assert cycles(imports(made_up)) == [["proxy.server.a", "proxy.server.b", "proxy.server.c"]]


def test_a_long_module_and_a_long_or_wide_function_are_caught() -> None:
    wide = "class C:\n    def m(self, a, b, c, d, e, f, *g):\n        pass\n"
    six = "def g(a, b, c, d, e, *, f):\n    pass\n"
    long = "def h():\n" + "    x = 1\n" * 60
    made_up = {
        "proxy.big": "x = 1\n" * 401,
        "proxy.edge": "x = 1\n" * 400,
        "proxy.fine": wide + six + long,
    }
    assert long_modules(made_up) == {"proxy/big.py": 401}
    assert many_parameters(made_up) == {"proxy/fine.py::C.m": 7}
    assert long_functions(made_up) == {"proxy/fine.py::h": 61}
