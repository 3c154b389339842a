"""Distributed quantization: a Ray executor hands the plan's units to actors, one per card, on one or many nodes.

The executor submits the whole unit graph up front through the plan interpreter (``interpret``, the same walk the
single-card executor and the evaluator make); hidden states move between actors as object refs and never through
the driver. Actors
write their unit files into the staging folder when they share its filesystem, or return them through the object
store when they do not (probed, not assumed). The shared driver skeleton (``driver.quantize``) journals, writes the
index and description, and publishes; the checkpoint is the same whatever the number of workers. An actor that
dies is restarted by Ray and its unfinished units run again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from dist_quant.calib.inputs import ModelInputs
from dist_quant.checkpoint.layout import Place
from dist_quant.checkpoint.writer import CheckpointWriter
from dist_quant.errors import DistQuantError
from dist_quant.recipe import Recipe
from dist_quant.runtime import ray_tensors
from dist_quant.runtime.device import DEVICES
from dist_quant.runtime.driver import OnDone, QuantSummary, quantize
from dist_quant.runtime.interpret import interpret
from dist_quant.runtime.plan import Kind, Unit, assign_units
from dist_quant.runtime.ray_connect import AUTH_MODE, set_token_mode
from dist_quant.runtime.report import UnitReport
from dist_quant.runtime.resume import ResumePoint
from dist_quant.runtime.runner import UnitRunner

log = logging.getLogger("dist_quant")

MAX_RESTARTS = 3  # per actor: a killed process or a lost node is retried this many times


@dataclass
class ActorSummary:
    index: int
    host: str = ""
    node_ids: set = field(default_factory=set)
    pids: set = field(default_factory=set)
    units: int = 0
    busy_seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    peak_rss: int = 0


@dataclass
class DistributedSummary(QuantSummary):
    actors: list[ActorSummary] = field(default_factory=list)
    ray_start_seconds: float = 0.0  # joining or starting the Ray runtime
    actor_start_seconds: float = 0.0  # actor processes up, each with torch and the model config loaded
    sweep_seconds: float = 0.0  # first unit submitted to last unit finished


def actor_resources(device: str) -> dict:
    """One card per actor: Ray's Ascend support schedules the ``NPU`` resource and sets ASCEND_RT_VISIBLE_DEVICES."""
    if device not in DEVICES:
        raise DistQuantError(f"--device {device!r} is not supported; choose one of {list(DEVICES)}")
    return {"npu": {"resources": {"NPU": 1}}, "cuda": {"num_gpus": 1}, "cpu": {"num_cpus": 1}}[device]


def start_ray(ray_address: Optional[str], workers: int, device: str):
    """Join a cluster (``auto`` or HOST:PORT), or start a local runtime sized for the workers; returns
    (ray, whether this call started it). A runtime that is already initialised in this process is used as it is."""
    import ray

    if ray.is_initialized():
        return ray, False
    if ray_address:
        from dist_quant.runtime.ray_connect import join_cluster

        join_cluster(ray, ray_address, logging_level=logging.WARNING, log_to_driver=True)
        return ray, True
    num_cpus = max(os.cpu_count() or 1, workers) if device == "cpu" else None
    # address="local": a new runtime even where `ray start` (or another program) left a cluster address behind
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return ray, True


def check_capacity(ray, workers: int, device: str) -> None:
    resources = ray.cluster_resources()
    need = {"npu": ("NPU", workers), "cuda": ("GPU", workers), "cpu": ("CPU", workers)}[device]
    have = resources.get(need[0], 0)
    if have < need[1]:
        raise DistQuantError(f"--workers {workers} needs {need[1]} {need[0]} in the Ray cluster, which has {have:g}; "
                             "lower --workers or add nodes (launch/start_worker.sh)")


