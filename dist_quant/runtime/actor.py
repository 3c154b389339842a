"""The body of a Ray actor: a Worker plus what the driver needs around it (unit files, reports, prefetching).

Plain Python, testable without Ray; ``ray_driver`` wraps it with ``ray.remote``. Every unit method returns its
outputs followed by a UnitReport, which carries the unit file's record (and its bytes when the driver cannot see this
node's disk), so the driver can assemble the checkpoint and show per-actor progress.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import torch

from dist_quant.calib.inputs import ModelInputs
from dist_quant.checkpoint.unit_file import UnitSink
from dist_quant.checkpoint.writer import write_part
from dist_quant.recipe import Recipe
from dist_quant.runtime.device import DEFAULT_COMPUTE_THREADS, resolve_device
from dist_quant.runtime.plan import Unit
from dist_quant.runtime.report import Reporter, UnitReport
from dist_quant.runtime.resume import save_hidden, save_vision
from dist_quant.runtime.sweep import add_partials, finish_layer
from dist_quant.runtime.worker import Worker


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
    instead of spilling onto the cores of the other actors. (The compute thread count stays --compute_threads:
    the checkpoint must not depend on the pinning.)"""
    cores = sorted(os.sched_getaffinity(0))
    share = {cores[(index * cpus + k) % len(cores)] for k in range(cpus)}
    os.sched_setaffinity(0, share)
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
                 schedule: list[Unit], probe: str, token: str, pin_cpus: Optional[int] = None,
                 ship_results: Optional[bool] = None, compute_threads: int = DEFAULT_COMPUTE_THREADS):
        if device == "cpu" and pin_cpus:
            pin_to_cpu_share(index, pin_cpus)
        self.index = index
        self.shared_fs = can_see(probe, token) if ship_results is None else not ship_results
        self.private_dir = Path(private_dir) if self.shared_fs else None  # layer-boundary saves, for --resume
        self.worker = Worker(model_path, recipe, UnitSink(spill_dir, ship_payload=not self.shared_fs),
                             resolve_device(device), compute_threads=compute_threads)
        self.schedule = schedule
        self.reporter = Reporter(self.worker, index, ray_node_id())

    def node(self) -> dict:
        return {"pid": os.getpid(), "host": self.reporter.host, "node_id": self.reporter.node_id,
                "shared_fs": self.shared_fs}

    def _start(self, unit: Unit) -> float:
        """Prefetch the next expert group of this actor's schedule, then start the clock of this unit."""
        if unit in self.schedule:
            self.worker.prefetch_next_experts(self.schedule, self.schedule.index(unit))
        return time.perf_counter()

    def vision(self, inputs: list[ModelInputs]):
        unit = Unit("vision")
        started = self._start(unit)
        vision = self.worker.vision(inputs)
        streams = (save_vision(self.private_dir, vision),) if self.private_dir is not None else ()
        return vision, self.worker.contexts(inputs, vision), self.reporter.report(unit, started, streams=streams)

    def contexts(self, inputs: list[ModelInputs], vision):
        """Sample contexts from saved vision outputs, when a resumed run skips the vision unit."""
        return self.worker.contexts(inputs, vision)

    def embed(self, inputs: list[ModelInputs], vision):
        unit = Unit("embed")
        started = self._start(unit)
        return self.worker.embed(inputs, vision), self.reporter.report(unit, started)

    def attention(self, layer_idx: int, contexts, stream: list[torch.Tensor], *partials: torch.Tensor,
                  combine: bool = True):
        """Finish the previous layer (stream + its expert groups' partial sums, in group order; saved for a resume),
        then run this one. ``combine=False``: ``stream`` already is this layer's input (layer 0, or a resume)."""
        unit = Unit("attention", layer_idx)
        started = self._start(unit)
        hidden, streams = stream, ()
        if combine:
            hidden = finish_layer(layer_idx - 1, stream, add_partials(partials), contexts)
            if self.private_dir is not None:
                streams = (save_hidden(self.private_dir, layer_idx - 1, hidden),)
        out = self.worker.attention(layer_idx, hidden, contexts)
        report = self.reporter.report(unit, started, self.worker.expert_tokens.pop(layer_idx, None), streams)
        return out.stream, out.moe, report

    def experts(self, layer_idx: int, first: int, stop: int, moe):
        unit = Unit("experts", layer_idx, first, stop)
        started = self._start(unit)
        return self.worker.experts(layer_idx, first, stop, moe), self.reporter.report(unit, started)

    def write_part(self, path: str, slices: list) -> int:
        """Assemble one part file of the checkpoint from unit files (on the shared filesystem); returns its CRC-32."""
        return write_part(Path(path), slices)

    def head(self):
        unit = Unit("head")
        started = self._start(unit)
        self.worker.head()
        return self.reporter.report(unit, started)


__all__ = ["ActorBody", "UnitReport", "can_see", "pin_to_cpu_share", "ray_node_id"]
