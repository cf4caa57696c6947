"""Every private name of aiohttp and prometheus-client that the proxy relies on.

The proxy reaches past these libraries' public API in a few measured places,
each explained where it is made: aiohttp's server connection (the slow-client
bounds, parser refusals answered as OpenAI JSON, the stop's grace), aiohttp's
client protocol (the lean upstream client's flow control, proxy/client/) and
prometheus-client's histogram children and value class (batched
observations, the switch to multiprocess values in a worker). Any release may
move such a name. pyproject.toml bounds both libraries to releases this suite
has passed on, and these tests make an upgrade past the bounds fail here,
naming the attribute, its class and the file that relies on it, instead of at
a first request. multidict is used through its public API only: the scan
below would list a private name of it too.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import pkgutil
import re
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

import pytest
from aiohttp import web, web_protocol
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader
from prometheus_client import CollectorRegistry, Histogram, values

import proxy

PACKAGE = Path(proxy.__file__).parent
LIBRARIES = ("aiohttp", "prometheus_client", "multidict")

# What the proxy relies on, by where it lives. Keep it to what the code uses:
# test_each_listed_name_is_still_used fails on a name no module touches.
RELIED_ON: dict[str, tuple[str, ...]] = {
    "aiohttp.web_protocol": ("_ErrInfo",),
    "aiohttp.web_protocol.RequestHandler": (
        "_keepalive",
        "_keepalive_handle",
        "_lingering_time",
        "_loop",
        "_manager",
        "_messages",
        "_request_count",
        "_request_in_progress",
        "_task_handler",
        "_upgraded",
    ),
    "aiohttp.web_server.Server": ("_connections", "_kwargs", "_loop"),
    "aiohttp.web_runner.AppRunner": ("_app", "_cleanup_server", "_make_server"),
    # SO_KEEPALIVE set once on the listening sockets (server/process.py).
    "aiohttp.web_runner.TCPSite": ("_server",),
    "aiohttp.client_proto.ResponseHandler": (
        "_buffer",
        "_buffer_paused",
        "_drain_helper",
        "_pause_reading_for_buffer",
        "_reading_paused",
        "_resume_reading_for_buffer",
    ),
    # The pipe's read of a parsed chunk (client/connection.py, take_parsed).
    "aiohttp.streams.StreamReader": (
        "_buffer",
        "_buffer_offset",
        "_cursor",
        "_eof",
        "_exception",
        "_http_chunk_splits",
        "_protocol",
        "_size",
    ),
    # The pipe sends the response head with the first chunk (outbound/pipe.py).
    "aiohttp.web_response.StreamResponse": ("_send_headers_immediately",),
    "aiohttp.http_writer.StreamWriter": ("_headers_buf", "_headers_written"),
    "prometheus_client.Histogram's labelled child": ("_buckets", "_sum"),
    # Not underscored, but internals all the same (not in the library's docs).
    "prometheus_client.values": ("MultiProcessValue", "MutexValue", "ValueClass"),
}
# Underscored yet public: os._exit is documented as the way a forked child leaves.
PUBLIC_ANYWAY = frozenset({"_exit"})


async def _no_handler(request: web.BaseRequest) -> web.StreamResponse:
    raise NotImplementedError


def holders() -> dict[str, object]:
    """A real object for each entry of RELIED_ON: instance attributes exist only
    on an instance. Called inside the running loop the constructors want."""
    loop = asyncio.get_running_loop()
    server = web.Server(_no_handler)
    histogram = Histogram("probe_seconds", "probe", ["upstream"], registry=CollectorRegistry())
    return {
        "aiohttp.web_protocol": web_protocol,
        "aiohttp.web_protocol.RequestHandler": web_protocol.RequestHandler(server, loop=loop),
        "aiohttp.web_server.Server": server,
        "aiohttp.web_runner.AppRunner": web.AppRunner(web.Application()),
        "aiohttp.web_runner.TCPSite": web.TCPSite,  # a slot: the class holds it
        "aiohttp.client_proto.ResponseHandler": ResponseHandler(loop),
        "aiohttp.streams.StreamReader": StreamReader(ResponseHandler(loop), 2**16, loop=loop),
        "aiohttp.web_response.StreamResponse": web.StreamResponse(),
        "aiohttp.http_writer.StreamWriter": StreamWriter(ResponseHandler(loop), loop),
        "prometheus_client.Histogram's labelled child": histogram.labels("a"),
        "prometheus_client.values": values,
    }


def sources() -> dict[str, str]:
    return {
        str(path.relative_to(PACKAGE.parent)): path.read_text(encoding="utf-8")
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def files_using(name: str) -> list[str]:
    """The proxy's files that touch ``name`` as an attribute or import it."""
    pattern = re.compile(rf"\.{re.escape(name)}\b|import[^\n]*\b{re.escape(name)}\b")
    return [path for path, text in sources().items() if pattern.search(text)]