class RayCalls:
    """``interpret.UnitCalls`` on Ray: each unit becomes a remote call on the actor the plan assigns it, in
    ``submission_order`` (each actor runs its tasks in submission order, so the graph cannot deadlock); what flows
    between units are object refs, which move between actors and never through the driver."""

    def __init__(self, actors: list, owner: dict[Unit, int], places: dict[str, list[Place]]):
        self.actors, self.owner, self.places = actors, owner, places

    def _call(self, unit: Unit, method: str, returns: int, *args, **kwargs):
        """``UnitRunner.method(unit, ...)`` on the unit's actor, with the unit's places (a few KiB: sent inline)."""
        call = self.actors[self.owner[unit]].placed
        return (call.options(num_returns=returns) if returns > 1 else call).remote(self.places[unit.id], method,
                                                                                    unit, *args, **kwargs)

    def contexts(self, unit, inputs, vision):
        return self._call(unit, "contexts", 1, inputs, vision)

    def images(self, unit, inputs):
        return self._call(unit, "images", 2, inputs)

    def vision(self, unit, inputs, *shares):
        return self._call(unit, "vision", 3, inputs, *shares)

    def embed(self, unit, inputs, *shares):
        return self._call(unit, "embed", 2, inputs, *shares)

    def layer(self, unit, contexts, hidden, *partials, combine: bool):
        return self._call(unit, "layer", 3, contexts, hidden, *partials, combine=combine)

    def experts(self, unit, moe):
        return self._call(unit, "experts", 2, moe)

    @staticmethod
    def gather(partials: list, partial) -> list:
        """Refs cannot be added here: the combining actor adds them, in group order."""
        return [*partials, partial]

    def head(self, unit, *unused, combine: bool):
        """The quantizing head needs no hidden states: the last layer's refs are not passed (nor waited for)."""
        return self._call(unit, "head", 1)

    def carried(self, unit):
        return self._call(unit, "carried", 1)


def submission_order(units: list[Unit]) -> list[Unit]:
    """The units in the order their calls are submitted: plan order, but the quantizing head and the carried
    tensors' shares, which need no input (``RayCalls.head``, ``RayCalls.carried``), right after the embeddings, so
    that their actors run them while they would otherwise wait for the vision tower and the first layer, not after
    everything (a resumed run, without embeddings, keeps plan order)."""
    no_input = (Kind.HEAD, Kind.CARRIED)
    early = [u for u in units if u.kind in no_input]
    rest = [u for u in units if u.kind not in no_input]
    first = next((i + 1 for i, u in enumerate(rest) if u.kind is Kind.EMBED), len(rest))
    return rest[:first] + early + rest[first:]


