"""Progress of long loops of known length (evaluation's encoding and ITM scoring loops; issue 15).

On a terminal a `tqdm` bar (shown once the loop has run `Progress.bar_delay_s`); otherwise (a log file, CI,
nohup) plain lines on stderr, never stdout (stdout carries the results a caller may parse):

    [retrieval: ITM all pairs] 12800/50000 26% 1065.3 pairs/s ETA 35s

at most every `Progress.interval_s` seconds (10 s) and only when the loop advanced by a tenth of its total since
the last line (or `6 x interval_s` passed), plus a closing `... done in 47s` line when any line was printed.
A loop shorter than `interval_s` prints nothing. The module imports only the standard library and tqdm, so
every layer (train/, tasks/, the CLI helpers) can use it.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Optional, TextIO

from tqdm.auto import tqdm


def format_eta(seconds: float) -> str:
    """A duration as `42s`, `3m05s` or `1h02m05s` (rounded to the second; negative or unknown = `?`)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Report `done`/`total` of one loop phase: `update(n)` after each chunk, `close()` at the end (or use it
    as a context manager).

    Args:
        phase: what the loop does, e.g. "retrieval: encode images" (the bar's label, the lines' prefix).
        total: units of work the loop will do (images, texts, pairs); <= 0 reports nothing.
        enabled: False = silent (no bar, no line, no clock read).
        unit: the name of a unit of work, for the rate ("pairs" -> `1065.3 pairs/s`).
        stream: where to report (default: `sys.stderr` at construction); a bar when it is a terminal.
        clock: time source in seconds (`time.monotonic`; replaceable in tests).
    """

    interval_s: float = 10.0  # plain lines: the least time between two lines
    fraction: float = 0.1  # ... and the least progress between two lines (or 6 x interval_s of time)
    bar_delay_s: float = 2.0  # a terminal bar appears only for a loop that has run this long

    def __init__(self, phase: str, total: int, *, enabled: bool = True, unit: str = "it",
                 stream: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.phase, self.total, self.unit, self.clock = phase, int(total), unit, clock
        self.enabled = bool(enabled) and self.total > 0
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.lines = 0  # plain lines printed so far
        self._bar: Any = None
        self._closed = not self.enabled
        if not self.enabled:
            return
        self.start = self._last_time = clock()
        self._last_done = 0
        isatty = getattr(self.stream, "isatty", None)
        if callable(isatty) and isatty():
            self._bar = tqdm(total=self.total, desc=phase, unit=unit, file=self.stream, leave=False,
                             dynamic_ncols=True, delay=self.bar_delay_s)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def line(self, now: float) -> str:
        """The plain line at time `now`: done/total, percent, rate and ETA (or, when complete, the duration)."""
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else math.nan
        head = f"[{self.phase}] {self.done}/{self.total} {100 * self.done // self.total}% {rate:.1f} {self.unit}/s"
        if self.done >= self.total:
            return f"{head} done in {format_eta(elapsed)}"
        eta = (self.total - self.done) / rate if rate > 0 else math.nan
        return f"{head} ETA {format_eta(eta)}"

    def update(self, n: int = 1) -> None:
        """`n` more units done; prints a line when it is due (see the module docstring)."""
        if self._closed:
            return
        self.done = min(self.total, self.done + int(n))
        if self._bar is not None:
            self._bar.update(int(n))
            if self.done >= self.total:
                self.close()
            return
        now = self.clock()
        if self.done >= self.total:
            self.close(now)
            return
        since = now - self._last_time
        advanced = self.done - self._last_done >= self.fraction * self.total
        if since >= self.interval_s and (advanced or since >= 6 * self.interval_s):
            self._print(now)

    def close(self, now: Optional[float] = None) -> None:
        """End the phase: the bar disappears; in line mode a closing line when the loop is complete and either
        printed a line before or took `interval_s` or longer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            return
        now = self.clock() if now is None else now
        if self.done >= self.total and (self.lines or now - self.start >= self.interval_s):
            self._print(now)

    def _print(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)
        self.lines += 1
        self._last_time, self._last_done = now, self.done
