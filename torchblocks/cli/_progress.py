"""A one-line progress bar for downloads and training epochs, with no dependency."""

import sys
import time
from typing import Callable, Optional, TextIO


class ProgressBar:
    """``label [=========>          ] 120/469 suffix`` on one line of ``stream``.

    On a terminal the line is redrawn in place, at most every ``interval``
    seconds; anywhere else (a pipe, a CI log) only the final line is written,
    so logs stay readable. Callers that pay to build the suffix (a host sync
    to read a running loss) ask ``due()`` first.

    Args:
        total: the count at completion (steps, bytes); 0 or None if unknown.
        label: text before the bar.
        stream: where to write (default ``sys.stderr``).
        format_count: turns a count into text (e.g. bytes into MiB).

    Example::

        >>> bar = ProgressBar(469, label="epoch 1/5")
        >>> for step in range(1, 470):
        ...     if bar.due():
        ...         bar.update(step, f"loss {0.1:.4f}")
        >>> bar.close(469, "loss 0.1000")
    """

    def __init__(self, total: Optional[int], label: str = "", stream: Optional[TextIO] = None, width: int = 30,
                 interval: float = 0.1, format_count: Callable[[int], str] = str):
        self.total = total or 0
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.interval = interval
        self.format_count = format_count
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_draw = float("-inf")

    def due(self) -> bool:
        """Whether an ``update`` now would be drawn."""
        return self.live and time.monotonic() - self._last_draw >= self.interval

    def update(self, done: int, suffix: str = "") -> None:
        """Redraw (on a terminal, when due) with ``done`` of ``total`` complete."""
        if self.due():
            self._draw(done, suffix, end="")

    def close(self, done: int, suffix: str = "") -> None:
        """Write the final line and end it."""
        self._draw(done, suffix, end="\n")

    def _draw(self, done: int, suffix: str, end: str) -> None:
        self._last_draw = time.monotonic()
        if self.total:
            filled = min(self.width, self.width * done // self.total)
            arrow = ">" if filled < self.width else ""
            bar = "[" + "=" * filled + arrow + " " * (self.width - filled - len(arrow)) + "] "
            count = f"{self.format_count(done)}/{self.format_count(self.total)}"
        else:
            bar, count = "", self.format_count(done)
        line = " ".join(part for part in (self.label, bar + count, suffix) if part)
        self.stream.write(("\r\x1b[K" if self.live else "") + line + end)
        self.stream.flush()
