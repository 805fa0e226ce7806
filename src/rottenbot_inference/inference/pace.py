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

Event loop only: plain attributes, no lock. Two exceptions serve a background thread (the
shadow scorer): `empty`, a `threading.Event` it can wait on instead of polling, set while no
image is in the pipeline and changed only when that flips; and `shed_recently`, which reads
the time of the last refusal at admission.
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
        self.empty = threading.Event()  # set while active == 0
        self.empty.set()
        self.shed_at = float("-inf")  # clock() of the last request refused at admission

    def shed(self) -> None:
        """(Admission) a request was refused: the service is over its capacity."""
        self.shed_at = self._clock()

    def shed_recently(self, window_s: float) -> bool:
        """(Any thread) a request was refused at admission less than `window_s` ago."""
        return self._clock() - self.shed_at < window_s

    def started(self) -> None:
        if self.active == 0:
            self._mark = self._clock()
            self.empty.clear()
        self.active += 1

    def finished(self, answered: bool) -> None:
        """One image left the pipeline; `answered`: it was classified (failures don't count)."""
        self.active -= 1
        if self.active == 0:
            self.empty.set()
        if not answered:
            return
        now = self._clock()
        sample = (now - self._mark) * 1000
        self._mark = now
        self.interval_ms += self.weight * (sample - self.interval_ms)
