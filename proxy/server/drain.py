"""The stop: the listeners close, requests in flight get a grace, the rest is cut.

Stopping (:class:`ProxyRunner` ``cleanup``, README "Stop, reload, workers")
keeps one deadline, ``server.shutdown_grace_seconds`` after the listeners
close: idle connections close at once, requests in flight run until the
deadline, and whatever is still open then is aborted (a broken response,
never a clean end). aiohttp's own ``RequestHandler.shutdown(timeout)`` waits
``timeout``, cancels the request payload, then waits ``timeout`` again before
it cancels the handler, so a stream that outlives the grace would hold the
stop for twice the grace (a relay waits on the upstream, not on the payload).

:class:`ProxyRunner` is also where the server's connections get their guard
(connections.py): its server makes :class:`GuardedRequestHandler` connections,
all watched by one :class:`~proxy.server.send_watch.SendWatch`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ..config.settings import ServerSettings
from ..observe.observer import Observer
from .connections import GuardedRequestHandler
from .keys import OBSERVER
from .send_watch import SendWatch

__all__ = ["ABORT_WAIT", "CLEANUP_WAIT", "GuardedServer", "ProxyRunner"]

log = logging.getLogger("oaimux.connections")

# Once the grace is over and the rest aborted, the cancelled handlers get this
# long to let go of what they hold (upstream connections, access lines), and
# the app's cleanup (upstream pools, Redis) as long again: the whole stop stays
# within the grace plus one second (README "Stop, reload, workers").
ABORT_WAIT = 0.25
CLEANUP_WAIT = 0.25


class GuardedServer(web.Server):
    """``web.Server`` that makes :class:`GuardedRequestHandler` connections, all
    watched by one :class:`SendWatch`, and stops within a deadline (see the
    module docstring)."""

    def __init__(
        self,
        handler: Any,
        *,
        head_timeout: float,
        send_timeout: float,
        observer: Observer | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.head_timeout = head_timeout
        self.send_watch = SendWatch(send_timeout)
        self.observer = observer
        self.stop_began: float | None = None
        self.finished = 0  # connections that ended by themselves while stopping
        self.cut = 0  # requests still running at the deadline, aborted

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(
            self,
            loop=self._loop,
            head_timeout=self.head_timeout,
            send_watch=self.send_watch,
            observer=self.observer,
            **self._kwargs,
        )

    def guarded(self) -> list[GuardedRequestHandler]:
        return [c for c in self._connections if isinstance(c, GuardedRequestHandler)]

    def pre_shutdown(self) -> None:
        """The listeners are closed (aiohttp calls this right after): the
        grace starts now. No connection takes another request; idle ones close."""
        self.stop_began = self._loop.time()
        super().pre_shutdown()
        for conn in self.guarded():
            if not conn.busy:
                conn.force_close()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Let the requests in flight run for up to ``timeout`` seconds from
        :meth:`pre_shutdown` (``None``: as long as they take), then abort every
        connection still open."""
        conns = self.guarded()
        if timeout is not None:
            began = self.stop_began if self.stop_began is not None else self._loop.time()
            deadline: float | None = began + timeout
        else:
            deadline = None
        left = await _wait_ended(conns, deadline)
        self.finished = len(conns) - len(left)
        self.cut = sum(1 for conn in left if conn.busy)
        for conn in left:
            conn.abort()
        if left:
            await _wait_ended(left, self._loop.time() + ABORT_WAIT)
        self._connections.clear()


async def _wait_ended(
    conns: list[GuardedRequestHandler], deadline: float | None
) -> list[GuardedRequestHandler]:
    """Wait until every connection ended or ``deadline`` (loop time) passed;
    return those still open."""
    pending = {conn.ended(): conn for conn in conns}
    if pending:
        loop = asyncio.get_running_loop()
        timeout = None if deadline is None else max(0.0, deadline - loop.time())
        await asyncio.wait(pending, timeout=timeout)
    return [conn for future, conn in pending.items() if not future.done()]


class ProxyRunner(web.AppRunner):
    """``web.AppRunner`` for the proxy: slow-client bounds and the stop's grace
    (``shutdown_grace_seconds``) from ``server`` settings.

    Extra keyword arguments go to aiohttp's server as with ``AppRunner``
    (``handler_cancellation``, ``server_options()``).
    """

    def __init__(self, app: web.Application, server: ServerSettings, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", server.keepalive_timeout)
        super().__init__(app, shutdown_timeout=server.shutdown_grace_seconds, **kwargs)
        self.head_timeout = server.header_timeout
        self.send_timeout = server.send_timeout
        self.grace = server.shutdown_grace_seconds

    @property
    def server(self) -> GuardedServer | None:
        server = super().server
        return server if isinstance(server, GuardedServer) else None

    async def shutdown(self) -> None:
        """The app's ``on_shutdown`` hooks (open WebSockets get 1001), within
        the grace: aiohttp runs them between closing the listeners and
        waiting for the requests in flight."""
        server = self.server
        began = server.stop_began if server is not None else None
        if began is None:
            await super().shutdown()
            return
        try:
            async with asyncio.timeout_at(began + self.grace):
                await super().shutdown()
        except TimeoutError:
            log.warning("the shutdown hooks outlasted the grace; what is left is aborted")

    async def _cleanup_server(self) -> None:
        """The app's cleanup (upstream pools, Redis), bounded: the process
        exits next, and the stop has its deadline to keep."""
        try:
            async with asyncio.timeout(CLEANUP_WAIT):
                await super()._cleanup_server()
        except TimeoutError:
            log.warning("the app's cleanup took over %gs; leaving the rest to exit", CLEANUP_WAIT)

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            head_timeout=self.head_timeout,
            send_timeout=self.send_timeout,
            observer=self._app.get(OBSERVER),
            **plain._kwargs,
        )
