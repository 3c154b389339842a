"""The run log and the calibration coverage report written next to the checkpoint."""

import json
import re

import pytest
import torch
from transformers import Qwen3MoeForCausalLM

from dist_quant.calib.dataset import load_samples
from dist_quant.calib.inputs import build_model_inputs
from dist_quant.cli import main
from dist_quant.synthetic import make_calibration_set, make_tiny_model, make_tiny_text_model
from helpers import FAMILY_TYPES, LAYERS, PLAIN_RECIPE, hf_kwargs, load_hf_model, text_calibration_set


def quantize(model, calib, save, *extra):
    return main(["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu",
                 "--dataset", str(calib), "--quiet", *extra])


def test_coverage_counts_equal_the_hf_router(family_model, tmp_path, capsys):
    tiny_model, calib_index = family_model.model, family_model.dataset
    assert quantize(tiny_model, calib_index, tmp_path / "q", "--config_path", str(PLAIN_RECIPE)) == 0
    coverage = json.loads((tmp_path / "q" / "calibration_coverage.json").read_text())
    images = family_model.model_type == "qwen3_vl_moe"
    if images:
        model = load_hf_model(tiny_model)
        layers = model.model.language_model.layers
    else:  # the text family: its own transformers class, text samples only
        model = Qwen3MoeForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
        layers = model.model.layers
    top_k, experts = model.config.get_text_config().num_experts_per_tok, model.config.get_text_config().num_experts
    counts = {}
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda m, a, out, i=i: counts.__setitem__(i, counts.get(i, 0) + torch.bincount(  # 5.x returns a tuple
            torch.topk(out[0] if isinstance(out, tuple) else out, top_k, dim=-1).indices.reshape(-1),
            minlength=experts)))
        for i, layer in enumerate(layers) if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")]
    with torch.no_grad():
        for sample in build_model_inputs(tiny_model, load_samples(calib_index, images=images), images=images):
            model(**hf_kwargs(sample, model))
    for h in hooks:
        h.remove()
    assert set(coverage["layers"]) == {str(i) for i in counts}
    for layer, expected in counts.items():
        assert coverage["layers"][str(layer)]["tokens_per_expert"] == expected.tolist()
    assert f"calibration coverage: {coverage['experts_without_tokens']} expert(s)" in capsys.readouterr().out


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_experts_without_tokens_are_reported_and_logged(tmp_path, capsys, family):
    if family == "qwen3_vl_moe":
        model = make_tiny_model(tmp_path / "m", num_experts=32, top_k=1, num_layers=2)
        calib = make_calibration_set(tmp_path / "calib", num_images=1, size=(16, 16))
    else:  # a short text routes fewer tokens than 32 experts
        model = make_tiny_text_model(tmp_path / "m", num_experts=32, top_k=1, num_layers=2)
        calib = text_calibration_set(tmp_path / "calib", texts=("Seven times eight is fifty-six.",))
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
    assert description[f"{LAYERS[family]}.{layer}.mlp.experts.{expert}.down_proj.weight"] == "W8A8_DYNAMIC"


UNITS = {  # some units of each tiny model's plan, named by hand (default expert groups of 16: one per layer)
    "qwen3_vl_moe": ("vision", "embed", "layer 0", "layer 3 experts 0-7", "head"),
    "qwen3_moe": ("embed", "layer 0", "layer 1", "layer 2 experts 0-7", "head"),
}


def test_run_log_has_recipe_versions_and_every_unit(family_model, family_checkpoint):
    """The run of the model's preset (family_checkpoint: `quant` without --config_path)."""
    log = (family_checkpoint / "quant_run.log").read_text()
    assert "transformers 4.57" in log or "transformers 5" in log
    assert 'type: "quarot"' in log and f"config_id: {family_model.model_type}_w8a8" in log  # the family's preset
    for unit in UNITS[family_model.model_type]:
        assert f"unit {unit}" in log
    if family_model.model_type == "qwen3_moe":
        assert "unit vision" not in log and "unit layer 1 experts" not in log  # no tower; layer 1 is a dense MLP


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
