"""The least a token budget must do per request, written flat, timed in a loop.

    python -m bench.token_floor             # 200,000 requests, best of 5
    python -m bench.token_floor --json

The proxy's token path (README: Token budgets) costs ~42k instructions a
request (bench/README.md, "Token budget: the path collapsed"). This measures
the floor that figure is held against: the same steps with nothing around
them, in one function, on the same interpreter. The same floor put inside the
proxy is bench/token_floor_inline.patch (bench/README.md, "Token budget: the
floor inside the proxy"): about as many instructions, run at a fifth of this
loop's pace. Reserve an estimate in two windows (a
dict lookup, the drain since the last request, a fit check, the store), write
the two ``x-oaimux-ratelimit-*-tokens`` headers into a ``CIMultiDict``, read
the usage from a compact OpenAI answer's tail (one ``rfind``, one match, two
``int()``), and refund the difference. No tokenizer, no JSON parse, no
request bucket, no Redis. It prints µs per request, less the ``CIMultiDict``
made anyway for every answer.

A warm loop on one key: caches stay hot, so inside the proxy the same steps
cost more (about five times as much: see the inline patch above). The figure
is the least the work could cost, not what it costs in a request.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import timeit

from multidict import CIMultiDict, istr

__all__ = ["floor_us", "main"]

_REMAINING = istr("x-oaimux-ratelimit-remaining-tokens")
_RESET = istr("x-oaimux-ratelimit-reset-tokens")
_COMPACT = re.compile(
    rb'"usage":\{"prompt_tokens":(\d+),"completion_tokens":(\d+)(?:,"total_tokens":\d+)?\}'
)
_TAIL = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},'
    b'"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}'
)
_CAPACITY = 10**12  # the bench's --token-limit budget: per minute and per day
_DRAIN_MINUTE = _CAPACITY / 60e9  # tokens per ns
_DRAIN_DAY = _CAPACITY / 86_400e9


def _one_request(buckets: dict[str, list[float]], key: str, body_len: int) -> CIMultiDict[str]:
    estimate = -(-body_len // 4) + 1024  # the prompt, and the default output reservation
    now = time.monotonic_ns()
    state = buckets.get(key)
    if state is None:
        minute = day = 0.0
        state = buckets[key] = [0.0, 0.0, float(now)]
    else:
        elapsed = now - state[2]
        minute = max(0.0, state[0] - elapsed * _DRAIN_MINUTE)
        day = max(0.0, state[1] - elapsed * _DRAIN_DAY)
    minute += estimate
    day += estimate
    if minute > _CAPACITY or day > _CAPACITY:
        raise RuntimeError("the floor's budget never refuses")
    state[0], state[1], state[2] = minute, day, float(now)
    headers: CIMultiDict[str] = CIMultiDict()
    headers[_REMAINING] = str(int(_CAPACITY - minute))
    headers[_RESET] = "1ms"
    found = _COMPACT.match(_TAIL, _TAIL.rfind(b'"usage"'))
    assert found is not None
    used = int(found[1]) + int(found[2])
    state[0] += used - estimate
    state[1] += used - estimate
    return headers


def _answer_only() -> CIMultiDict[str]:
    return CIMultiDict()


def floor_us(requests: int = 200_000, repeat: int = 5) -> float:
    """µs per request of the flat token path, best of ``repeat`` loops."""
    buckets: dict[str, list[float]] = {}
    key = "ip:127.0.0.1|global"

    def step() -> None:
        _one_request(buckets, key, 80)

    path = min(timeit.repeat(step, number=requests, repeat=repeat)) / requests
    base = min(timeit.repeat(_answer_only, number=requests, repeat=repeat)) / requests
    return (path - base) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    us = floor_us(args.requests, args.repeat)
    if args.json:
        print(json.dumps({"token_floor_us_per_request": us}))
    else:
        print(f"the flat token path: {us:.2f} µs a request (warm loop, one key)")


if __name__ == "__main__":
    main()
