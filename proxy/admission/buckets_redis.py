"""Token buckets in Redis, shared by every process and machine that uses it.

Imported only when ``rate_limit.storage`` is a ``redis://`` (``rediss://``,
``unix://``) URL; needs the ``redis`` extra (``pip install oaimux[redis]``).

One request is one ``EVALSHA`` of :data:`SCRIPT` (``EVAL`` when the server
answers ``NOSCRIPT``, e.g. after a restart or ``SCRIPT FLUSH``). The script
reads the bucket, decides and writes it back atomically, so concurrent
requests from any number of proxies can never both spend the last token
(no read-modify-write race). It is the same arithmetic as ratelimit.py's
:func:`~proxy.admission.buckets.take_token`, in microseconds.

The clock is Redis's own ``TIME``, read inside the script: with several
machines, each with its own clock, a bucket written by one and read by
another would gain or lose tokens by their skew; one Redis is one clock.
(Scripts may call ``TIME`` since Redis 5 replicates their effects, not the
script; on 3.2-4 the script asks for that mode itself.)

Each bucket key expires when the bucket would be full again (``PX`` of the
time to full), so idle clients vanish from Redis by themselves.

Requests waiting at the same moment share one round trip: one sender
pipelines their scripts (each still its own atomic script), so a flood costs
Redis a few round trips per event-loop turn, not one per request.

Failures never stall a request for long: sockets time out after ``timeout``
seconds (0.5 by default), a request waits at most ``deadline`` (2 s) for its
answer, nothing is retried, and after a connection failure Redis is not tried
again for ``cooldown`` seconds (1 s), so during an outage requests are
answered at once. Every failure raises
:class:`~proxy.admission.buckets.StorageUnavailable`, and the caller (admission.py)
fails open or closed. Why not shorter: a timeout also counts the time this
process's event loop is busy, and a flood of 500-1000 simultaneous requests
stretches one loop turn to a few hundred milliseconds (measured in the tests'
single-loop setup); a 0.25 s socket timeout then fired on a healthy Redis and
let the flood through unlimited. Options in the URL's query
(``?socket_timeout=0.25``) override these defaults.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config.settings import RateLimitSettings
from .buckets import Decision, StorageUnavailable

__all__ = ["KEY_PREFIX", "SCRIPT", "RedisRateLimiter"]

KEY_PREFIX = "oaimux:rl:"
US = 1_000_000

# KEYS[1]: the bucket. ARGV[1]: burst. ARGV[2]: microseconds per token.
# Stored value: the time (µs, Redis clock) at which the bucket is full again.
# Returns {allowed 0/1, remaining, retry_after_us, reset_after_us}.
# Numbers are Lua doubles: exact for integers below 2^53 (µs since 1970 are
# ~2^51); string.format keeps every digit where tostring would round to 14.
# A debt above this limit's ceiling (state written under an earlier config,
# by this proxy before a reload or by another one) is cut to it, and written
# back so the key expires when the cut bucket is full; see ratelimit.py.
SCRIPT = """\
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local burst = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local ceiling = burst * interval
local function store(debt)
  redis.call('SET', KEYS[1], string.format('%.0f', now + debt),
             'PX', math.max(1, math.ceil(debt / 1000)))
end
local stored = redis.call('GET', KEYS[1])
local debt = 0
local cut = false
if stored then
  debt = tonumber(stored) - now
  if debt < 0 then
    debt = 0
  elseif debt > ceiling then
    debt = ceiling
    cut = true
  end
end
if debt <= ceiling - interval then
  debt = debt + interval
  store(debt)
  return {1, burst - math.ceil(debt / interval), 0, debt}
end
if cut then store(debt) end
return {0, 0, debt - (ceiling - interval), debt}
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts so


def interval_us(limit: RateLimitSettings) -> int:
    """Microseconds one token takes to refill (at least 1)."""
    return max(1, round(60 * US / limit.requests_per_minute))


_Pending = tuple[str, int, int, "asyncio.Future[Decision]"]


def _fail(pending: list[_Pending], exc: StorageUnavailable) -> None:
    for _, _, _, waiter in pending:
        if not waiter.done():
            waiter.set_exception(exc)


