"""Where a trial's wall time goes: a timeline of its parts, for the benchmarks.

    timer = timing.Timeline()
    runner.run(config, out, timer=timer)
    timer.seconds()            # {"update": 812.0, "act": 40.1, "env": 95.3, ...}

The loop and the phase wrap each part in `timer(part)`: `build` (environments, agent and
replay), `init` (the agent's parameters), `act`, `env` (a batch step), `update` (sampling
and the update, which the loop waits for through its finiteness flag), `log`, `evaluate`,
`checkpoint`, `video`. A trial run without a timer uses `NO_TIMER`, which does nothing.
The timeline keeps every interval, so a benchmark can cut it where it likes (e.g. from the
first update on: steps per second once learning). Nothing here is written to a trial folder:
wall times differ run to run and the logs must not.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable, ContextManager, NamedTuple


class Interval(NamedTuple):
    part: str
    start: float
    """`time.perf_counter()` at its start."""
    seconds: float


class Timeline:
    """Intervals of named parts, in the order they ended; callable as `timer(part)`."""

    def __init__(self):
        self.intervals: list[Interval] = []
        self.created = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.intervals.append(Interval(part, start, time.perf_counter() - start))

    def seconds(self, since: float = float("-inf")) -> dict[str, float]:
        """Total seconds per part of the intervals that started at or after `since`."""
        totals: dict[str, float] = defaultdict(float)
        for interval in self.intervals:
            if interval.start >= since:
                totals[interval.part] += interval.seconds
        return dict(totals)

    def first(self, part: str) -> Interval | None:
        return next((i for i in self.intervals if i.part == part), None)


def _untimed(part: str) -> ContextManager:
    return contextlib.nullcontext()


NO_TIMER: Callable[[str], ContextManager] = _untimed
