"""Single-card quantization (the fallback mode): one worker in this process runs every unit, no Ray needed."""

from __future__ import annotations

import time
from typing import Optional

from dist_quant.calib.inputs import ModelInputs
from dist_quant.checkpoint.unit_file import UnitSink
from dist_quant.checkpoint.writer import CheckpointWriter
from dist_quant.recipe import Recipe
from dist_quant.runtime.device import resolve_device
from dist_quant.runtime.driver import OnDone, QuantSummary, quantize
from dist_quant.runtime.plan import Unit
from dist_quant.runtime.report import Reporter
from dist_quant.runtime.resume import ResumePoint, save_hidden, save_vision
from dist_quant.runtime.sweep import run_sweep
from dist_quant.runtime.worker import Worker


class LocalExecutor:
    """Runs the units on one Worker in this process, in plan order (the sweep), saving the stream for a resume."""

    workers = 1

    def start(self, model_path: str, recipe: Recipe, writer: CheckpointWriter, plan: list[Unit], device: str,
              compute_threads: int) -> None:
        self.private_dir = writer.private_dir
        self.worker = Worker(model_path, recipe, UnitSink(writer.spill_dir), resolve_device(device),
                             compute_threads=compute_threads)  # validates the config and the checkpoint first
        self.worker.check_source_keys()

    def run(self, todo: list[Unit], point: Optional[ResumePoint], inputs: list[ModelInputs], on_done: OnDone) -> None:
        reporter = Reporter(self.worker)
        streams: list = []  # saved since the previous report: they ride on the next one
        started = [time.perf_counter()]

        def unit_done(unit: Unit) -> None:
            tokens = self.worker.expert_tokens.pop(unit.layer, None) if unit.kind == "attention" else None
            on_done(reporter.report(unit, started[0], tokens, tuple(streams)))
            streams.clear()
            started[0] = time.perf_counter()

        run_sweep(self.worker, inputs, todo, on_unit_done=unit_done, start=point,
                  on_vision_done=lambda vision: streams.append(save_vision(self.private_dir, vision)),
                  on_layer_done=lambda layer, hidden: streams.append(save_hidden(self.private_dir, layer, hidden)))

    def part_writing(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def quantize_single_card(model_path: str, save_path: str, recipe: Recipe, **options) -> QuantSummary:
    """Quantize a checkpoint on one device and publish it to ``save_path`` (options: see ``driver.quantize``)."""
    return quantize(model_path, save_path, recipe, LocalExecutor(), **options)
