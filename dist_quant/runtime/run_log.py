"""What a run leaves next to the checkpoint besides the tensors: a log (recipe, versions, per-unit timings, warnings),
the calibration coverage of every expert (tokens routed to it; experts that got none were quantized data-free,
which W8A8_DYNAMIC allows, but they deserve a look) and the timeline of its units (which actor ran what, when)."""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from dist_quant.checkpoint.unit_file import writing

log = logging.getLogger("dist_quant")

LOG_FILE = "quant_run.log"
COVERAGE_FILE = "calibration_coverage.json"
TIMELINE_FILE = "quant_timeline.json"
PACKAGES = ("dist-quant", "torch", "torch_npu", "transformers", "safetensors", "ray")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


class RunLog:
    """Appends to ``quant_run.log`` in the staging folder (published with the checkpoint) and mirrors warnings to
    the console."""

    def __init__(self, staging: Path, recipe_path: Path, argv: list[str] | None = None, append: bool = False):
        """``append``: a resumed run continues the interrupted run's log instead of replacing it."""
        self.path = staging / LOG_FILE
        self.start = time.perf_counter()
        self.warnings: list[str] = []
        lines = [f"dist-quant run started {time.strftime('%Y-%m-%d %H:%M:%S')}",
                 f"command: {' '.join(argv if argv is not None else sys.argv)}",
                 "versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
                 f"recipe {recipe_path}:", *("  " + line for line in recipe_path.read_text().splitlines()), ""]
        with writing(self.path), open(self.path, "a" if append else "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def write(self, line: str) -> None:
        with writing(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(f"[{time.perf_counter() - self.start:8.2f}s] {line}\n")

    def unit(self, name: str, seconds: float, bytes_read: int, where: str = "") -> None:
        self.write(f"unit {name}{' on ' + where if where else ''}: {seconds:.2f} s, read {bytes_read / 2**20:.1f} MiB")

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.write(f"WARNING {message}")
        log.warning("warning: %s", message)


def coverage_report(expert_tokens: dict[int, list[int]]) -> dict:
    """Per MoE layer: calibration tokens routed to each expert, and the experts that got none."""
    layers = {}
    for layer, counts in sorted(expert_tokens.items()):
        layers[str(layer)] = {"tokens_per_expert": counts,
                              "experts_without_tokens": [e for e, n in enumerate(counts) if n == 0]}
    starved = sum(len(entry["experts_without_tokens"]) for entry in layers.values())
    total = sum(len(entry["tokens_per_expert"]) for entry in layers.values())
    return {"layers": layers, "experts": total, "experts_without_tokens": starved}


def write_coverage(staging: Path, expert_tokens: dict[int, list[int]], run_log: RunLog) -> dict:
    """Write the coverage report and warn, in one line, about experts that no calibration token reached."""
    report = coverage_report(expert_tokens)
    layers = ",\n".join(f"  {json.dumps(layer)}: {json.dumps(entry)}" for layer, entry in report["layers"].items())
    (staging / COVERAGE_FILE).write_text(  # one line per layer: readable for 94 layers x 128 experts
        f'{{"experts": {report["experts"]}, "experts_without_tokens": {report["experts_without_tokens"]}, '
        f'"layers": {{\n{layers}\n}}}}\n')
    if report["experts_without_tokens"]:
        worst = sorted(report["layers"].items(), key=lambda kv: -len(kv[1]["experts_without_tokens"]))[:3]
        where = ", ".join(f"layer {layer}: {len(entry['experts_without_tokens'])}" for layer, entry in worst)
        run_log.warn(f"{report['experts_without_tokens']} of {report['experts']} experts received no calibration "
                     f"token ({where}); they were quantized from their weights alone. More or more varied calibration "
                     f"samples would exercise them (see {COVERAGE_FILE}).")
    return report


def write_timeline(staging: Path, plan: list, reports: list, workers: int, started_at: float) -> dict:
    """Every unit of the plan in plan order: where and when it ran (seconds since the run started), its phases, the
    bytes it read and its process's peak RSS so far; a unit an interrupted run had finished is ``"kept"``, without
    times (the run that computed it is gone)."""
    ran = {r.unit.id: r for r in reports}
    units = []
    for unit in plan:
        entry = {"id": unit.id, "name": unit.name, "kind": unit.kind.value, "layer": unit.layer}
        report = ran.get(unit.id)
        if report is None:
            entry["kept"] = True
        else:
            entry.update(actor=report.actor, host=report.host, pid=report.pid,
                         start=round(report.started_at - started_at, 4), seconds=round(report.seconds, 4),
                         bytes_read=report.bytes_read, peak_rss=report.peak_rss,
                         phases={k: round(v, 4) for k, v in (report.phases or {}).items()})
        units.append(entry)
    timeline = {"workers": workers, "started_at": started_at, "units": units}
    (staging / TIMELINE_FILE).write_text(json.dumps(timeline, indent=1) + "\n")
    return timeline
