"""The serving process's collector settings (proxy/server/collector.py)."""

from __future__ import annotations

import gc

from proxy.server.collector import YOUNG_THRESHOLD, tune_collector


def test_start_up_objects_are_frozen_and_the_young_pass_runs_less_often() -> None:
    before = gc.get_threshold()
    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        tune_collector()
        assert gc.get_freeze_count() > 1000  # at least this interpreter's own start-up
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:])
        # Cyclic garbage made afterwards is still collected.
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
