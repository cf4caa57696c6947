"""The loopback listeners of the upstreams oaimux serves itself (``builtin:``).

A configuration that names ``upstreams.<name>.builtin: demo`` gets the demo
upstream (``proxy/demo.py``) on a loopback port of its own, started only then;
the proxy reaches it like any upstream (README, "Quickstart").
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket

from aiohttp import web
from yarl import URL

from ..config.settings import Settings
from ..demo import demo_app

__all__ = ["BuiltinUpstreams"]


class BuiltinUpstreams:
    """The loopback listeners of the built-in upstreams a configuration names.

    Nothing is started until :meth:`bind` meets an upstream with ``builtin``.
    Each kind has one listener for the life of the process, shared by every
    upstream of that kind (and kept across reloads). Owned by the app
    (app.py), which closes it after the proxy's own requests have drained.
    """

    def __init__(self) -> None:
        self._urls: dict[str, URL] = {}
        self._starting: list[asyncio.Task[web.AppRunner]] = []
        self._runners: list[web.AppRunner] = []

    def bind(self, settings: Settings) -> Settings:
        """``settings`` with each builtin upstream's URL pointing at its listener.

        A listener not yet running is bound now (its port is known at once) and
        starts serving on the running loop; :meth:`ready` waits for that.
        Connections made in between wait in the socket's backlog.
        """
        named = {n: u for n, u in settings.upstreams.items() if u.builtin is not None}
        if not named:
            return settings
        upstreams = dict(settings.upstreams)
        for name, upstream in named.items():
            assert upstream.builtin is not None
            upstreams[name] = dataclasses.replace(upstream, url=self._url_of(upstream.builtin))
        return dataclasses.replace(settings, upstreams=upstreams)

    def _url_of(self, kind: str) -> URL:
        if kind not in self._urls:
            sock = socket.create_server(("127.0.0.1", 0))
            sock.setblocking(False)
            port = sock.getsockname()[1]
            self._starting.append(asyncio.get_running_loop().create_task(_serve(sock)))
            self._urls[kind] = URL(f"http://127.0.0.1:{port}/v1")
        return self._urls[kind]

    @property
    def started(self) -> tuple[str, ...]:
        """The kinds whose listener was started (bound), in order."""
        return tuple(self._urls)

    async def ready(self) -> None:
        """Wait until every bound listener serves."""
        starting, self._starting = self._starting, []
        self._runners.extend(await asyncio.gather(*starting))

    async def close(self) -> None:
        await asyncio.gather(*self._starting, return_exceptions=True)
        for task in self._starting:
            if not task.cancelled() and task.exception() is None:
                self._runners.append(task.result())
        self._starting = []
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()


async def _serve(sock: socket.socket) -> web.AppRunner:
    # handler_cancellation: a client (the proxy) that goes away mid-stream ends
    # the handler instead of leaving it writing to a closed connection.
    runner = web.AppRunner(
        demo_app(),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=1.0,
        handler_cancellation=True,
    )
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    return runner
