"""Distributed quantization: a Ray driver hands the plan's units to actors, one per card, on one or many nodes.

The driver submits the whole unit graph up front in plan order (each actor runs its tasks in submission order, so the
graph cannot deadlock); hidden states move between actors as object refs and never through the driver. Actors write
their unit files into the staging folder when they share its filesystem, or return them through the object store
when they do not (probed, not assumed). The driver assembles and publishes the checkpoint; the checkpoint is the same
whatever the number of workers. An actor that dies is restarted by Ray and its unfinished units run again.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

from tqdm import tqdm

from dist_quant.calib.dataset import load_samples
from dist_quant.calib.inputs import build_model_inputs
from dist_quant.checkpoint.reader import CheckpointReader
from dist_quant.checkpoint.writer import CheckpointWriter
from dist_quant.errors import DistQuantError
from dist_quant.models.qwen3_vl_moe import load_config
from dist_quant.recipe import Recipe
from dist_quant.runtime.actor import ActorBody, UnitReport
from dist_quant.runtime.device import DEVICES
from dist_quant.checkpoint.unit_file import UnitSink
from dist_quant.runtime.local import QuantSummary, keep_or_abort, resolve_dataset
from dist_quant.runtime.plan import DEFAULT_EXPERT_GROUP_SIZE, Unit, assign_units, make_plan
from dist_quant.runtime.resume import Journal, ResumePoint, fingerprint, remaining_units, resume_point
from dist_quant.runtime.run_log import RunLog, write_coverage
from dist_quant.runtime.timing import add_times
from dist_quant.runtime.worker import Worker, export_rotation

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
    assemble_seconds: float = 0.0  # part files, index, description, publish


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
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return ray, True


def check_capacity(ray, workers: int, device: str) -> None:
    resources = ray.cluster_resources()
    need = {"npu": ("NPU", workers), "cuda": ("GPU", workers), "cpu": ("CPU", workers)}[device]
    have = resources.get(need[0], 0)
    if have < need[1]:
        raise DistQuantError(f"--workers {workers} needs {need[1]} {need[0]} in the Ray cluster, which has {have:g}; "
                             "lower --workers or add nodes (launch/start_worker.sh)")


def _progress_text(actors: dict[int, ActorSummary]) -> str:
    return " | ".join(f"a{a.index} {a.units}u {a.units / a.busy_seconds:.1f}u/s" if a.busy_seconds else f"a{a.index} 0u"
                      for a in sorted(actors.values(), key=lambda a: a.index))


def submit_graph(ray, actors: list, plan: list[Unit], assignment: list[int], todo: list[Unit], inputs_ref,
                 start: Optional[ResumePoint]) -> dict[Unit, object]:
    """Submit the units still to run, in plan order; returns the report ref of each. A resume point replaces the
    vision and embedding units: its saved vision outputs and hidden states are put in the object store."""
    owner = dict(zip(plan, assignment))
    reports = {}
    vision = contexts = hidden = None
    if start is not None:
        vision, hidden = ray.put(start.vision), ray.put(start.hidden)
        contexts = actors[owner[todo[0]]].contexts.remote(inputs_ref, vision)
    combine = start is None  # a saved layer output is complete: nothing to add to it
    partials: list = []
    for unit in todo:
        actor = actors[owner[unit]]
        if unit.kind == "vision":
            vision, contexts, reports[unit] = actor.vision.options(num_returns=3).remote(inputs_ref)
        elif unit.kind == "embed":
            hidden, reports[unit] = actor.embed.options(num_returns=2).remote(inputs_ref, vision)
        elif unit.kind == "attention":
            hidden, moe, reports[unit] = actor.attention.options(num_returns=3).remote(
                unit.layer, contexts, hidden, *partials, combine=combine and unit.layer > 0)
            partials, combine = [], True
        elif unit.kind == "experts":
            partial, reports[unit] = actor.experts.options(num_returns=2).remote(
                unit.layer, unit.first_expert, unit.stop_expert, moe)
            partials.append(partial)
        else:
            reports[unit] = actor.head.remote()
    return reports


def start_actors(ray, workers: int, device: str, model_path: str, recipe: Recipe, writer: CheckpointWriter,
                 plan: list[Unit], assignment: list[int], threads_per_actor: Optional[int], max_restarts: int,
                 ship_results: Optional[bool]) -> list:
    """One actor per card, spread over the nodes; each is told its units so it can prefetch the next one.
    A probe file in the staging folder tells each actor whether it shares save_path's filesystem."""
    probe, token = writer.private_dir / "probe", secrets.token_hex(16)
    probe.write_text(token)
    remote = ray.remote(max_restarts=max_restarts, max_task_retries=max_restarts)(ActorBody)
    return [remote.options(**actor_resources(device), scheduling_strategy="SPREAD").remote(
                i, str(model_path), recipe, str(writer.spill_dir), str(writer.private_dir), device,
                [u for u, a in zip(plan, assignment) if a == i], str(probe), token, threads_per_actor, ship_results)
            for i in range(workers)]


