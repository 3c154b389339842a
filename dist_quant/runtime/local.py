"""Single-card quantization (the fallback mode): one worker runs every unit, no Ray needed."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from dist_quant.calib.dataset import load_samples
from dist_quant.calib.inputs import build_model_inputs
from dist_quant.checkpoint.reader import read_config
from dist_quant.checkpoint.unit_file import UnitSink
from dist_quant.checkpoint.writer import CheckpointWriter
from dist_quant.errors import CalibrationError
from dist_quant.models.qwen3_vl_moe import load_config
from dist_quant.recipe import Recipe
from dist_quant.runtime.device import resolve_device
from dist_quant.runtime.plan import DEFAULT_EXPERT_GROUP_SIZE, make_plan
from dist_quant.runtime.resume import (Journal, fingerprint, remaining_units, resume_point, save_hidden,
                                       save_vision)
from dist_quant.runtime.run_log import RunLog, write_coverage
from dist_quant.runtime.sweep import run_sweep
from dist_quant.runtime.worker import Worker, export_rotation

log = logging.getLogger("dist_quant")

BUNDLED_DATASETS = Path(__file__).resolve().parent.parent / "calib_data"
DEFAULT_DATASET = "calibImages"  # msModelSlim's name for its default calibration images


def resolve_dataset(dataset: Optional[str], recipe: Recipe) -> Path:
    """The calibration set: ``--dataset`` if given, else the recipe's ``dataset`` resolved against the recipe's
    folder, then the working directory, then the bundled calibration sets; the bundled photos when neither names
    one."""
    if dataset is not None:
        path = Path(dataset)
        if not path.exists():
            raise CalibrationError(f"calibration dataset {path} does not exist")
        return path
    if recipe.dataset is None:
        return BUNDLED_DATASETS / DEFAULT_DATASET
    candidates = [recipe.path.parent / recipe.dataset, Path.cwd() / recipe.dataset, BUNDLED_DATASETS / recipe.dataset]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise CalibrationError(
        f"recipe {recipe.path}: dataset {recipe.dataset!r} not found (looked in {[str(c) for c in candidates]}); "
        "pass --dataset DIR_OR_INDEX"
    )


@dataclass
class QuantSummary:
    seconds: float
    units: int
    tensors: int
    bytes_written: int
    counts: dict[str, int] = field(default_factory=dict)
    save_path: str = ""
    experts_without_tokens: int = 0
    warnings: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase, summed over units


def quantize_single_card(model_path: str, save_path: str, recipe: Recipe, *, dataset: Optional[str] = None,
                         device: str = "cpu", overwrite: bool = False, progress: bool = True,
                         trust_remote_code: bool = False, expert_group_size: int = DEFAULT_EXPERT_GROUP_SIZE,
                         resume: bool = False) -> QuantSummary:
    """Quantize a checkpoint on one device and publish it to ``save_path``; nothing finished-looking on failure.

    With ``resume``, an interrupted run of the same model, recipe and calibration set in ``save_path`` continues
    from its last finished layer.
    """
    start = time.perf_counter()
    torch_device = resolve_device(device)
    config_file = Path(model_path) / "config.json"
    load_config(read_config(config_file), str(config_file))  # a clear error before the tokenizer trips over it
    samples = load_samples(resolve_dataset(dataset, recipe), recipe.default_text)
    inputs = build_model_inputs(model_path, samples, trust_remote_code=trust_remote_code)
    writer = CheckpointWriter(save_path, part_file_size_gb=recipe.part_file_size_gb, overwrite=overwrite,
                              model_path=model_path, resume=resume)
    journal = None
    try:
        run_log = RunLog(writer.staging, recipe.path)
        sink = UnitSink(writer.spill_dir)
        worker = Worker(model_path, recipe, sink, torch_device)  # validates the config and the checkpoint first
        worker.check_source_keys()
        plan = make_plan(worker.config, expert_group_size)
        journal = Journal(writer.private_dir, fingerprint(model_path, recipe.path, inputs, expert_group_size), resume)
        kept = journal.intact(writer.spill_dir) if resume else {}
        point = resume_point(writer.private_dir, plan, kept, len(inputs)) if resume else None
        todo = remaining_units(plan, point, kept)
        worker.expert_tokens.update({layer: tokens for layer, tokens in journal.expert_tokens.items()
                                     if point is not None and layer <= point.layer})
        if resume:
            run_log.write(f"resuming after layer {point.layer if point else 'none'}: {len(plan) - len(todo)} of "
                          f"{len(plan)} units kept, {len(todo)} to run")
        records = {unit.id: kept[unit.id] for unit in plan if unit not in todo}
        last = [time.perf_counter(), 0]
        with tqdm(total=len(plan), initial=len(plan) - len(todo), desc="quantizing", unit="unit",
                  disable=not progress) as bar:
            def advance(unit):
                with worker.times.phase("write"):
                    records[unit.id] = sink.finish(unit.id)
                journal.record(records[unit.id], unit.layer,
                               worker.expert_tokens.get(unit.layer) if unit.kind == "attention" else None)
                now, read = time.perf_counter(), worker.reader.bytes_read
                run_log.unit(unit.name, now - last[0], read - last[1])
                last[:] = [now, read]
                bar.set_postfix_str(unit.name)
                bar.update()
            run_sweep(worker, inputs, todo, on_unit_done=advance, start=point,
                      on_vision_done=lambda vision: save_vision(writer.private_dir, vision),
                      on_layer_done=lambda layer, hidden: save_hidden(writer.private_dir, layer, hidden))
        for unit in plan:  # plan order
            writer.add_unit(records[unit.id])
        coverage = write_coverage(writer.staging, worker.expert_tokens, run_log)
        export_rotation(writer, recipe, worker.config)
        run_log.write(f"assembling {len(plan)} unit files into the checkpoint")
        with worker.times.phase("merge"):
            summary = writer.publish(model_path, recipe_path=recipe.path)
    except BaseException:
        keep_or_abort(writer, journal, resume)
        raise
    return QuantSummary(time.perf_counter() - start, len(plan), summary["tensors"], summary["bytes"],
                        dict(summary["counts"]), str(save_path), coverage["experts_without_tokens"], run_log.warnings,
                        dict(worker.times.totals))


def keep_or_abort(writer: CheckpointWriter, journal: Optional[Journal], resume: bool) -> None:
    """After a failure: keep the staging folder when finished units can be resumed (or when this was an attempt to
    resume it), else remove it. Either way the save path holds nothing that looks like a finished checkpoint."""
    if resume:
        log.error("the interrupted run in %s is kept", writer.staging)
    elif journal is not None and journal.finished:
        log.error("%d finished unit(s) are kept in %s: fix the problem and rerun the same command with --resume to "
                  "continue (or with --overwrite to start over)", len(journal.finished), writer.staging)
    else:
        writer.abort()
