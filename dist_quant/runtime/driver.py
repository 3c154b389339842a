"""The driver skeleton both modes share: inputs, save_path lock, journal and resume, coverage, run log, publish.

An executor decides only where units run: ``local.LocalExecutor`` calls one Worker in this process (single card, no
Ray), ``ray_driver.RayExecutor`` hands the units to Ray actors. Everything that makes a run resumable and its
checkpoint identical whoever ran it lives here, once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

from tqdm import tqdm

from dist_quant import failpoints
from dist_quant.calib import DEFAULT_TEXT_DATASET
from dist_quant.calib.dataset import load_samples
from dist_quant.calib.inputs import DEFAULT_MAX_SAMPLE_TOKENS, ModelInputs, build_model_inputs
from dist_quant.check import refuse_unservable
from dist_quant.checkpoint import formats
from dist_quant.checkpoint.writer import CheckpointWriter
from dist_quant.errors import CalibrationError, DistQuantError, OutputError
from dist_quant.models.family import load_checked, reads_images
from dist_quant.recipe import Recipe
from dist_quant.runtime.assignments import check_recipe_for_model
from dist_quant.runtime.device import DEFAULT_COMPUTE_THREADS, set_compute_threads
from dist_quant.runtime.layout import unit_entries
from dist_quant.runtime.plan import DEFAULT_EXPERT_GROUP_SIZE, Kind, Unit, plan_units
from dist_quant.runtime.report import UnitReport
from dist_quant.runtime.resume import Journal, ResumePoint, fingerprint, remaining_units, resume_point
from dist_quant.runtime.rotation import export_rotation
from dist_quant.runtime.run_log import RunLog, write_coverage, write_timeline
from dist_quant.runtime.timing import add_times

log = logging.getLogger("dist_quant")

BUNDLED_DATASETS = Path(__file__).resolve().parent.parent / "calib_data"
DEFAULT_DATASET = "calibImages"  # msModelSlim's name for its default calibration images
RUN_FILE = "quant_run.json"  # published: the run's fingerprint, so a later --resume knows the checkpoint is its own


def resolve_dataset(dataset: Optional[str], recipe: Recipe, images: bool = True) -> Path:
    """The calibration set: ``--dataset`` if given, else the recipe's ``dataset`` resolved against the recipe's
    folder, then the working directory, then the bundled calibration sets; when neither names one, the bundled
    photos (``images``: a family whose samples hold images) or the bundled texts."""
    if dataset is not None:
        path = Path(dataset)
        if not path.exists():
            raise CalibrationError(f"calibration dataset {path} does not exist")
        return path
    if recipe.dataset is None:
        return BUNDLED_DATASETS / (DEFAULT_DATASET if images else DEFAULT_TEXT_DATASET)
    candidates = [recipe.path.parent / recipe.dataset, Path.cwd() / recipe.dataset, BUNDLED_DATASETS / recipe.dataset]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise CalibrationError(
        f"recipe {recipe.path}: dataset {recipe.dataset!r} not found (looked in {[str(c) for c in candidates]}); "
        "pass --dataset DIR_OR_INDEX"
    )


def calibration_samples(dataset: Optional[str], recipe: Recipe, family) -> tuple[Path, list, bool]:
    """(the calibration set, its samples, whether they hold images) for a model of ``family``: the set
    ``resolve_dataset`` finds, read as the family takes its samples (images and text, or text only)."""
    images = reads_images(family)
    path = resolve_dataset(dataset, recipe, images)
    return path, load_samples(path, recipe.default_text, images=images), images


def checked_start(model_path: str, recipe: Recipe, dataset: Optional[str]) -> tuple[tuple, Path, list, bool]:
    """What quant checks before any work, and what ``--dry_run`` checks the same way: the model against its
    weights' headers (``load_checked``: (family, reader, config)), its calibration samples as the family reads them,
    and the recipe against the model. Returns (that triple, the calibration set, its samples, whether they hold
    images)."""
    opened = load_checked(model_path)
    family, _, config = opened
    dataset_path, samples, images = calibration_samples(dataset, recipe, family)
    check_recipe_for_model(recipe, config)
    return opened, dataset_path, samples, images


@dataclass(kw_only=True)
class QuantSummary:
    """What a run did (the single card's; ``ray_driver.DistributedSummary`` adds the actors'), built by keyword."""

    seconds: float
    units: int
    tensors: int
    bytes_written: int
    counts: dict[str, int] = field(default_factory=dict)
    save_path: str = ""
    experts_without_tokens: int = 0
    warnings: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase, summed over units
    ran_units: list[str] = field(default_factory=list)  # ids of the units this run computed (all but a resume's kept)
    bytes_read: int = 0  # source bytes this run read
    already_complete: bool = False  # --resume found the checkpoint already published


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run: what was kept, so the command line can say how to continue."""

    def __init__(self, kept_units: int, staging: Path, signal_name: str = "Ctrl-C"):
        super().__init__(signal_name)
        self.kept_units, self.staging, self.signal_name = kept_units, staging, signal_name


