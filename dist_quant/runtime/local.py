"""Single-card quantization (the fallback mode): one unit runner in this process runs every unit, no Ray needed."""

from __future__ import annotations

from typing import Callable, Optional

from tqdm import tqdm

from dist_quant.calib.inputs import ModelInputs
from dist_quant.checkpoint.writer import CheckpointWriter
from dist_quant.recipe import Recipe
from dist_quant.runtime.driver import OnDone, QuantSummary, quantize
from dist_quant.runtime.interpret import interpret
from dist_quant.runtime.plan import Unit
from dist_quant.runtime.report import UnitReport
from dist_quant.runtime.resume import ResumePoint
from dist_quant.runtime.runner import UnitRunner


class LocalExecutor:
    """Runs the units on one UnitRunner in this process, each reported as soon as it is done (to the driver, and to
    ``on_unit_done(report)`` when given, as the Ray executor does)."""

    workers = 1

    def __init__(self, on_unit_done: Optional[Callable[[UnitReport], None]] = None, progress: bool = False):
        self.on_unit_done = on_unit_done
        self.progress = progress  # a bar through the vision forward (minutes at real width, one unit of the plan)
        self._images: Optional[tqdm] = None

    def start(self, model_path: str, recipe: Recipe, writer: CheckpointWriter, plan: list[Unit], device: str,
              compute_threads: int, opened: tuple) -> None:
        self.runner = UnitRunner(0, model_path, recipe, str(writer.staging), str(writer.private_dir), device, plan,
                                 {}, compute_threads=compute_threads, opened=opened)
        if self.progress:
            self.runner.worker.on_image = self._image_done
        self.writer = writer

    def _image_done(self, done: int, images: int) -> None:
        if self._images is None:
            self._images = tqdm(total=images, desc="vision forward", unit="image", leave=False, mininterval=0)
        self._images.update()
        if done == images:
            self._images.close()
            self._images = None

    def run(self, todo: list[Unit], point: Optional[ResumePoint], inputs: list[ModelInputs], on_done: OnDone) -> None:
        self.runner.reporter.places.update({unit.id: self.writer.places(unit.id) for unit in todo})
        for _, report in interpret(todo, point, inputs, self.runner):
            on_done(report)
            if self.on_unit_done is not None:
                self.on_unit_done(report)

    def close(self) -> None:
        pass


def quantize_single_card(model_path: str, save_path: str, recipe: Recipe,
                         on_unit_done: Optional[Callable[[UnitReport], None]] = None, **options) -> QuantSummary:
    """Quantize a checkpoint on one device and publish it to ``save_path`` (options: see ``driver.quantize``)."""
    return quantize(model_path, save_path, recipe, LocalExecutor(on_unit_done, options.get("progress", True)),
                    **options)
