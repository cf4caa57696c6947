"""A lean HTTP/1.1 client for the hot path: pooled keep-alive connections per
upstream. It knows nothing of routes, exchanges or the proxy's errors.

Why not ``aiohttp.ClientSession.request``: profiles of the proxy (bench/README.md)
put about 300 µs of the 530 µs a small request cost in that call's machinery
(URL objects, request and response objects built for features a pass-through
never uses: cookies, redirects, tracing, auto-headers, decompression). Here a
request is one preformatted head and one ``write``.

What is *not* hand-written: parsing and framing of the response and flow
control of its body are aiohttp's own, through its client protocol
(``ResponseHandler``, the llhttp C parser, ``StreamReader``). The idle bound
between body chunks is the pool's (``IdleWatch``: one timer for all streams).
The discovery and realtime WebSocket paths keep using the ``ClientSession``.

Contract of :meth:`UpstreamPool.request`:

- It returns once the response head is in (1xx interim answers skipped), or
  raises :class:`UpstreamFailure` naming what went wrong before any response
  byte: ``connect`` (refused, unreachable, DNS, TLS), ``connect_timeout``,
  ``disconnected`` (closed before a response), ``bad_response`` (not HTTP),
  ``reset`` (any other socket error).
- Its :class:`Destination` (origin and timeouts, made once per upstream) says
  where; its ``response_timeout`` bounds the whole call (connect to headers)
  and raises ``TimeoutError``; cancelling the call aborts the connection,
  never pools it.
- The caller must end every :class:`UpstreamResponse` with ``release()`` (the
  body was read to its end: the connection may be reused) or ``close()``
  (anything else: the connection is aborted, so the upstream stops at once).

Modules, each importing only those below it:

- ``pool``: :class:`UpstreamPool`, :class:`Destination` and :class:`UpstreamResponse`;
- ``timers``: one timer for many bounds (response deadlines, idle watch);
- ``connection``: :class:`Origin`, aiohttp's client protocol adapted to the
  pool (the only user of aiohttp's private client names), the request writers;
- ``failures``: :class:`UpstreamFailure`, its kinds and their words.
"""

from .connection import Origin
from .failures import UpstreamFailure
from .pool import Destination, UpstreamPool, UpstreamResponse

__all__ = ["Destination", "Origin", "UpstreamFailure", "UpstreamPool", "UpstreamResponse"]
