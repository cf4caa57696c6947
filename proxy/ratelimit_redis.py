"""Token buckets in Redis, shared by every process and machine that uses it.

Imported only when ``rate_limit.storage`` is a ``redis://`` (``rediss://``,
``unix://``) URL; needs the ``redis`` extra (``pip install oaimux[redis]``).

One request is one ``EVALSHA`` of :data:`SCRIPT` (``EVAL`` when the server
answers ``NOSCRIPT``, e.g. after a restart or ``SCRIPT FLUSH``). The script
reads the bucket, decides and writes it back atomically, so concurrent
requests from any number of proxies can never both spend the last token
(no read-modify-write race). It is the same arithmetic as ratelimit.py's
:func:`~proxy.ratelimit.take_token`, in microseconds.

The clock is Redis's own ``TIME``, read inside the script: with several
machines, each with its own clock, a bucket written by one and read by
another would gain or lose tokens by their skew; one Redis is one clock.
(Scripts may call ``TIME`` since Redis 5 replicates their effects, not the
script; on 3.2-4 the script asks for that mode itself.)

Each bucket key expires when the bucket would be full again (``PX`` of the
time to full), so idle clients vanish from Redis by themselves.

Failures never stall a request: sockets time out after ``timeout`` seconds
(0.25 by default), the whole call after ``deadline``, nothing is retried, and
after a connection failure Redis is not tried again for ``cooldown`` seconds:
every failure raises :class:`~proxy.ratelimit.StorageUnavailable`, and the
caller (admission.py) fails open or closed. Options in the URL's query
(``?socket_timeout=0.5``) override these defaults.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .config import RateLimitSettings
from .ratelimit import Decision, StorageUnavailable

__all__ = ["KEY_PREFIX", "SCRIPT", "RedisRateLimiter"]

KEY_PREFIX = "oaimux:rl:"
US = 1_000_000

# KEYS[1]: the bucket. ARGV[1]: burst. ARGV[2]: microseconds per token.
# Stored value: the time (µs, Redis clock) at which the bucket is full again.
# Returns {allowed 0/1, remaining, retry_after_us, reset_after_us}.
# Numbers are Lua doubles: exact for integers below 2^53 (µs since 1970 are
# ~2^51); string.format keeps every digit where tostring would round to 14.
SCRIPT = """\
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local burst = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local stored = redis.call('GET', KEYS[1])
local debt = 0
if stored then
  debt = tonumber(stored) - now
  if debt < 0 then debt = 0 end
end
if debt <= (burst - 1) * interval then
  debt = debt + interval
  redis.call('SET', KEYS[1], string.format('%.0f', now + debt),
             'PX', math.max(1, math.ceil(debt / 1000)))
  return {1, burst - math.ceil(debt / interval), 0, debt}
end
return {0, 0, debt - (burst - 1) * interval, debt}
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts so


def interval_us(limit: RateLimitSettings) -> int:
    """Microseconds one token takes to refill (at least 1)."""
    return max(1, round(60 * US / limit.requests_per_minute))


class RedisRateLimiter:
    """Buckets in Redis at ``url``; see the module docstring for the guarantees.

    Creating it does no I/O: connections are opened on first use, so a proxy
    starts (and fails open or closed) even while Redis is down.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.25,
        deadline: float = 1.0,
        cooldown: float = 1.0,
        max_connections: int = 128,
    ) -> None:
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
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

    def start(self) -> None:
        """Nothing to start: connections open on demand."""

    async def acquire(self, key: str, limit: RateLimitSettings) -> Decision:
        if self._down_until:
            if time.monotonic() < self._down_until:
                raise StorageUnavailable(self._down_reason)
            self._down_until = 0.0
        args = (KEY_PREFIX + key, limit.burst, interval_us(limit))
        try:
            async with asyncio.timeout(self._deadline):
                try:
                    reply = await self._redis.evalsha(SCRIPT_SHA, 1, *args)
                except NoScriptError:
                    reply = await self._redis.eval(SCRIPT, 1, *args)
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
            reason = _describe(exc, self._deadline)
            # Do not queue every request behind a dead server: skip it for a moment.
            self._down_until = time.monotonic() + self._cooldown
            self._down_reason = f"{reason} (retrying within {self._cooldown:g}s)"
            raise StorageUnavailable(reason) from exc
        except RedisError as exc:  # e.g. OOM, READONLY replica, a script error
            raise StorageUnavailable(_describe(exc, self._deadline)) from exc
        allowed, remaining, retry_us, reset_us = reply
        return Decision(bool(allowed), int(remaining), retry_us / US, reset_us / US)

    async def close(self) -> None:
        await self._redis.aclose()
        await self._pool.aclose()


def _describe(exc: BaseException, deadline: float) -> str:
    """What went wrong, for the log; never the URL (it may hold a password)."""
    if isinstance(exc, TimeoutError) and not isinstance(exc, RedisError):
        return f"redis: no answer within {deadline:g}s"
    text = str(exc).strip() or type(exc).__name__
    return f"redis: {type(exc).__name__}: {text[:200]}"
