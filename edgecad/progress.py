"""A dependency-free progress bar on stderr: redrawn in place on a terminal,
a line every 10% otherwise (CI logs)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: float, label: str, unit: str = "", scale: float = 1.0, stream=None):
        self.total, self.label, self.unit, self.scale = max(total, 1), label, unit, scale
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.done, self.note, self._last_decile, self._t0 = 0.0, "", -1, time.monotonic()

    def update(self, n: float = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
        frac = min(self.done / self.total, 1.0)
        if self.tty:
            bar = "#" * int(frac * 30)
            self.stream.write(f"\r{self.label} [{bar:<30}] {self._amount()} {self.note}\x1b[K")
            self.stream.flush()
        elif int(frac * 10) > self._last_decile:
            self._last_decile = int(frac * 10)
            self.stream.write(f"{self.label}: {frac:4.0%} {self._amount()} {self.note}\n")
            self.stream.flush()

    def _amount(self) -> str:
        return f"{self.done / self.scale:.0f}/{self.total / self.scale:.0f}{self.unit}"

    def close(self) -> None:
        if self.tty:
            self.stream.write(f"  ({time.monotonic() - self._t0:.1f}s)\n")
            self.stream.flush()
