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
    return _batch_ms(fn, args, reps)


def _check_batching(reps, warmup, batch_ms, max_calls) -> None:
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be an int >= 1, got {reps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1 (the last warm-up call sizes the batches), got {warmup!r}")
    if not batch_ms > 0 or isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1:
        raise ValueError(f"batch_ms must be > 0 and max_calls an int >= 1, got batch_ms={batch_ms!r}, "
                         f"max_calls={max_calls!r}")


def _sync_ms(fn, args) -> float:
    """Milliseconds of one synchronized call."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) * 1e3


def _batch_size(fn, args, warmup: int, batch_ms: float, max_calls: int) -> int:
    """Warm up; the last warm-up call's time sizes a batch to about `batch_ms` (1 to `max_calls` calls)."""
    for _ in range(warmup - 1):
        jax.block_until_ready(fn(*args))
    return max(1, min(max_calls, int(batch_ms // max(_sync_ms(fn, args), 1e-3))))


def _batch_ms(fn, args, calls: int) -> float:
    """Mean milliseconds per call of `calls` calls queued back to back, synchronized once at the end."""
    t0 = time.perf_counter()
    out = None
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) * 1e3 / calls


def device_ms(fn, *args, warmup: int = 3, reps: int = 10, batch_ms: float = 50.0, max_calls: int = 100) -> float:
    """Device milliseconds of one call of `fn(*args)`: the median over `reps` batches of the mean time of a batch of
    calls queued back to back and synchronized once at its end.

    A batch holds enough calls to last about `batch_ms` (at most `max_calls`; one call where a single call is
    longer), so the host's enqueue and synchronization, paid once per batch, are spread over its calls: on the
    GPU machine they take 0.3 ms or more per call, which :func:`median_ms` adds to every call (a kernel whose `ncu`
    duration was 1.37-1.39 ms measured 1.7-2.2 ms there, and 1.55-1.60 ms this way). For calls far longer than
    that the two agree.
    """
    _check_batching(reps, warmup, batch_ms, max_calls)
    calls = _batch_size(fn, args, warmup, batch_ms, max_calls)
    return statistics.median(_batch_ms(fn, args, calls) for _ in range(reps))


def interleaved_ms(cases: dict, *, reps: int = 5, warmup: int = 3, batch_ms: float = 50.0, max_calls: int = 100,
                   sync: bool = True) -> dict:
    """Device and synchronized milliseconds of several calls, timed in interleaved rounds.

    Args:
      cases: name -> (fn, args). Each is warmed up and its batch sized as in :func:`device_ms`.
      reps: rounds. Each round times one batch of every case (and, with `sync`, one synchronized call of each),
        so that a slow stretch of the GPU (this one is power-capped: its clocks moved between 1.3 and 2.0 GHz
        within minutes) weighs on every case alike instead of on whichever ran then. Round r starts at the r-th
        case and wraps around, so no case always follows the same (say, a heavy) one.

    Returns:
      name -> {"ms": median over rounds of the batch means, "ms_sync": median of the synchronized calls (with
      `sync`), "rounds": each round's batch mean, "calls": calls per batch}.
    """
    _check_batching(reps, warmup, batch_ms, max_calls)
    if not cases:
        raise ValueError("cases is empty: nothing to time")
    calls = {name: _batch_size(fn, args, warmup, batch_ms, max_calls) for name, (fn, args) in cases.items()}
    rounds = {name: [] for name in cases}
    syncs = {name: [] for name in cases}
    names = list(cases)
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, args = cases[name]
            rounds[name].append(_batch_ms(fn, args, calls[name]))
            if sync:
                syncs[name].append(_sync_ms(fn, args))
    out = {}
    for name in cases:
        out[name] = {"ms": statistics.median(rounds[name]), "rounds": rounds[name], "calls": calls[name]}
        if sync:
            out[name]["ms_sync"] = statistics.median(syncs[name])
    return out


def write_json(path: str | None, args, rows: list) -> None:
    """A benchmark's rows as JSON with the device, jax version, date and arguments (nothing when path is None)."""
    if not path:
        return
    import datetime
    import json

    with open(path, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": str(datetime.date.today()),
                   "args": vars(args), "rows": rows}, f, indent=2)
