"""Where a training step's time goes: `PhaseClock`, set on `Trainer.phase_clock` by `vlp bench train`.

Training runs without a clock (`Trainer.phase_clock = None`): no device synchronisation, no timing. With a
clock, `Trainer.train_step` synchronises the device at each phase boundary (CUDA kernels run asynchronously:
without the sync a phase's kernels would be billed to the next phase) and adds the seconds since the previous
boundary to the phase just finished: "forward", "backward", "optimizer".
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch


class PhaseClock:
    """Seconds spent in named phases, summed over laps.

    `start()` marks a boundary; `lap(name)` adds the time since the last boundary to `seconds[name]` and marks a
    new one. On CUDA both synchronise `device` first; on CPU they only read the clock (work is synchronous).
    `clock` is the time source (seconds; `time.perf_counter`, replaceable in tests)."""

    def __init__(self, device: torch.device | str = "cpu", clock: Callable[[], float] = time.perf_counter) -> None:
        self.device = torch.device(device)
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self._last: Optional[float] = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.clock()

    def start(self) -> None:
        """Mark a phase boundary without billing the time since the previous one (e.g. between two steps)."""
        self._last = self._now()

    def lap(self, name: str) -> None:
        """Bill the time since the last boundary to phase `name`; a RuntimeError before `start()`."""
        if self._last is None:
            raise RuntimeError(f"PhaseClock.lap({name!r}) before start(): call start() at the first boundary")
        now = self._now()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def _no_lap(name: str) -> None:
    """The lap of a step timed by no clock: nothing."""


def step_laps(clock: Optional[PhaseClock]) -> Callable[[str], None]:
    """`clock.lap` after starting the clock, or a no-op (no sync, no clock read) when `clock` is None."""
    if clock is None:
        return _no_lap
    clock.start()
    return clock.lap