OnDone = Callable[[UnitReport], None]


class Executor(Protocol):
    """Where units run. ``start`` may work while the driver builds the calibration inputs (Ray starts actors)."""

    workers: int

    def start(self, model_path: str, recipe: Recipe, writer: CheckpointWriter, plan: list[Unit], device: str,
              compute_threads: int, opened: tuple) -> None: ...  # opened: load_checked's (family, reader, config)

    def run(self, todo: list[Unit], point: Optional[ResumePoint], inputs: list[ModelInputs],
            on_done: OnDone) -> None: ...


    def close(self) -> None: ...


def _dataset_folder(dataset: Path) -> Path:
    return dataset if dataset.is_dir() else dataset.parent


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DistQuantError(f"--{name} must be a whole number of at least 1, got {value!r}")


def cap_samples(samples: list, max_samples: Optional[int], dataset: Path) -> list:
    """The first ``max_samples`` of the calibration set (all of them when None), saying when some are left out."""
    if max_samples is not None:
        check_positive(max_samples=max_samples)
        if len(samples) > max_samples:
            log.info("calibrating on the first %d of the %d samples of %s (--max_samples)", max_samples,
                     len(samples), dataset)
            return samples[:max_samples]
    return samples


def quantize(model_path: str, save_path: str, recipe: Recipe, executor: Executor, *, dataset: Optional[str] = None,
             device: str = "cpu", overwrite: bool = False, progress: bool = True, trust_remote_code: bool = False,
             expert_group_size: int = DEFAULT_EXPERT_GROUP_SIZE, resume: bool = False,
             compute_threads: int = DEFAULT_COMPUTE_THREADS,
             max_sample_tokens: int = DEFAULT_MAX_SAMPLE_TOKENS, max_samples: Optional[int] = None) -> QuantSummary:
    """Quantize ``model_path`` with ``executor`` and publish one checkpoint to ``save_path``; on failure nothing
    finished-looking is left, and finished units are kept for ``resume`` (which also finishes an interrupted
    publish, and answers at once when the checkpoint is already complete)."""
    start, started_at = time.perf_counter(), time.time()
    check_positive(expert_group_size=expert_group_size, compute_threads=compute_threads,
                   max_sample_tokens=max_sample_tokens, workers=executor.workers)
    set_compute_threads(compute_threads)
    opened, dataset_path, samples, images = checked_start(model_path, recipe, dataset)  # before any worker starts
    config = opened[2]
    samples = cap_samples(samples, max_samples, dataset_path)
    plan = plan_units(config, expert_group_size, executor.workers)  # a share of the images per worker
    writer = CheckpointWriter(save_path, part_file_size_gb=recipe.part_file_size_gb, overwrite=overwrite,
                              output_format=formats.for_saver(recipe.saver),
                              model_path=model_path, protected=[(_dataset_folder(dataset_path), "calibration set")],
                              resume=resume)
    journal = None

    def inputs_and_fingerprint():
        inputs = build_model_inputs(model_path, samples, images=images, trust_remote_code=trust_remote_code,
                                    max_tokens=max_sample_tokens)
        return inputs, fingerprint(model_path, recipe.path, inputs, expert_group_size, compute_threads, device,
                                   recipe.saver)

    try:
        failpoints.reach("startup")
        if resume and writer.published:
            inputs, run = inputs_and_fingerprint()
            if not overwrite or _published_run(writer) == run:
                return _already_complete(writer, run, start, len(plan))
            writer.start_afresh()  # --resume --overwrite over another run's checkpoint: what --overwrite says
        if resume and not writer.resuming:
            log.info("--resume: %s holds no interrupted run (nothing had finished); starting from the beginning",
                     writer.save_path)
        run_log = RunLog(writer.staging, recipe.path, append=writer.resuming)
        sigterm = signal.getsignal(signal.SIGTERM)
        executor.start(model_path, recipe, writer, plan, device, compute_threads, opened)  # Ray: actors start now
        if callable(sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)  # Ray's runtime installs its own handler, which aborts
        writer.set_layout(unit_entries(*opened, recipe, plan))  # every tensor's place, before any unit runs
        inputs, run = inputs_and_fingerprint()
        journal = Journal(writer.private_dir, {**run, "overwrite": overwrite}, writer.resuming)
        if writer.moving:  # killed while moving the finished files into save_path: finish that
            run_log.write("resuming the publishing of a finished checkpoint")
            summary = writer.resume_publish()
            return QuantSummary(seconds=time.perf_counter() - start, units=len(plan), tensors=summary["tensors"],
                                bytes_written=summary["bytes"], counts=summary["counts"], save_path=str(save_path))
        writer.create_parts()
        reports = _run_units(executor, writer, journal, plan, inputs, run_log, progress)
        coverage = write_coverage(writer.staging, journal.expert_tokens, run_log)
        write_timeline(writer.staging, plan, reports, executor.workers, started_at)
        export_rotation(writer, recipe, config)
        (writer.staging / RUN_FILE).write_text(json.dumps({"fingerprint": run}, indent=2) + "\n")
        run_log.write(f"publishing the checkpoint of {len(plan)} units")
        assemble_started = time.perf_counter()
        summary = writer.publish(model_path, recipe_path=recipe.path,
                                 finish=lambda folder: _finish_folder(folder, run_log))
    except KeyboardInterrupt as interrupt:
        with _signals_held():
            kept = _give_up(writer, journal, quiet=True)
            executor.close()
        raise RunInterrupted(kept, writer.staging, str(interrupt) or "Ctrl-C") from None
    except BaseException:
        with _signals_held():
            _give_up(writer, journal)
        raise
    finally:
        with _signals_held():
            executor.close()
    phases: dict[str, float] = {}
    for report in reports:
        add_times(phases, report.phases or {})
    phases["merge"] = time.perf_counter() - assemble_started
    return QuantSummary(seconds=time.perf_counter() - start, units=len(plan), tensors=summary["tensors"],
                        bytes_written=summary["bytes"], counts=dict(summary["counts"]), save_path=str(save_path),
                        experts_without_tokens=coverage["experts_without_tokens"], warnings=run_log.warnings,
                        phases=phases, ran_units=[r.unit.id for r in reports],
                        bytes_read=sum(r.bytes_read for r in reports))