def quantize_distributed(model_path: str, save_path: str, recipe: Recipe, *, workers: int,
                         ray_address: Optional[str] = None, dataset: Optional[str] = None, device: str = "cpu",
                         overwrite: bool = False, progress: bool = True, trust_remote_code: bool = False,
                         expert_group_size: int = DEFAULT_EXPERT_GROUP_SIZE, threads_per_actor: Optional[int] = None,
                         max_restarts: int = MAX_RESTARTS, ship_results: Optional[bool] = None, resume: bool = False,
                         on_unit_done: Optional[Callable[[UnitReport], None]] = None) -> DistributedSummary:
    """Quantize with ``workers`` Ray actors and publish one checkpoint to ``save_path``.

    ``threads_per_actor``: on the cpu device, each actor is pinned to that many cores of its node (its "card");
    by default actors are not pinned. ``ship_results`` forces unit files through the object store (True) or the
    shared filesystem (False); by default each actor probes whether it sees save_path. ``on_unit_done(report)`` is
    called in the driver after each finished unit (tests use it to kill actor processes mid-run). ``resume``
    continues an interrupted run (actors save the hidden states at layer boundaries when they share save_path).
    """
    import ray

    start = time.perf_counter()
    config = load_config(CheckpointReader(model_path).config, f"{model_path}/config.json")
    samples = load_samples(resolve_dataset(dataset, recipe), recipe.default_text)
    plan = make_plan(config, expert_group_size)
    assignment = assign_units(plan, workers)
    writer = CheckpointWriter(save_path, part_file_size_gb=recipe.part_file_size_gb, overwrite=overwrite,
                              model_path=model_path, resume=resume)
    actors, we_started, journal = [], False, None
    try:
        run_log = RunLog(writer.staging, recipe.path)
        Worker(model_path, recipe, UnitSink(writer.spill_dir)).check_source_keys()  # fail here, not in the actors
        ray_started = time.perf_counter()
        ray, we_started = start_ray(ray_address, workers, device)
        ray_seconds = time.perf_counter() - ray_started
        check_capacity(ray, workers, device)
        actors_started = time.perf_counter()
        actors = start_actors(ray, workers, device, model_path, recipe, writer, plan, assignment, threads_per_actor,
                              max_restarts, ship_results)
        inputs = build_model_inputs(model_path, samples, trust_remote_code=trust_remote_code)  # while actors start
        journal = Journal(writer.private_dir, fingerprint(model_path, recipe.path, inputs, expert_group_size), resume)
        kept = journal.intact(writer.spill_dir) if resume else {}
        point = resume_point(writer.private_dir, plan, kept, len(inputs)) if resume else None
        todo = remaining_units(plan, point, kept)
        if resume:
            run_log.write(f"resuming after layer {point.layer if point else 'none'}: {len(plan) - len(todo)} of "
                          f"{len(plan)} units kept, {len(todo)} to run")
        ray.get([actor.node.remote() for actor in actors])
        sweep_started = time.perf_counter()
        reports = submit_graph(ray, actors, plan, assignment, todo, ray.put(inputs), point)
        done = collect_reports(ray, reports, progress, on_unit_done, run_log, journal)
        assemble_started = time.perf_counter()
        tokens = {layer: t for layer, t in journal.expert_tokens.items() if point is not None and layer <= point.layer}
        tokens.update({r.unit.layer: r.expert_tokens for r in done.values() if r.expert_tokens is not None})
        coverage = write_coverage(writer.staging, tokens, run_log)
        for unit in plan:  # plan order, whoever finished first: the same checkpoint for any number of workers
            writer.add_unit(done[unit].record if unit in done else kept[unit.id])
        (writer.private_dir / "probe").unlink()
        export_rotation(writer, recipe, config)
        summary = writer.publish(model_path, recipe_path=recipe.path, **part_writing(ray, actors, done.values()))
        finished = time.perf_counter()
        phases = {}
        for report in done.values():
            add_times(phases, report.phases or {})
        phases["merge"] = finished - assemble_started
    except BaseException as error:
        keep_or_abort(writer, journal, resume)
        if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, DistQuantError):
            raise error.cause from None  # a clear error raised in an actor: show it as such, not as a remote trace
        if isinstance(error, ray.exceptions.RayError):
            raise DistQuantError(f"distributed quantization failed, nothing was published: {error}") from error
        raise
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if we_started:
            ray.shutdown()
    return DistributedSummary(finished - start, len(plan), summary["tensors"], summary["bytes"],
                              dict(summary["counts"]), str(save_path), coverage["experts_without_tokens"],
                              run_log.warnings, phases, summarize_actors(done.values(), workers),
                              ray_seconds, sweep_started - actors_started, assemble_started - sweep_started,
                              finished - assemble_started)


def part_writing(ray, actors: list, reports) -> dict:
    """Actors that share save_path's filesystem assemble the part files in parallel, one part each at a time;
    otherwise the unit files came through the object store and the driver writes the parts itself."""
    if not all(report.record.payload is None for report in reports):
        return {}

    def write_batch(batch):
        ray.get([actors[i % len(actors)].write_part.remote(str(path), part) for i, (path, part) in enumerate(batch)])

    return {"write_parts": write_batch, "parallel_parts": len(actors)}


def collect_reports(ray, reports: dict[Unit, object], progress: bool,
                    on_unit_done: Optional[Callable[[UnitReport], None]], run_log: RunLog,
                    journal: Journal) -> dict[Unit, UnitReport]:
    """Wait for every unit, showing progress with per-actor throughput and an ETA."""
    pending = {ref: unit for unit, ref in reports.items()}
    done: dict[Unit, UnitReport] = {}
    live: dict[int, ActorSummary] = defaultdict(lambda: ActorSummary(-1))
    with tqdm(total=len(reports), desc="quantizing", unit="unit", disable=not progress) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pending.pop(ref)
                report: UnitReport = ray.get(ref)
                done[report.unit] = report
                journal.record(report.record, report.unit.layer, report.expert_tokens)
                run_log.unit(report.unit.name, report.seconds, report.bytes_read,
                             f"actor {report.actor} (pid {report.pid}, {report.host})")
                actor = live[report.actor]
                actor.index, actor.units = report.actor, actor.units + 1
                actor.busy_seconds += report.seconds
                bar.set_postfix_str(_progress_text(live))
                bar.update()
                if on_unit_done is not None:
                    on_unit_done(report)
    return done


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