class RayExecutor:
    """Runs the units on ``workers`` Ray actors, one per card, spread over the nodes.

    ``pin_cpus``: on the cpu device, each actor is pinned to that many cores of its node (its "card"); by default
    actors are not pinned. ``ship_unit_files`` forces unit files through the object store (True) or the shared
    filesystem (False); by default each actor probes whether it sees save_path. ``on_unit_done(report)`` is called
    in the driver after each finished unit (tests use it to kill actor processes mid-run).
    """

    def __init__(self, workers: int, ray_address: Optional[str] = None, *, pin_cpus: Optional[int] = None,
                 max_restarts: int = MAX_RESTARTS, ship_unit_files: Optional[bool] = None,
                 on_unit_done: Optional[Callable[[UnitReport], None]] = None):
        self.workers, self.ray_address, self.pin_cpus = workers, ray_address, pin_cpus
        self.max_restarts, self.ship_unit_files, self.on_unit_done = max_restarts, ship_unit_files, on_unit_done
        self.ray, self.we_started, self.actors, self.switched_auth = None, False, [], False
        self.reports: list[UnitReport] = []
        self.ray_seconds = self.actor_seconds = self.sweep_seconds = 0.0

    def start(self, model_path: str, recipe: Recipe, writer: CheckpointWriter, plan: list[Unit], device: str,
              compute_threads: int, opened: tuple) -> None:
        """Join or start Ray and start the actors (they load while the driver works out the checkpoint layout and
        builds the calibration inputs; each opens the checkpoint in its own process, so ``opened`` stays here)."""
        started = time.perf_counter()
        auth_mode = os.environ.get(AUTH_MODE)
        self.ray, self.we_started = start_ray(self.ray_address, self.workers, device)
        ray_tensors.register()  # the inputs and a resume point go to the actors as raw bytes
        self.switched_auth = auth_mode is None and os.environ.get(AUTH_MODE) is not None
        self.ray_seconds = time.perf_counter() - started
        check_capacity(self.ray, self.workers, device)
        self.plan, self.assignment, self.writer = plan, assign_units(plan, self.workers), writer
        probe, token = writer.private_dir / "probe", secrets.token_hex(16)
        probe.write_text(token)
        self.probe = probe
        remote = self.ray.remote(max_restarts=self.max_restarts, max_task_retries=self.max_restarts)(UnitRunner)
        self.actor_started = time.perf_counter()
        self.actors = [remote.options(**actor_resources(device), scheduling_strategy="SPREAD").remote(
                           i, str(model_path), recipe, str(writer.staging), str(writer.private_dir), device,
                           [u for u, a in zip(plan, self.assignment) if a == i], {},
                           ship_unit_files=self.ship_unit_files,
                           probe=str(probe), token=token, pin_cpus=self.pin_cpus, compute_threads=compute_threads)
                       for i in range(self.workers)]

    def run(self, todo: list[Unit], point: Optional[ResumePoint], inputs: list[ModelInputs], on_done: OnDone) -> None:
        ray = self.ray
        try:
            ray.get([actor.node.remote() for actor in self.actors])
            self.actor_seconds = time.perf_counter() - self.actor_started
            offsets = self._clock_offsets()
            started = time.perf_counter()
            calls = RayCalls(self.actors, dict(zip(self.plan, self.assignment)),
                             {u.id: self.writer.places(u.id) for u in todo})
            pending = {ref: unit for unit, ref in interpret(submission_order(todo), point, ray.put(inputs), calls,
                                                             put=ray.put)}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    pending.pop(ref)
                    report: UnitReport = ray.get(ref)
                    report = dataclasses.replace(report, started_at=report.started_at + offsets[report.actor])
                    on_done(report)  # writes the bytes a report carries through the object store
                    report = dataclasses.replace(report, record=dataclasses.replace(report.record, payload=None))
                    self.reports.append(report)
                    if self.on_unit_done is not None:
                        self.on_unit_done(report)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, DistQuantError):
                raise error.cause from None  # a clear error raised in an actor: show it as such, not a remote trace
            raise DistQuantError(f"distributed quantization failed, nothing was published: {error}") from error
        except ray.exceptions.RayError as error:
            raise DistQuantError(f"distributed quantization failed, nothing was published: {error}") from error
        self.sweep_seconds = time.perf_counter() - started
        self.probe.unlink(missing_ok=True)

    def _clock_offsets(self) -> list[float]:
        """Per actor, what to add to its wall clock to read the driver's (the midpoint of a round trip, taken on
        started actors: exact to half the round trip, well under the units' durations); the run's timeline is
        drawn on one clock even when the nodes' clocks disagree."""
        offsets = []
        for actor in self.actors:
            before = time.time()
            theirs = self.ray.get(actor.clock.remote())
            offsets.append((before + time.time()) / 2 - theirs)
        return offsets

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.actors = []
        if self.we_started:
            self.ray.shutdown()
            self.we_started = False
        if self.switched_auth:  # token mode was for that cluster only
            set_token_mode(False)
            self.switched_auth = False


def quantize_distributed(model_path: str, save_path: str, recipe: Recipe, *, workers: int,
                         ray_address: Optional[str] = None, threads_per_actor: Optional[int] = None,
                         max_restarts: int = MAX_RESTARTS, ship_unit_files: Optional[bool] = None,
                         on_unit_done: Optional[Callable[[UnitReport], None]] = None, **options) -> DistributedSummary:
    """Quantize with ``workers`` Ray actors and publish one checkpoint to ``save_path`` (options: see
    ``driver.quantize``; ``threads_per_actor`` pins each cpu-device actor to that many cores)."""
    executor = RayExecutor(workers, ray_address, pin_cpus=threads_per_actor, max_restarts=max_restarts,
                           ship_unit_files=ship_unit_files, on_unit_done=on_unit_done)
    summary = quantize(model_path, save_path, recipe, executor, **options)
    return DistributedSummary(**vars(summary), actors=summarize_actors(executor.reports, workers),
                              ray_start_seconds=executor.ray_seconds, actor_start_seconds=executor.actor_seconds,
                              sweep_seconds=executor.sweep_seconds)


def summarize_actors(reports, workers: int) -> list[ActorSummary]:
    actors = [ActorSummary(i) for i in range(workers)]
    for report in reports:
        actor = actors[report.actor]
        actor.host = report.host
        actor.node_ids.add(report.node_id)
        actor.pids.add(report.pid)
        actor.units += 1
        actor.busy_seconds += report.seconds
        actor.bytes_read += report.bytes_read
        actor.bytes_written += report.record.nbytes
        actor.peak_rss = max(actor.peak_rss, report.peak_rss)
    return actors