def _finish_folder(folder: Path, run_log: RunLog) -> None:
    """The last step before publishing: the serving engine's loader rules must pass (or nothing is published), then
    report.html is drawn from the files next to the checkpoint (a failure there only warns: the checkpoint is fine)."""
    from dist_quant.check import summary_line
    from dist_quant.htmlreport import write_report

    report = refuse_unservable(folder)
    run_log.write(summary_line(report))
    try:
        write_report(folder, check=report)
    except Exception as error:  # noqa: BLE001 (a drawing bug must not cost a finished checkpoint)
        run_log.warn(f"report.html could not be drawn ({type(error).__name__}: {error}); `dist-quant report` "
                     "draws it again from the published files")


def _run_units(executor: Executor, writer: CheckpointWriter, journal: Journal, plan: list[Unit],
               inputs: list[ModelInputs], run_log: RunLog, progress: bool) -> list[UnitReport]:
    """Run what the journal does not already hold (each unit's tensors written to the part files as it finishes);
    returns the reports of the units that ran. The images units are not journaled: what they compute is only the
    vision unit's input, so a resume that has the vision unit does not need them, and one that does not reruns them."""
    kept = {unit_id: record for unit_id, record in journal.finished.items()
            if writer.unit_intact(record)} if writer.resuming else {}
    for record in kept.values():
        writer.add_unit(record)
    point = resume_point(writer.private_dir, plan, kept, journal, len(inputs)) if writer.resuming else None
    todo = remaining_units(plan, point, kept)
    if writer.resuming:
        line = (f"--resume: {len(plan) - len(todo)} of {len(plan)} units kept from the interrupted run, {len(todo)} "
                f"to run ({f'from layer {point.layer + 1}' if point else 'every layer'})")
        run_log.write(line)
        log.info("%s", line)
    reports: list[UnitReport] = []
    live: dict[int, list] = {}
    processes: dict[int, tuple[int, str]] = {}  # actor -> the (pid, host) that reported its last unit
    with tqdm(total=len(plan), initial=len(plan) - len(todo), desc="quantizing", unit="unit",
              disable=not progress) as bar:
        def on_done(report: UnitReport) -> None:
            writer.add_unit(report.record)  # its bytes are in the part files from here on (written by the worker,
            record = dataclasses.replace(report.record, payload=None)  # or now, from the object store)
            for stream in report.streams:
                journal.record_stream(stream)
            if report.unit.kind is not Kind.IMAGES:
                journal.record(record, report.unit.layer, report.expert_tokens)
            journal.prune_streams(plan)
            failpoints.reach("unit")
            reports.append(dataclasses.replace(report, record=record))
            _note_restart(processes, report, run_log)
            where = f"actor {report.actor} (pid {report.pid}, {report.host})" if executor.workers > 1 else ""
            run_log.unit(report.unit.name, report.seconds, report.bytes_read, where)
            units, busy = live.setdefault(report.actor, [0, 0.0])
            live[report.actor] = [units + 1, busy + report.seconds]
            bar.set_postfix_str(_progress_text(live) if executor.workers > 1 else report.unit.name)
            bar.update()

        executor.run(todo, point, inputs, on_done)
    return reports


