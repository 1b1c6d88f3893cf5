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


def device_ms(fn, *args, warmup: int = 3, reps: int = 10, batch_ms: float = 50.0, max_calls: int = 100) -> float:
    """Device milliseconds of one call of `fn(*args)`: the median over `reps` batches of the mean time of a batch of
    calls queued back to back and synchronized once at its end.

    A batch holds enough calls to last about `batch_ms` (at most `max_calls`; one call where a single call is
    longer), so the host's enqueue and synchronization, paid once per batch, are spread over its calls: on the
    GPU machine they take ~0.1-0.3 ms per call, which :func:`median_ms` adds to every call (a 1.4 ms kernel
    measured 1.7 ms there; its `ncu` duration was 1.37 ms). For calls far longer than that the two agree.
    """
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be an int >= 1, got {reps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1 (the last warm-up call sizes the batches), got {warmup!r}")
    if not batch_ms > 0 or isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1:
        raise ValueError(f"batch_ms must be > 0 and max_calls an int >= 1, got batch_ms={batch_ms!r}, "
                         f"max_calls={max_calls!r}")
    for _ in range(warmup - 1):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = (time.perf_counter() - t0) * 1e3
    calls = max(1, min(max_calls, int(batch_ms // max(one, 1e-3))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)


def write_json(path: str | None, args, rows: list) -> None:
    """A benchmark's rows as JSON with the device, jax version, date and arguments (nothing when path is None)."""
    if not path:
        return
    import datetime
    import json

    with open(path, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": str(datetime.date.today()),
                   "args": vars(args), "rows": rows}, f, indent=2)
