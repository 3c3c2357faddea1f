"""Timing side by side: every function in turn, round after round, so a noisy machine slows all alike."""

from __future__ import annotations

import os
import statistics
import time


def alternate_rounds(fns: dict, reps: int) -> dict:
    """Seconds of each function in every round, ``{name: [reps floats]}``, timed in turn after a warm-up call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def alternate(fns: dict, reps: int) -> dict:
    """Median seconds of each function, all timed in turn ``reps`` times after one warm-up call each."""
    return {name: statistics.median(v) for name, v in alternate_rounds(fns, reps).items()}


def ratio_spread(times: dict, ours: str, reference: str) -> tuple[float, float, float]:
    """(smallest, median, largest) of the per-round ratios ``ours / reference`` of ``alternate_rounds``' times.

    Each round times both back to back, so a round's ratio sees the same load on the machine; the
    spread shows how much the ratio itself moves from round to round.
    """
    per_round = [a / b for a, b in zip(times[ours], times[reference])]
    return min(per_round), statistics.median(per_round), max(per_round)


def load_average() -> str:
    """The machine's 1-, 5- and 15-minute load averages (a figure measured on shared cores means little without it)."""
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - platforms without getloadavg
        return "load average unknown"
