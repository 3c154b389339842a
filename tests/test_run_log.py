"""The run log and the calibration coverage report written next to the checkpoint."""

import json
import re
from pathlib import Path

import torch

from dist_quant.calib.dataset import load_samples
from dist_quant.calib.inputs import build_model_inputs
from dist_quant.cli import main
from dist_quant.synthetic import make_calibration_set, make_tiny_model
from helpers import hf_kwargs, load_hf_model

PLAIN_RECIPE = Path(__file__).parent / "data" / "plain_w8a8.yaml"


def quantize(model, calib, save, *extra):
    return main(["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu",
                 "--dataset", str(calib), "--quiet", *extra])


def test_coverage_counts_equal_the_hf_router(tiny_model, calib_index, tmp_path, capsys):
    assert quantize(tiny_model, calib_index, tmp_path / "q", "--config_path", str(PLAIN_RECIPE)) == 0
    coverage = json.loads((tmp_path / "q" / "calibration_coverage.json").read_text())
    model = load_hf_model(tiny_model)
    counts = {}
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda m, a, out, i=i: counts.__setitem__(i, counts.get(i, 0) + torch.bincount(  # 5.x returns a tuple
            torch.topk(out[0] if isinstance(out, tuple) else out, 2, dim=-1).indices.reshape(-1), minlength=8)))
        for i, layer in enumerate(model.model.language_model.layers) if hasattr(layer.mlp, "gate")
        and hasattr(layer.mlp, "experts")]
    with torch.no_grad():
        for sample in build_model_inputs(tiny_model, load_samples(calib_index)):
            model(**hf_kwargs(sample, model))
    for h in hooks:
        h.remove()
    assert set(coverage["layers"]) == {str(i) for i in counts}
    for layer, expected in counts.items():
        assert coverage["layers"][str(layer)]["tokens_per_expert"] == expected.tolist()
    assert f"calibration coverage: {coverage['experts_without_tokens']} expert(s)" in capsys.readouterr().out


def test_experts_without_tokens_are_reported_and_logged(tmp_path, capsys):
    model = make_tiny_model(tmp_path / "m", num_experts=32, top_k=1, num_layers=2)
    calib = make_calibration_set(tmp_path / "calib", num_images=1, size=(16, 16))
    assert quantize(model, calib, tmp_path / "q") == 0
    coverage = json.loads((tmp_path / "q" / "calibration_coverage.json").read_text())
    starved = coverage["experts_without_tokens"]
    assert starved > 0 and starved == sum(len(v["experts_without_tokens"]) for v in coverage["layers"].values())
    for entry in coverage["layers"].values():
        assert entry["experts_without_tokens"] == [e for e, n in enumerate(entry["tokens_per_expert"]) if n == 0]
    assert f"calibration coverage: {starved} expert(s)" in capsys.readouterr().out
    log = (tmp_path / "q" / "quant_run.log").read_text()
    assert "WARNING" in log and f"{starved} of 64 experts received no calibration token" in log
    # the starved experts are still quantized, from their weights alone
    description = json.loads((tmp_path / "q" / "quant_model_description.json").read_text())
    layer, entry = next(iter(coverage["layers"].items()))
    expert = entry["experts_without_tokens"][0]
    assert description[f"model.language_model.layers.{layer}.mlp.experts.{expert}.down_proj.weight"] == "W8A8_DYNAMIC"


def test_run_log_has_recipe_versions_and_every_unit(tiny_model, calib_index, tmp_path):
    assert quantize(tiny_model, calib_index, tmp_path / "q") == 0
    log = (tmp_path / "q" / "quant_run.log").read_text()
    assert "transformers 4.57" in log or "transformers 5" in log
    assert 'type: "quarot"' in log
    for unit in ("vision", "embed", "layer 0", "layer 3 experts 0-7", "head"):
        assert f"unit {unit}" in log


def test_the_single_card_run_shows_its_way_through_the_vision_forward(tiny_model, tmp_path, capsys):
    """The images unit is one unit of the plan but minutes of work at real width: a bar counts its images."""
    calib = make_calibration_set(tmp_path / "images", num_images=3)
    assert main(["quant", "--model_path", str(tiny_model), "--save_path", str(tmp_path / "q"), "--device", "cpu",
                 "--dataset", str(calib), "--config_path", str(PLAIN_RECIPE)]) == 0
    err = capsys.readouterr().err
    shown = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("vision forward:")]
    counts = [re.search(r"\b(\d)/3 \[", line) for line in shown]
    assert [c.group(1) for c in counts if c] == ["0", "1", "2", "3"]
    assert main(["quant", "--model_path", str(tiny_model), "--save_path", str(tmp_path / "q2"), "--device", "cpu",
                 "--dataset", str(calib), "--config_path", str(PLAIN_RECIPE), "--quiet"]) == 0
    assert "vision forward" not in capsys.readouterr().err
