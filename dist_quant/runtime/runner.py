"""The unit runner: a Worker plus what the driver needs around it (unit files, reports, layer-boundary saves,
prefetching), with one method per kind of unit as ``interpret.UnitCalls`` describes.

Plain Python: the single-card executor calls it in this process, and ``ray_driver`` wraps the same class with
``ray.remote`` as an actor. Every unit method returns its outputs followed by a UnitReport, which carries the unit
file's record (and its bytes when the driver cannot see this node's disk), so the driver can journal it, write
the bytes of units that could not, and show per-actor progress.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from dist_quant.calib.inputs import ModelInputs
from dist_quant.checkpoint.layout import Place
from dist_quant.checkpoint.unit_file import UnitSink
from dist_quant.recipe import Recipe
from dist_quant.runtime import ray_tensors
from dist_quant.runtime.allocator import release_free_memory
from dist_quant.runtime.device import DEFAULT_COMPUTE_THREADS, resolve_device
from dist_quant.runtime.interpret import finish_layer, running_sum, sample_outputs
from dist_quant.runtime.plan import Kind, Unit, samples_of
from dist_quant.runtime.report import Reporter, UnitReport
from dist_quant.runtime.resume import save_hidden, save_vision
from dist_quant.runtime.worker import ImagesOutput, Worker


def ray_node_id() -> str:
    """The Ray node this process runs on ('' outside Ray): reports use it to show where units ran. A process that
    has not imported Ray is not in it (a single-card run does not pay for importing it)."""
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""


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


class UnitRunner:
    """Runs the units the plan gave it (``schedule``, in plan order), prefetching the next expert group's weights.

    ``ship_unit_files``: whether unit files travel back in the reports (True) or stay in the staging folder the
    driver sees (False); None probes it: the file ``probe`` must hold ``token`` (Ray actors on other nodes).
    Layer outputs and vision outputs are saved for --resume only where the driver sees them.
    """

    def __init__(self, index: int, model_path: str, recipe: Recipe, staging_dir: str, private_dir: str, device: str,
                 schedule: list[Unit], places: dict[str, list[Place]], *, ship_unit_files: Optional[bool] = False,
                 probe: str = "", token: str = "", pin_cpus: Optional[int] = None,
                 compute_threads: int = DEFAULT_COMPUTE_THREADS, opened: Optional[tuple] = None):
        if device == "cpu" and pin_cpus:
            pin_to_cpu_share(index, pin_cpus)
        node_id = ray_node_id()
        if node_id:  # a Ray actor: its outputs go to the object store
            ray_tensors.register()
        self.index = index
        self.ship_unit_files = not can_see(probe, token) if ship_unit_files is None else ship_unit_files
        self.private_dir = None if self.ship_unit_files else Path(private_dir)  # layer-boundary saves (--resume)
        self.worker = Worker(model_path, recipe, UnitSink(staging_dir, ship_unit_files=self.ship_unit_files),
                             resolve_device(device), compute_threads=compute_threads, opened=opened)
        self.schedule = schedule
        self._position = {unit: i for i, unit in enumerate(schedule)}  # where each unit is in the schedule
        self.reporter = Reporter(self.worker, places, index, node_id)

    def placed(self, places: list[Place], method: str, unit: Unit, *args, **kwargs):
        """``method`` of ``unit`` with the unit's places in the part files handed in (Ray actors get them with
        each call: a restarted actor reruns only its constructor, and the actors start before the layout is
        worked out)."""
        self.reporter.places[unit.id] = places
        return getattr(self, method)(unit, *args, **kwargs)

    def clock(self) -> float:
        """This process's wall clock, for the driver to line up the actors' unit times with its own."""
        return time.time()

    def node(self) -> dict:
        return {"pid": os.getpid(), "host": self.reporter.host, "node_id": self.reporter.node_id,
                "ship_unit_files": self.ship_unit_files}

    def _start(self, unit: Unit) -> float:
        """Return the previous units' freed memory to the system (runtime/allocator.py), prefetch the next expert
        group of this runner's schedule, then start the clock of this unit."""
        release_free_memory()
        if unit in self._position:
            self.worker.prefetch_next_experts(self.schedule, self._position[unit])
        return time.perf_counter()

    def images(self, unit: Unit, inputs: list[ModelInputs]):
        started = self._start(unit)
        share = self.worker.images(inputs, samples_of(unit, inputs, self.worker.family, self.worker.config),
                                   keep_tower=Unit(Kind.VISION) in self._position)
        return share, self.reporter.report(unit, started)

    def vision(self, unit: Unit, inputs: list[ModelInputs], *shares: ImagesOutput):
        started = self._start(unit)
        vision = self.worker.vision(list(shares), len(inputs))
        streams = (save_vision(self.private_dir, vision),) if self.private_dir is not None else ()
        return vision, self.worker.contexts(inputs, vision), self.reporter.report(unit, started, streams=streams)

    def contexts(self, unit: Unit, inputs: list[ModelInputs], vision):
        """Sample contexts from the vision outputs (saved ones, when a resumed run skips the vision unit; None for a
        family without a vision tower)."""
        return self.worker.contexts(inputs, vision)

    def embed(self, unit: Unit, inputs: list[ModelInputs], *shares: ImagesOutput):
        started = self._start(unit)
        vision = sample_outputs([share.outputs for share in shares], len(inputs))
        return self.worker.embed(inputs, vision), self.reporter.report(unit, started)

    def _finish_previous(self, layer_idx: int, contexts, stream, partials, combine: bool):
        """The input of layer ``layer_idx``: the previous layer's stream finished with its partial sums (saved for a
        resume), or ``stream`` as it is when it already is complete (the embeddings, a resume point)."""
        if not combine:
            return stream, ()
        hidden = finish_layer(self.worker.family, layer_idx - 1, stream, partials, contexts)
        if self.private_dir is None:
            return hidden, ()
        return hidden, (save_hidden(self.private_dir, layer_idx - 1, hidden),)

    def layer(self, unit: Unit, contexts, stream: list[torch.Tensor], *partials: torch.Tensor, combine: bool):
        started = self._start(unit)
        hidden, streams = self._finish_previous(unit.layer, contexts, stream, partials, combine)
        out = self.worker.layer(unit.layer, hidden, contexts)
        report = self.reporter.report(unit, started, self.worker.expert_tokens.pop(unit.layer, None), streams)
        return out.stream, out.moe, report

    def experts(self, unit: Unit, moe):
        started = self._start(unit)
        partial = self.worker.experts(unit.layer, unit.first_expert, unit.stop_expert, moe)
        return partial, self.reporter.report(unit, started)

    @staticmethod
    def gather(partials: list, partial: torch.Tensor) -> list:
        return running_sum(partials, partial)

    def head(self, unit: Unit, contexts=None, hidden=None, *partials, combine: bool = False):
        """The head needs no hidden states (nothing is calibrated there): whatever the plan passes is unused."""
        started = self._start(unit)
        self.worker.head()
        return self.reporter.report(unit, started)

    def carried(self, unit: Unit):
        started = self._start(unit)
        self.worker.carried(unit.share, unit.shares)
        return self.reporter.report(unit, started)


__all__ = ["UnitReport", "UnitRunner", "can_see", "pin_to_cpu_share", "ray_node_id"]
