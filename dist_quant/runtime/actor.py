"""The body of a Ray actor: a Worker plus what the driver needs around it (unit files, reports, prefetching).

Plain Python, testable without Ray; ``ray_driver`` wraps it with ``ray.remote``. Every unit method returns its
outputs followed by a UnitReport, which carries the unit file's record (and its bytes when the driver cannot see this
node's disk), so the driver can assemble the checkpoint and show per-actor progress.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dist_quant.calib.inputs import ModelInputs
from dist_quant.checkpoint.safetensors_stream import write_concatenated
from dist_quant.checkpoint.unit_file import UnitRecord, UnitSink, writing
from dist_quant.recipe import Recipe
from dist_quant.runtime.device import resolve_device
from dist_quant.runtime.plan import Unit
from dist_quant.runtime.resume import save_hidden, save_vision
from dist_quant.runtime.sweep import add_partials, finish_layer
from dist_quant.runtime.worker import Worker


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
    peak_rss: int  # bytes, of this actor process so far
    expert_tokens: Optional[list[int]] = None  # attention units of MoE layers: calibration tokens per expert
    phases: Optional[dict] = None  # seconds per phase since the previous report


def ray_node_id() -> str:
    """The Ray node this process runs on ('' outside Ray): reports use it to show where units ran."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except ImportError:
        return ""


def pin_to_cpu_share(index: int, cpus: int) -> set[int]:
    """Keep a CPU-device actor on the ``cpus`` cores Ray allotted it (actor i takes the i-th share of this node's
    cores), so that its reading thread and its compute share them as they would share one card's host cores,
    instead of spilling onto the cores of the other actors."""
    cores = sorted(os.sched_getaffinity(0))
    share = {cores[(index * cpus + k) % len(cores)] for k in range(cpus)}
    os.sched_setaffinity(0, share)
    torch.set_num_threads(len(share))
    return share


def can_see(probe: str, token: str) -> bool:
    """True when this process reads the probe file the driver wrote into save_path: a shared filesystem."""
    try:
        return Path(probe).read_text() == token
    except OSError:
        return False


class ActorBody:
    """Runs the units the plan gave this actor, in plan order, prefetching the next expert group's weights."""

    def __init__(self, index: int, model_path: str, recipe: Recipe, spill_dir: str, private_dir: str, device: str,
                 schedule: list[Unit], probe: str, token: str, threads: Optional[int] = None,
                 ship_results: Optional[bool] = None):
        if device == "cpu" and threads:
            pin_to_cpu_share(index, threads)
        self.index = index
        self.shared_fs = can_see(probe, token) if ship_results is None else not ship_results
        self.sink = UnitSink(spill_dir, ship_payload=not self.shared_fs)
        self.private_dir = Path(private_dir) if self.shared_fs else None  # layer-boundary saves, for --resume
        self.worker = Worker(model_path, recipe, self.sink, resolve_device(device))
        self.schedule = schedule
        self.host = socket.gethostname()
        self.node_id = ray_node_id()
        self._bytes_reported = 0

    def node(self) -> dict:
        return {"pid": os.getpid(), "host": self.host, "node_id": self.node_id, "shared_fs": self.shared_fs}

    def _start(self, unit: Unit) -> float:
        """Prefetch the next expert group of this actor's schedule, then start the clock of this unit."""
        if unit in self.schedule:
            self.worker.prefetch_next_experts(self.schedule, self.schedule.index(unit))
        return time.perf_counter()

    def _report(self, unit: Unit, started: float, expert_tokens: Optional[list[int]] = None) -> UnitReport:
        """Bytes read since the previous report (prefetches included), so the reports add up to every byte read."""
        seconds = time.perf_counter() - started
        bytes_read, self._bytes_reported = self.worker.reader.bytes_read - self._bytes_reported, \
            self.worker.reader.bytes_read
        with self.worker.times.phase("write"):
            record = self.sink.finish(unit.id)
        return UnitReport(self.index, unit, record, seconds, bytes_read, self.host, os.getpid(), self.node_id,
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, expert_tokens,
                          self.worker.times.take())

    def vision(self, inputs: list[ModelInputs]):
        unit = Unit("vision")
        started = self._start(unit)
        vision = self.worker.vision(inputs)
        if self.private_dir is not None:
            save_vision(self.private_dir, vision)
        return vision, self.worker.contexts(inputs, vision), self._report(unit, started)

    def contexts(self, inputs: list[ModelInputs], vision):
        """Sample contexts from saved vision outputs, when a resumed run skips the vision unit."""
        return self.worker.contexts(inputs, vision)

    def embed(self, inputs: list[ModelInputs], vision):
        unit = Unit("embed")
        started = self._start(unit)
        return self.worker.embed(inputs, vision), self._report(unit, started)

    def attention(self, layer_idx: int, contexts, stream: list[torch.Tensor], *partials: torch.Tensor,
                  combine: bool = True):
        """Finish the previous layer (stream + its expert groups' partial sums, in group order; saved for a resume),
        then run this one. ``combine=False``: ``stream`` already is this layer's input (layer 0, or a resume)."""
        unit = Unit("attention", layer_idx)
        started = self._start(unit)
        hidden = stream
        if combine:
            hidden = finish_layer(layer_idx - 1, stream, add_partials(partials), contexts)
            if self.private_dir is not None:
                save_hidden(self.private_dir, layer_idx - 1, hidden)
        out = self.worker.attention(layer_idx, hidden, contexts)
        return out.stream, out.moe, self._report(unit, started, self.worker.expert_tokens.pop(layer_idx, None))

    def experts(self, layer_idx: int, first: int, stop: int, moe):
        unit = Unit("experts", layer_idx, first, stop)
        started = self._start(unit)
        return self.worker.experts(layer_idx, first, stop, moe), self._report(unit, started)

    def write_part(self, path: str, slices: list) -> None:
        """Assemble one part file of the checkpoint from unit files (on the shared filesystem)."""
        with writing(path):
            write_concatenated(path, slices)

    def head(self):
        unit = Unit("head")
        started = self._start(unit)
        self.worker.head()
        return self._report(unit, started)