def _note_restart(processes: dict[int, tuple[int, str]], report: UnitReport, run_log: RunLog) -> None:
    """An actor whose unit is reported by another process than its previous one was restarted (Ray restarts a
    killed actor and runs its unit again): one warning, on the console and in quant_run.log."""
    now = (report.pid, report.host)
    before = processes.setdefault(report.actor, now)
    if before != now:
        run_log.warn(f"actor {report.actor} was restarted (pid {before[0]} on {before[1]} is gone, pid {now[0]} on "
                     f"{now[1]} took over); the units it had in hand ran again, the checkpoint is unaffected")
        processes[report.actor] = now


def _progress_text(live: dict[int, list]) -> str:
    return " | ".join(f"a{a} {units}u {units / busy:.1f}u/s" if busy else f"a{a} {units}u"
                      for a, (units, busy) in sorted(live.items()))


@contextlib.contextmanager
def _signals_held():
    """A second Ctrl-C or SIGTERM while the run cleans up would cut the cleanup short (and the message saying what
    was kept): they wait until it is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, frame: pending.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _published_run(writer: CheckpointWriter) -> Optional[dict]:
    try:
        return json.loads((writer.save_path / RUN_FILE).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _already_complete(writer: CheckpointWriter, run: dict, start: float, units: int) -> QuantSummary:
    """--resume on a checkpoint that was published: fine when it is this run's, refused when it is another's."""
    published = _published_run(writer)
    changed = [k for k in run if not isinstance(published, dict) or published.get(k) != run[k]]
    writer.close()
    if changed:
        raise OutputError(f"save path {writer.save_path} holds a finished checkpoint of another run (its "
                          f"{', '.join(changed)} differ(s)); use --overwrite without --resume to replace it")
    types = writer.output_format.published_types(writer.save_path)
    return QuantSummary(seconds=time.perf_counter() - start, units=units, tensors=len(types), bytes_written=0,
                        counts=dict(Counter(types.values())), save_path=str(writer.save_path), already_complete=True)


def _give_up(writer: CheckpointWriter, journal: Optional[Journal], quiet: bool = False) -> int:
    """After a failure or an interruption: keep the staging folder when something can be resumed (finished units,
    a publish under way, or an attempt to resume), else remove it; returns the number of finished units kept.
    Either way save_path holds nothing that looks like a finished checkpoint, and its lock is released."""
    finished = len(journal.finished) if journal is not None else 0
    if writer.resuming or finished or writer.moving:
        if not quiet:
            log.error("%d finished unit(s) are kept in %s: rerun the same command with --resume to continue (or "
                      "with --overwrite and without --resume to start over)", finished, writer.staging)
        writer.close()
        return finished
    writer.abort()
    return 0
