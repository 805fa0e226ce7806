"""How fast the service answers when it is busy: the time between two answered images.

The admission controller's wait estimate is `requests ahead x interval`. The interval is
measured where the work is (decode + queue + model: `InferenceService.classify`), not from the
model alone, because on a few cores decoding and the HTTP stack cost as much as the model. A
sample is the time since the previous answer, or since the pipeline last went from idle to
busy, whichever is later, so idle time never counts; a slow upload does not count either (the
body has arrived before `classify` starts). Samples are averaged exponentially from 0 (the
average starts low and rises over the first few dozen answers, so a slow first request after
start cannot make the service shed): with micro-batching, answers come in bursts and the mean
of the samples is what matters.

Event loop only: plain attributes, no lock. The one exception is `room`, a `threading.Event`
a background thread (the shadow scorer) can wait on instead of polling: it is set while fewer
than `room_below` images are in the pipeline, and changed only when that crosses; and
`shed_at`, a float other threads read (the time of the last refusal at admission).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Pace:
    """Exponential moving average of the interval between answers while busy."""

    def __init__(
        self, weight: float = 0.05, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.weight = weight
        self._clock = clock
        self.active = 0  # images between the start of decode and their answer
        self.interval_ms = 0.0
        self._mark = 0.0  # the later of: the last answer, the start of the busy period
        self.room = threading.Event()  # set while active < room_below
        self.room.set()
        self.room_below = 1
        self.shed_at = float("-inf")  # clock() of the last request refused at admission

    def shed(self) -> None:
        """(Admission) a request was refused: the service is over its capacity."""
        self.shed_at = self._clock()

    def watch_room(self, below: int) -> threading.Event:
        """`room`, set from now on while fewer than `below` images are in the pipeline."""
        self.room_below = below
        if self.active < below:
            self.room.set()
        else:
            self.room.clear()
        return self.room

    def started(self) -> None:
        if self.active == 0:
            self._mark = self._clock()
        self.active += 1
        if self.active == self.room_below:
            self.room.clear()

    def finished(self, answered: bool) -> None:
        """One image left the pipeline; `answered`: it was classified (failures don't count)."""
        self.active -= 1
        if self.active == self.room_below - 1:
            self.room.set()
        if not answered:
            return
        now = self._clock()
        sample = (now - self._mark) * 1000
        self._mark = now
        self.interval_ms += self.weight * (sample - self.interval_ms)
