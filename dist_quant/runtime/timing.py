"""Wall time per phase of the work, summed over units: read (bytes from storage, NaN/Inf check), convert (to the
compute dtype and layout, onto the device), rotate, smooth, forward, quantize, serialise (tensors to safetensors
bytes), write (to the unit file, checksum) and merge (the part files, at the end).

Phases may overlap (reads run in a prefetch thread while the unit before computes), so the sum can exceed the
wall time; what matters is which phase dominates.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

PHASES = ("read", "convert", "rotate", "smooth", "forward", "quantize", "serialise", "write", "merge")


class PhaseTimes:
    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.totals[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.totals[name] += seconds

    @contextmanager
    def split(self, name: str, part: str, part_seconds) -> Iterator[None]:
        """Time a block as ``name`` except ``part_seconds()``'s growth meanwhile, which goes to ``part`` (a reader's
        I/O inside a read-and-convert, a sink's serialisation inside a write)."""
        before, start = part_seconds(), time.perf_counter()
        try:
            yield
        finally:
            inside = part_seconds() - before
            self.add(part, inside)
            self.add(name, time.perf_counter() - start - inside)

    def take(self) -> dict[str, float]:
        """The totals so far, reset to zero (an actor reports them per unit)."""
        with self._lock:
            totals, self.totals = dict(self.totals), defaultdict(float)
        return totals


def add_times(into: dict[str, float], more: dict[str, float]) -> None:
    for name, seconds in more.items():
        into[name] = into.get(name, 0.0) + seconds


def format_times(totals: dict[str, float]) -> str:
    return ", ".join(f"{name} {totals[name]:.1f} s" for name in PHASES if totals.get(name))
