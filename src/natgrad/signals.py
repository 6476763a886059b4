"""SIGTERM and SIGINT: noted where work must stop at a safe point (a training step), raised at once elsewhere.

The CLI runs every command inside a raising :class:`StopSignals`, so an evaluation, an analysis or a
pipeline stage stops when asked (its saved progress kept); training nests a noting one and checks it
between steps. A signal noted but not acted on when a noting block ends is passed on to the handler
outside it, so that no signal is ever swallowed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from natgrad.errors import Preempted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Handle SIGTERM and SIGINT for a ``with`` block; ``raising`` turns a signal into :class:`Preempted`."""

    def __init__(self, raising: bool = False) -> None:
        self.raising = raising
        self.signum: int | None = None
        self.acted_on = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # elsewhere Python cannot install handlers
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if self.raising:
            self.acted_on = True
            raise Preempted(f"stopped by {signal.Signals(signum).name}", signum)

    @contextlib.contextmanager
    def raise_now(self) -> Iterator[None]:
        """Within the block a signal (or one noted before it) raises :class:`Preempted` at once."""
        before, self.raising = self.raising, True
        try:
            if self.signum is not None:
                self._handle(self.signum, None)
            yield
        finally:
            self.raising = before

    def act(self) -> None:
        """Mark the signal as acted on by the caller, so that it is not passed on."""
        self.acted_on = True

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        if self.signum is not None and not self.acted_on and exc_type is None:
            signal.raise_signal(self.signum)  # to the handler outside this block
