"""Graceful shutdown: SIGTERM/SIGINT drain the service first, then reach the HTTP server.

The handlers are chained in front of the server's own (uvicorn's), from the app's lifespan,
so the same sequence runs in a single process and in every `--workers` process:

1. The signal: the phase becomes `draining` at once. `/health/ready` answers 503, new API
   requests get 503 + Retry-After + `Connection: close` (api/draining.py); requests already
   admitted carry on (queued images are classified, saves are spooled).
2. After SHUTDOWN_DELAY_S the signal is passed on to the server's handler: uvicorn closes the
   listener (new connections are refused), closes idle keep-alive connections and waits up to
   SHUTDOWN_TIMEOUT_S for in-flight requests.
3. The lifespan shutdown: the batcher finishes what is queued, the outbox drains for
   OUTBOX_SHUTDOWN_GRACE_S; what is left stays in the durable outbox for the next start.

The same signal a second time hurries: the rest of the delay is skipped and the outbox stops
draining at once (in-flight requests are still answered). A third time exits immediately.
Neither loses an acknowledged save: a 200 with save_prediction is sent only after the save is
fsynced in the outbox. Another signal than the first (a supervisor's SIGTERM after a terminal's
SIGINT reached the whole process group) does not count as a repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from rottenbot_inference.api.state import STOPPING, AppState, Phase

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_Handler = Callable[[int, FrameType | None], Any]


def begin_draining(state: AppState, reason: str) -> bool:
    """Stop admitting new requests (readiness turns 503); False if already stopping."""
    if state.phase in STOPPING:
        return False
    state.phase = Phase.DRAINING
    state.detail = f"draining after {reason}: in-flight requests finish, new ones are refused"
    return True


def hurry(state: AppState) -> None:
    """Skip the optional waits that are left: the outbox stops draining at once."""
    if state.predictions is not None:
        state.predictions.hurry()


class GracefulShutdown:
    """Chains SIGTERM/SIGINT handlers in front of the server's; see the module docstring."""

    def __init__(self, state: AppState, delay_s: float) -> None:
        self.state = state
        self.delay_s = delay_s
        self.first: int | None = None  # the signal that started the drain
        self.repeats = 0
        self._previous: dict[int, _Handler] = {}
        self._passed_on = False
        self._timer: asyncio.TimerHandle | None = None

    def install(self) -> Callable[[], None]:
        """Chain in front of the current handlers; returns the undo. Only in the main thread,
        and only where a server installed a handler of its own to pass the signal on to.

        The signals are taken through the event loop (`add_signal_handler`), not with a plain
        `signal.signal` handler: that one only runs when the main thread next executes Python
        code, which an idle loop (waiting on the outbox drain, say) may not do for a long time.
        """
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        loop = asyncio.get_running_loop()
        for sig in HANDLED_SIGNALS:
            previous = signal.getsignal(sig)
            if not callable(previous) or previous is signal.default_int_handler:
                continue
            try:
                loop.add_signal_handler(sig, self.handle, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # a loop without signal support: the server's handler stays
            self._previous[sig] = previous
        if not self._previous:
            log.debug("no server signal handlers to chain: shutdown is the server's own")
            return lambda: None

        def uninstall() -> None:
            if self._timer is not None:
                self._timer.cancel()
            for sig, previous in self._previous.items():
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
                    signal.signal(sig, previous)  # the server's own again

        return uninstall

    def handle(self, signum: int) -> None:
        """React to `signum` (called on the event loop)."""
        name = signal.Signals(signum).name
        if self.first is None:
            self.first = signum
            begin_draining(self.state, name)
            log.info(
                "%s: draining; the listener closes in %.1f s (SHUTDOWN_DELAY_S), then in-flight "
                "requests finish and the outbox drains; %s again to hurry",
                name, self.delay_s, name,
            )
            if self.delay_s > 0:
                self._timer = asyncio.get_running_loop().call_later(
                    self.delay_s, self._pass_on, signum
                )
            else:
                self._pass_on(signum)
            return
        if signum != self.first:
            log.info("%s ignored: already shutting down after %s", name,
                     signal.Signals(self.first).name)
            return
        self.repeats += 1
        if self.repeats == 1:
            log.warning(
                "%s again: hurrying (no more delay, the outbox stops draining; pending saves "
                "stay on disk for the next start); %s once more to exit at once", name, name,
            )
            if self._timer is not None:
                self._timer.cancel()
            self._pass_on(signum)
            hurry(self.state)
            return
        log.warning("%s a third time: exiting now; pending saves stay in the outbox", name)
        logging.shutdown()
        os._exit(128 + signum)

    def _pass_on(self, signum: int) -> None:
        """The server's own handler: it closes the listener and finishes in-flight requests."""
        if self._passed_on:
            return
        self._passed_on = True
        previous = self._previous.get(signum)
        if previous is not None:
            previous(signum, None)
