"""The cyclic garbage collector of a serving process (docs/decisions.md,
"The collector skips what start-up made and runs less often").

CPython's collector runs a pass over the youngest generation whenever the
container objects made outnumber those freed by its first threshold (700 by
default), and a full pass now and then. A proxy with many requests in flight
holds thousands of young objects at once, so with the default it ran a pass
every few dozen requests, each walking every in-flight request's objects, and
every full pass also walked everything start-up made (modules, the compiled
configuration), which lives as long as the process anyway.

:func:`tune_collector` runs once the app is built: one full pass, then
``gc.freeze()`` (what exists now is never walked again; each worker of
``--workers N`` does this for itself, once its app is built), and a first
threshold of :data:`YOUNG_THRESHOLD`. Garbage in reference cycles made after
start-up is still collected, a little later; what start-up left in cycles and
a reload replaces (the first runtime) stays, once.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "tune_collector"]

# A request makes and frees a few hundred containers; at 64 connections on the
# bench the allocations outran the frees by less than this between passes,
# so the young pass all but stopped running (docs/decisions.md, see above).
YOUNG_THRESHOLD = 20_000


def tune_collector() -> None:
    """Collect once, freeze what is left, and raise the first threshold."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
