"""Timing side by side: every function in turn, round after round, so a noisy machine slows all alike."""

from __future__ import annotations

import statistics
import time


def alternate(fns: dict, reps: int) -> dict:
    """Median seconds of each function, all timed in turn ``reps`` times after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}
