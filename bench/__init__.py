"""oaimux's own benchmark: direct-to-mock vs nginx vs oaimux, interleaved, on loopback.

Run it with ``python -m bench`` (see bench/README.md). Nothing in this package is imported
by the proxy or collected by pytest; every module can be read on its own:

- ``mock_upstream`` - the fast mock OpenAI upstream (its own process).
- ``http1`` - a tiny HTTP/1.1 client (raw asyncio protocol) shared by the measurements.
- ``loadgen`` - non-streaming load: wrk with a Lua script, or a built-in asyncio generator.
- ``streams`` - SSE timing (TTFB, per-chunk delay, coalescing) and the hold/hang-up test.
- ``procfs`` - CPU time, RSS and peak RSS of process trees, read from /proc.
- ``peers`` - start/stop the mock, nginx and oaimux, pinned to cores.
- ``report`` - the one table of ratios against the goals, and the JSON results.
"""