class RedisRateLimiter:
    """Buckets in Redis at ``url``; see the module docstring for the guarantees.

    Requests are queued and one sender task pipelines them (see the module
    docstring), so it never needs more than a couple of connections.

    Creating it does no I/O: the connection opens on first use, so a proxy
    starts (and fails open or closed) even while Redis is down.
    """

    MAX_BATCH = 1024  # scripts per pipeline

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.5,
        deadline: float = 2.0,
        cooldown: float = 1.0,
    ) -> None:
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=4,  # one sender at a time; spares for reconnects
            timeout=deadline,  # waiting for a free pooled connection
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # never retry: the deadline is the budget
            health_check_interval=0,
            client_name="oaimux",
        )
        self._redis = Redis(connection_pool=self._pool)
        self._deadline = deadline
        self._cooldown = cooldown
        self._down_until = 0.0
        self._down_reason = ""
        self._queue: list[_Pending] = []
        self._sender: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Nothing to start: the connection opens on demand."""

    async def acquire(self, key: str, limit: RateLimitSettings) -> Decision:
        if self._down_until:
            if time.monotonic() < self._down_until:
                raise StorageUnavailable(self._down_reason)
            self._down_until = 0.0
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Decision] = loop.create_future()
        self._queue.append((KEY_PREFIX + key, limit.burst, interval_us(limit), waiter))
        if self._sender is None:
            self._sender = loop.create_task(self._send_queued(), name="oaimux-redis-limiter")
        try:
            async with asyncio.timeout(self._deadline):
                return await waiter
        except TimeoutError:
            raise StorageUnavailable(f"redis: no answer within {self._deadline:g}s") from None

    async def _send_queued(self) -> None:
        """Pipeline whatever is queued, batch after batch, until the queue is empty."""
        try:
            while self._queue:
                batch = [p for p in self._queue[: self.MAX_BATCH] if not p[3].done()]
                del self._queue[: self.MAX_BATCH]
                if not batch:
                    continue
                try:
                    async with asyncio.timeout(self._deadline):
                        replies = await self._run(batch)
                except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
                    reason = _describe(exc, self._deadline)
                    # Do not queue every request behind a dead server: skip it for a moment.
                    # Requests refused during the pause carry the same reason, so
                    # the outage reads as one state in the log (observe/failurelog.py).
                    self._down_until = time.monotonic() + self._cooldown
                    self._down_reason = reason
                    _fail(batch, StorageUnavailable(reason))
                    _fail(self._queue, StorageUnavailable(reason))
                    self._queue.clear()
                    return
                except RedisError as exc:
                    _fail(batch, StorageUnavailable(_describe(exc, self._deadline)))
                    continue
                for (_, _, _, waiter), reply in zip(batch, replies, strict=True):
                    if waiter.done():
                        continue
                    if isinstance(reply, BaseException):  # e.g. OOM, a READONLY replica
                        waiter.set_exception(StorageUnavailable(_describe(reply, 0)))
                    else:
                        allowed, remaining, retry_us, reset_us = reply
                        waiter.set_result(
                            Decision(bool(allowed), int(remaining), retry_us / US, reset_us / US)
                        )
        finally:
            self._sender = None

    async def _run(self, batch: list[_Pending]) -> list[Any]:
        """One pipeline of EVALSHA; the scripts Redis did not know go again as EVAL."""
        pipe = self._redis.pipeline(transaction=False)
        for key, burst, interval, _ in batch:
            pipe.evalsha(SCRIPT_SHA, 1, key, burst, interval)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown:
            pipe = self._redis.pipeline(transaction=False)
            for i in unknown:
                key, burst, interval, _ = batch[i]
                pipe.eval(SCRIPT, 1, key, burst, interval)
            for i, reply in zip(unknown, await pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        return replies

    async def close(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            try:
                await sender
            except asyncio.CancelledError:
                pass
        _fail(self._queue, StorageUnavailable("the rate limiter is closing"))
        self._queue.clear()
        await self._redis.aclose()
        await self._pool.aclose()


def _describe(exc: BaseException, deadline: float) -> str:
    """What went wrong, for the log; never the URL (it may hold a password)."""
    if isinstance(exc, TimeoutError) and not isinstance(exc, RedisError):
        return f"redis: no answer within {deadline:g}s"
    text = str(exc).strip() or type(exc).__name__
    return f"redis: {type(exc).__name__}: {text[:200]}"
