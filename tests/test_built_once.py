"""What a run needs once is built once per process, and the driver stands apart from the worker.

1. A single-card run (driver, layout and worker in one process) reads and checks the model's config once, checks the
   recipe against the model once and builds each QuaRot rotation once, counted where the work happens.
2. The driver imports nothing from runtime/worker.py: it learns the layout from runtime/layout.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

from dist_quant.algorithms import hadamard
from dist_quant.models import qwen3_vl_moe_config
from dist_quant.presets import find_preset
from dist_quant.recipe import load_recipe
from dist_quant.runtime import assignments, driver, rotation
from dist_quant.runtime.local import quantize_single_card


def counting(patch, owner, name: str) -> list:
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    patch.setattr(owner, name, counted)
    return calls


def test_a_single_card_run_builds_config_recipe_check_and_rotations_once(tiny_model, calib_index, tmp_path,
                                                                         monkeypatch):
    recipe = load_recipe(find_preset("Qwen3-VL-30B-A3B", "w8a8").recipe)  # QuaRot and smoothing
    assert recipe.quarot is not None
    rotation._stream_block.cache_clear()  # other tests of this process may have built them
    rotation._head.cache_clear()
    configs_read = counting(monkeypatch, qwen3_vl_moe_config, "load_config")
    recipe_checks = counting(monkeypatch, assignments, "check_linear_quants_apply")
    rotations = counting(monkeypatch, hadamard, "check_orthogonal")
    quantize_single_card(str(tiny_model), str(tmp_path / "out"), recipe, dataset=str(calib_index), progress=False,
                         max_samples=1)
    assert (tmp_path / "out" / "quant_model_description.json").is_file()
    assert len(configs_read) == 1
    assert len(recipe_checks) == 1
    assert sorted(what for _, what in rotations) == ["the QuaRot head rotation", "the QuaRot rotation block"]


def test_the_driver_imports_nothing_from_the_worker():
    tree = ast.parse(Path(driver.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "dist_quant.runtime.layout" in imported
    assert not {name for name in imported if name and name.endswith("worker")}
