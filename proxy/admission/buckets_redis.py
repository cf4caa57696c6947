"""Token buckets in Redis, shared by every process and machine that uses it.

Imported only when ``rate_limit.storage`` is a ``redis://`` (``rediss://``,
``unix://``) URL; needs the ``redis`` extra (``pip install oaimux[redis]``).

One request is one ``EVALSHA`` of redis_scripts.py's ``SCRIPT`` (``EVAL``
when the server answers ``NOSCRIPT``, e.g. after a restart or ``SCRIPT
FLUSH``). The script reads the bucket, decides and writes it back
atomically, so concurrent requests from any number of proxies can never both
spend the last token (no read-modify-write race). It is the same arithmetic
as buckets.py's :func:`~proxy.admission.buckets.take_token`, in
microseconds. A request with a token budget is one ``TOKENS_SCRIPT``
instead: the request bucket and the token buckets decided and charged
together, all or nothing; the end of its answer is another call of it,
queued without waiting.

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
import time
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config.settings import RateLimitSettings, TokenBudget
from .buckets import Decision, Reserved, StorageUnavailable
from .redis_scripts import SCRIPT, SCRIPT_SHA, TOKENS_SCRIPT, TOKENS_SHA

__all__ = ["KEY_PREFIX", "TOKENS_SUFFIX", "RedisRateLimiter"]

KEY_PREFIX = "oaimux:rl:"
TOKENS_SUFFIX = "|tokens"  # a client's token buckets: its request bucket's key and this
US = 1_000_000


def interval_us(limit: RateLimitSettings) -> int:
    """Microseconds one token takes to refill (at least 1)."""
    return max(1, round(60 * US / limit.requests_per_minute))


# (script sha, script, keys, args, waiter for the reply; None: nobody waits)
_Pending = tuple[str, str, tuple[str, ...], tuple[int | str, ...], "asyncio.Future[Any] | None"]


def _fail(pending: list[_Pending], exc: StorageUnavailable) -> None:
    for call in pending:
        waiter = call[4]
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


class RedisRateLimiter:
    """Buckets in Redis at ``url``; see the module docstring for the guarantees.

    Requests are queued and one sender task pipelines them (see the module
    docstring), so it never needs more than a couple of connections.
    Reconciliations (:meth:`settle`) join the same queue without waiting, so
    they reach Redis before any reservation queued after them.

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
        self.settles_lost = 0  # reconciliations that never reached Redis

    def start(self) -> None:
        """Nothing to start: the connection opens on demand."""

    async def acquire(self, key: str, limit: RateLimitSettings) -> Decision:
        allowed, remaining, retry_us, reset_us = await self._call(
            SCRIPT_SHA, SCRIPT, (KEY_PREFIX + key,), (limit.burst, interval_us(limit))
        )
        return Decision(bool(allowed), int(remaining), retry_us / US, reset_us / US)

    async def reserve(
        self,
        key: str,
        limit: RateLimitSettings | None,
        budget: TokenBudget,
        estimate: int,
    ) -> Reserved:
        burst, interval = (0, 1) if limit is None else (limit.burst, interval_us(limit))
        cap_m, cap_d = budget.cap_minute, budget.cap_day
        reply = await self._call(
            TOKENS_SHA,
            TOKENS_SCRIPT,
            (KEY_PREFIX + key, KEY_PREFIX + key + TOKENS_SUFFIX),
            ("reserve", burst, interval, cap_m, cap_d, min(estimate, cap_m),
             min(estimate, cap_d), 0 if budget.enforce else 1),
        )  # fmt: skip
        allowed, remaining, retry_us, reset_us, fits = (int(v) for v in reply[:5])
        decision = None
        if limit is not None:
            decision = Decision(bool(allowed), remaining, retry_us / US, reset_us / US)
        return (
            decision,
            float(reply[5]),
            float(reply[6]),
            float(reply[7]),
            float(reply[8]),
            bool(fits) and bool(allowed),
            None,
        )

    def settle(self, key: str, budget: TokenBudget, deltas: tuple[int, int]) -> None:
        if self._down_until and time.monotonic() < self._down_until:
            self.settles_lost += 1
            return
        args = ("settle", budget.cap_minute, budget.cap_day, *deltas)
        self._enqueue((TOKENS_SHA, TOKENS_SCRIPT, (KEY_PREFIX + key + TOKENS_SUFFIX,), args, None))

    async def _call(
        self, sha: str, script: str, keys: tuple[str, ...], args: tuple[int | str, ...]
    ) -> Any:
        """Run one script through the queue; its raw reply."""
        if self._down_until:
            if time.monotonic() < self._down_until:
                raise StorageUnavailable(self._down_reason)
            self._down_until = 0.0
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue((sha, script, keys, args, waiter))
        try:
            async with asyncio.timeout(self._deadline):
                return await waiter
        except TimeoutError:
            raise StorageUnavailable(f"redis: no answer within {self._deadline:g}s") from None

    def _enqueue(self, call: _Pending) -> None:
        self._queue.append(call)
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(
                self._send_queued(), name="oaimux-redis-limiter"
            )

    async def _send_queued(self) -> None:
        """Pipeline whatever is queued, batch after batch, until the queue is empty."""
        try:
            while self._queue:
                batch = [
                    p for p in self._queue[: self.MAX_BATCH] if p[4] is None or not p[4].done()
                ]
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
                    self._lost(batch + self._queue)
                    _fail(batch, StorageUnavailable(reason))
                    _fail(self._queue, StorageUnavailable(reason))
                    self._queue.clear()
                    return
                except RedisError as exc:
                    self._lost(batch)
                    _fail(batch, StorageUnavailable(_describe(exc, self._deadline)))
                    continue
                for call, reply in zip(batch, replies, strict=True):
                    waiter = call[4]
                    if waiter is None:
                        if isinstance(reply, BaseException):
                            self.settles_lost += 1
                    elif waiter.done():
                        continue
                    elif isinstance(reply, BaseException):  # e.g. OOM, a READONLY replica
                        waiter.set_exception(StorageUnavailable(_describe(reply, 0)))
                    else:
                        waiter.set_result(reply)
        finally:
            self._sender = None

    def _lost(self, calls: list[_Pending]) -> None:
        self.settles_lost += sum(1 for call in calls if call[4] is None)

    async def _run(self, batch: list[_Pending]) -> list[Any]:
        """One pipeline of EVALSHA; the scripts Redis did not know go again as EVAL."""
        pipe = self._redis.pipeline(transaction=False)
        for sha, _, keys, args, _ in batch:
            pipe.evalsha(sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown:
            pipe = self._redis.pipeline(transaction=False)
            for i in unknown:
                _, script, keys, args, _ = batch[i]
                pipe.eval(script, len(keys), *keys, *args)
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
