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


def pipelined_ms(fn, *args, warmup: int = 3, reps: int = 50) -> float:
    """Mean device milliseconds of `fn(*args)` for short calls: `reps` calls are queued back to back and
    synchronized once at the end, so the host's per-call dispatch and synchronization (tens of µs) overlap
    the device's work instead of adding to each call, as they do in :func:`median_ms`."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) * 1e3 / reps


def write_json(path: str | None, args, rows: list) -> None:
    """A benchmark's rows as JSON with the device, jax version, date and arguments (nothing when path is None)."""
    if not path:
        return
    import datetime
    import json

    with open(path, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": str(datetime.date.today()),
                   "args": vars(args), "rows": rows}, f, indent=2)