def version_of(holder: str) -> str:
    library = holder.split(".")[0]
    return f"{library} {version(library.replace('_', '-'))}"


async def test_every_private_name_the_proxy_relies_on_exists() -> None:
    built = holders()
    missing = [
        f"{version_of(holder)} has no {holder}.{name}, which "
        f"{', '.join(files_using(name)) or 'the proxy'} relies on"
        for holder, names in RELIED_ON.items()
        for name in names
        if not hasattr(built[holder], name)
    ]
    assert not missing, (
        "\n".join(missing) + "\nRead the new release's source for what replaced each name, "
        "update the code that uses it, this list and the bounds in pyproject.toml."
    )


def _defined_by_the_proxy(trees: dict[str, ast.Module]) -> set[str]:
    """Every name the proxy gives a meaning itself: functions, classes, slots,
    module globals and attributes it assigns on its own objects."""
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    names.add(node.attr)
            if isinstance(node, ast.Assign) and "__slots__" in map(ast.unparse, node.targets):
                names.update(
                    sub.value
                    for sub in ast.walk(node.value)
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str)
                )
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _attribute_name(node: ast.AST) -> str | None:
    """The attribute ``node`` reaches: ``x.name``, or ``getattr(x, "name")``
    and its kin."""
    if isinstance(node, ast.Attribute):
        return node.attr
    if (
        isinstance(node, ast.Call)
        and ast.unparse(node.func) in ("getattr", "setattr", "hasattr", "delattr")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    ):
        return node.args[1].value
    return None


def _foreign_private_names(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Private names the proxy reads from objects it did not define, by file:
    ``x._name`` where the proxy never defines ``_name``, ``super()._name``,
    and ``from library import _name``."""
    ours = _defined_by_the_proxy(trees)
    found: dict[str, set[str]] = {}
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                for alias in node.names:
                    if _private(alias.name):
                        found.setdefault(alias.name, set()).add(path)
            name = _attribute_name(node)
            if name is None or not _private(name):
                continue
            base = node.value if isinstance(node, ast.Attribute) else None
            is_super = isinstance(base, ast.Call) and ast.unparse(base.func) == "super"
            if is_super or name not in ours:
                found.setdefault(name, set()).add(path)
    return found


def _proxy_modules() -> list[ModuleType]:
    # Importing a proxy module only defines things, so importing them all is safe.
    return [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(proxy.__path__, "proxy.")
        if not info.name.endswith("__main__")
    ]


def _library_names_our_subclasses_define(built: dict[str, object]) -> dict[str, set[str]]:
    """Private names that a proxy subclass of a library class defines or assigns
    and that the library's class has too: each is the library's attribute
    used (or, unlisted, a clash with one)."""
    instances = {type(obj): obj for obj in built.values() if not isinstance(obj, ModuleType)}
    found: dict[str, set[str]] = {}
    for module in _proxy_modules():
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                continue
            bases = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] in LIBRARIES]
            if not bases:
                continue
            own = _defined_by_the_proxy({"": ast.parse(inspect.getsource(cls))})
            path = str(Path(inspect.getfile(cls)).relative_to(PACKAGE.parent))
            for name in filter(_private, own):
                if any(hasattr(base, name) or hasattr(instances.get(base), name) for base in bases):
                    found.setdefault(name, set()).add(path)
    return found


async def test_the_list_names_every_private_name_the_proxy_touches() -> None:
    trees = {path: ast.parse(text) for path, text in sources().items()}
    touched = _foreign_private_names(trees)
    for name, files in _library_names_our_subclasses_define(holders()).items():
        touched.setdefault(name, set()).update(files)
    listed = {name for names in RELIED_ON.values() for name in names}
    unlisted = {
        name: sorted(files)
        for name, files in touched.items()
        if name not in listed and name not in PUBLIC_ANYWAY
    }
    assert not unlisted, (
        f"private library names used but not in RELIED_ON: {unlisted}; add each "
        "under the library class it belongs to (or rename a clashing attribute of ours)"
    )


@pytest.mark.parametrize("name", sorted({name for names in RELIED_ON.values() for name in names}))
def test_each_listed_name_is_still_used(name: str) -> None:
    assert files_using(name), f"no module of the proxy uses {name!r}: drop it from RELIED_ON"
