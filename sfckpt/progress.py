"""A one-line progress bar on stderr: done/total, rate and ETA, never wider than the terminal.

click's progressbar estimates the ETA from the time per `update()` call
averaged over its first calls, which on a streamed checkpoint (a few huge
tensors after many small ones) gave "1d 18:48:24" for a job of seconds, and its
line did not fit 80 columns. Here the ETA is the bytes left over the recent
bytes per second, measured from the first update (so start-up time before any
data moved does not count) over the last few seconds, and shown only once
there is a rate to trust.
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from typing import Callable, TextIO

from .textout import terminal

MIN_ELAPSED = 0.5  # seconds of measurement before a rate (and so an ETA) is shown
WINDOW = 5.0  # seconds of history the rate is measured over
REFRESH = 0.1  # seconds between redraws


def _size(n: float) -> tuple[float, str]:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return n, unit
        n /= 1000
    return n, "GB"


def _amount(done: float, total: float, unit: str) -> str:
    """`0.45/1.07 GB` for bytes (both in the total's unit), `3/50 batches` otherwise."""
    if unit != "bytes":
        return f"{int(done)}/{int(total)} {unit}"
    scaled, name = _size(total)
    factor = scaled / total if total else 1.0
    digits = 0 if name == "B" else (1 if scaled >= 100 else 2)
    return f"{done * factor:.{digits}f}/{scaled:.{digits}f} {name}"


def _rate(per_second: float, unit: str) -> str:
    if unit != "bytes":
        return f"{per_second:.1f} {unit}/s"
    scaled, name = _size(per_second)
    return f"{scaled:.0f} {name}/s" if scaled >= 10 else f"{scaled:.1f} {name}/s"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def render(label: str, done: float, total: float, elapsed: float, width: int, unit: str = "bytes",
           per_second: float | None = None) -> str:
    """One progress line of at most `width - 1` characters (the last column is left free so that
    no terminal wraps it). `per_second` is the measured rate, None while there is none to trust."""
    done = min(done, total)
    fraction = done / total if total else 1.0
    rate = _rate(per_second, unit) if per_second else ""
    if done >= total:
        eta = f"in {_duration(elapsed)}"
    else:
        eta = f"ETA {_duration((total - done) / per_second)}" if per_second else "ETA --:--"
    tail = "  ".join(p for p in (f"{fraction * 100:3.0f}%", _amount(done, total, unit), rate, eta) if p)
    room = width - 1 - len(label) - len(tail) - 4  # label, " [", "] ", tail
    if room >= 10:
        bar_width = min(room, 20)
        filled = int(bar_width * fraction)
        line = f"{label} [{'#' * filled}{'-' * (bar_width - filled)}] {tail}"
    else:
        line = f"{label} {tail}"
    return line[: width - 1]


def terminal_width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 80


class Progress:
    """`update(n)` adds n done; redraws at most every REFRESH seconds with `\\r`; `close()` ends the line."""

    def __init__(self, label: str, total: float, unit: str = "bytes", stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        # the line is drawn on the stream directly, not through textout.echo
        self.label, self.total, self.unit = terminal(label), total, unit
        self.stream = stream or sys.stderr
        self.clock = clock
        self.start = clock()
        self.done = 0.0
        self.drawn_at: float | None = None
        self.samples: deque[tuple[float, float]] = deque()  # (time, done) since the first update
        self.width = terminal_width(self.stream)

    def update(self, n: float) -> None:
        now = self.clock()
        if not self.samples:
            self.samples.append((now, self.done))  # the clock starts when data starts moving
        self.done += n
        if self.drawn_at is None or now - self.drawn_at >= REFRESH:
            self._draw(now)

    def show(self) -> None:
        """Draw the line at 0% now, before the first update: a first tensor of a GB leaves no blank screen.
        The rate's clock still starts at the first update."""
        self._draw(self.clock())

    def rate(self, now: float) -> float | None:
        """Units per second over the last WINDOW seconds, or None before MIN_ELAPSED of measurement."""
        while len(self.samples) > 1 and now - self.samples[1][0] >= WINDOW:
            self.samples.popleft()
        if not self.samples or now - self.samples[0][0] < MIN_ELAPSED:
            return None
        then, done_then = self.samples[0]
        return (self.done - done_then) / (now - then) or None

    def _draw(self, now: float) -> None:
        per_second = self.rate(now)
        if self.samples:
            self.samples.append((now, self.done))
        line = render(self.label, self.done, self.total, now - self.start, self.width, self.unit, per_second)
        self.stream.write("\r" + line.ljust(self.width - 1))
        self.stream.flush()
        self.drawn_at = now

    def close(self) -> None:
        if self.drawn_at is not None or self.done:
            self._draw(self.clock())
            self.stream.write("\n")
            self.stream.flush()
