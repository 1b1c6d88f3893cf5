"""Timing for the GPU benchmark scripts."""

from __future__ import annotations

import statistics
import time

import jax


def median_ms(fn, *args, warmup: int = 3, reps: int = 10) -> float:
    """Median wall-clock milliseconds of `fn(*args)` after `warmup` calls, each run synchronized."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
