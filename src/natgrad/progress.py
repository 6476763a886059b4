"""Progress bars: tqdm on a terminal; elsewhere (a log file, CI) one line every few percent instead of a
carriage-return update per step."""

from __future__ import annotations

import math
import sys
from typing import Any

from tqdm.auto import tqdm

LINE_EVERY = 0.05  # a line per 5% of the total when the output is not a terminal


class Progress(tqdm):
    """``tqdm`` that writes whole lines, at most one per :data:`LINE_EVERY` of the total, to a non-terminal."""

    def __init__(self, *args: Any, **kwargs: Any):
        stream = kwargs.get("file") or sys.stderr
        self._as_lines = not (hasattr(stream, "isatty") and stream.isatty())
        self._next_line = 0.0
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool | None:
        if not self._as_lines:
            return super().display(msg, pos)
        if msg == "" or self.fp is None:  # tqdm clears a bar this way; lines stay as written
            return True
        done = self.n / self.total if self.total else None
        if done is None or done >= self._next_line:
            self.fp.write((msg if msg is not None else self.__str__()) + "\n")
            self.fp.flush()
            if done is not None:
                self._next_line = (math.floor(done / LINE_EVERY) + 1) * LINE_EVERY
        return True
