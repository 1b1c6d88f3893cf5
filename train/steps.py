"""Training loops that read each step's results one step late.

`float(loss)` right after a jitted step waits for the device, and the host then prepares and dispatches the next
step while the device sits idle: on the GPU machine each such round trip costs 0.3–1.2 ms, a tenth of a 16k gate
distillation step. Reading step i's loss after step i + 1 is dispatched keeps the device busy.
"""

from __future__ import annotations

import time
from typing import Callable


class LaggedSteps:
    """Calls `on_step(done, loss, seconds)` for every step, in order, one step late.

    `push(done, loss)` takes the device scalar of step `done` right after that step is dispatched and hands on the
    previous step. `flush()` hands on the pending step now: call it before a checkpoint (so that a checkpoint never
    holds a step whose loss was not checked and logged) and at the end. `seconds` is the time since the previous
    step was handed on: in steady state, the device's time per step.
    """

    def __init__(self, on_step: Callable[[int, float, float], None]):
        self._on_step = on_step
        self._pending = None
        self._last = time.perf_counter()

    def push(self, done: int, loss) -> None:
        self.flush()
        self._pending = (done, loss)

    def flush(self) -> None:
        if self._pending is None:
            return
        done, loss = self._pending
        self._pending = None
        value = float(loss)  # waits for that step only
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self._on_step(done, value, seconds)
