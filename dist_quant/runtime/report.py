"""What a finished unit reports to the driver, whichever executor ran it: its unit file's record, its time, the bytes
it read, where it ran, and the stream files it saved for a resume."""

from __future__ import annotations

import os
import resource
import socket
import time
from dataclasses import dataclass
from typing import Optional

from dist_quant.checkpoint.layout import Place
from dist_quant.checkpoint.unit_file import UnitRecord
from dist_quant.runtime.plan import Unit
from dist_quant.runtime.resume import StreamRecord


@dataclass(frozen=True)
class UnitReport:
    actor: int
    unit: Unit
    record: UnitRecord
    seconds: float
    bytes_read: int
    host: str
    pid: int
    node_id: str
    peak_rss: int  # bytes, of the process that ran the unit, so far
    expert_tokens: Optional[list[int]] = None  # layer units of MoE layers: calibration tokens per expert
    phases: Optional[dict] = None  # seconds per phase since the previous report
    streams: tuple[StreamRecord, ...] = ()  # stream files saved with this unit (for --resume)
    started_at: float = 0.0  # when the unit started, seconds since the epoch (the run's timeline)


class Reporter:
    """Turns a worker's finished unit into a UnitReport: bytes read since the previous report (prefetches included),
    so the reports of one worker add up to every byte it read."""

    def __init__(self, worker, places: dict[str, list[Place]], actor: int = 0, node_id: str = ""):
        self.worker = worker
        self.places = places  # where each unit's tensors go in the part files, by unit id
        self.actor = actor
        self.host = socket.gethostname()
        self.node_id = node_id
        self._bytes_reported = 0

    def report(self, unit: Unit, started: float, expert_tokens: Optional[list[int]] = None,
               streams: tuple[StreamRecord, ...] = ()) -> UnitReport:
        with self.worker.times.split("write", "serialise", lambda: self.worker.sink.serialise_seconds):
            record = self.worker.sink.finish(unit.id, self.places[unit.id])
        seconds = time.perf_counter() - started  # writing the unit's tensors included
        total = self.worker.reader.bytes_read
        bytes_read, self._bytes_reported = total - self._bytes_reported, total
        return UnitReport(self.actor, unit, record, seconds, bytes_read, self.host, os.getpid(), self.node_id,
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, expert_tokens,
                          self.worker.times.take(), tuple(streams), time.time() - seconds)
