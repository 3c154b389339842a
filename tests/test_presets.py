"""One-click presets and msModelSlim-format recipes."""

import json
from pathlib import Path

import pytest

from dist_quant import recipe as recipe_module
from dist_quant.cli import main
from dist_quant.errors import RecipeError
from dist_quant.presets import BUNDLED_CONFIGS, PRESETS, find_preset
from dist_quant.recipe import load_recipe

MSMODELSLIM_STYLE = Path(__file__).parent / "data" / "msmodelslim_style.yaml"
REFERENCE_CONFIGS = Path(__file__).parent / "data"  # the released config.json files (shared/reference-configs)


@pytest.mark.parametrize("model_type", ["Qwen3-VL-235B-A22B", "Qwen3-VL-30B-A3B"])
def test_presets_resolve_to_a_valid_recipe(model_type):
    preset = find_preset(model_type, "w8a8")
    recipe = load_recipe(preset.recipe)
    assert recipe.quarot is not None and recipe.smooth is not None and len(recipe.linear_quants) == 2
    assert find_preset(model_type, "W8A8") == preset


@pytest.mark.parametrize("model_type", ["Qwen3-VL-235B-A22B", "Qwen3-VL-30B-A3B"])
def test_w4a8_presets_put_int4_on_the_experts_only(model_type):
    recipe = load_recipe(find_preset(model_type, "w4a8").recipe)
    assert recipe.quarot is not None and recipe.smooth is not None
    types = {name: recipe.quant_type(name) for name in (
        "model.language_model.layers.0.mlp.experts.5.down_proj", "model.language_model.layers.0.self_attn.q_proj",
        "model.visual.blocks.0.attn.qkv", "model.language_model.layers.0.mlp.gate")}
    assert list(types.values()) == ["W4A8_DYNAMIC", "W8A8", "W8A8", "FLOAT"]
    w8a8 = load_recipe(find_preset(model_type, "w8a8").recipe)
    assert recipe.quant_type("model.visual.merger.linear_fc2") == w8a8.quant_type("model.visual.merger.linear_fc2")


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(RecipeError, match="Qwen3-VL-30B-A3B/w8a8"):
        find_preset("Qwen3-VL-8B", "w8a8")


def test_presets_command(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(p.model_type in out and p.recipe.name in out for p in PRESETS)


def test_msmodelslim_style_recipe_loads_unchanged():
    recipe = load_recipe(MSMODELSLIM_STYLE)
    assert recipe.smooth.alpha == 0.8 and recipe.smooth.scale_min == 1e-5
    assert recipe.quarot.block_size == 32 and recipe.dataset == "calibImages"


def test_quantize_with_an_msmodelslim_recipe_and_its_bundled_dataset(tiny_model, tmp_path):
    save = tmp_path / "q"
    assert main(["quant", "--model_path", str(tiny_model), "--save_path", str(save), "--device", "cpu",
                 "--config_path", str(MSMODELSLIM_STYLE), "--quiet"]) == 0  # dataset: calibImages -> bundled photos
    assert (save / MSMODELSLIM_STYLE.name).read_text() == MSMODELSLIM_STYLE.read_text()  # the recipe used is kept
    description = json.loads((save / "quant_model_description.json").read_text())
    assert description["model.language_model.layers.0.mlp.experts.0.gate_proj.weight"] == "W8A8_DYNAMIC"


def test_preset_recipe_is_saved_next_to_the_checkpoint(tiny_model, calib_index, tmp_path):
    save = tmp_path / "q"
    assert main(["quant", "--model_path", str(tiny_model), "--save_path", str(save), "--device", "cpu",
                 "--model_type", "Qwen3-VL-30B-A3B", "--quant_type", "w8a8", "--dataset", str(calib_index),
                 "--quiet"]) == 0
    assert (save / "qwen3_vl_moe_w8a8.yaml").exists()


def test_a_quant_type_that_contradicts_the_recipe_is_refused(tiny_model, tmp_path, capsys):
    """`--quant_type w4a8 --config_path a_w8a8_recipe.yaml` wrote W8A8 without a word: the recipe decides, so the
    contradiction is refused; an agreeing --quant_type is fine."""
    w8a8 = find_preset("Qwen3-VL-235B-A22B", "w8a8").recipe
    args = ["quant", "--model_path", str(tiny_model), "--save_path", str(tmp_path / "q"), "--device", "cpu",
            "--config_path", str(w8a8), "--dry_run"]
    assert main(args + ["--quant_type", "w4a8"]) == 2
    err = capsys.readouterr().err
    assert ("--quant_type w4a8 quantizes to W4A8_DYNAMIC, W8A8, but --config_path" in err
            and "quantizes to W8A8, W8A8_DYNAMIC: the recipe decides" in err)
    assert main(args + ["--quant_type", "w8a8"]) == 0 and not (tmp_path / "q").exists()


def test_a_model_type_that_is_not_the_model_is_said(tiny_model, tmp_path, caplog):
    """`--model_type Qwen3-VL-235B-A22B` on a 4-layer model was accepted silently: it is said (the preset's recipe
    applies to the whole family, so it is not refused); without --model_type nothing is said."""
    args = ["quant", "--model_path", str(tiny_model), "--save_path", str(tmp_path / "q"), "--device", "cpu",
            "--dry_run"]
    assert main(args + ["--model_type", "Qwen3-VL-235B-A22B"]) == 0
    layers = json.loads((tiny_model / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert (f"--model_type Qwen3-VL-235B-A22B names a model of 94 layers, 128 experts and hidden size 4096, but this "
            f"config.json has {layers}, ") in caplog.text
    caplog.clear()
    assert main(args) == 0 and "names a model" not in caplog.text


def test_the_model_shapes_are_the_released_configs():
    from dist_quant.presets import MODEL_SHAPES, model_type_mismatch

    for model_type in MODEL_SHAPES:
        config = json.loads((REFERENCE_CONFIGS / f"{model_type}.config.json").read_text())
        assert model_type_mismatch(model_type, config) is None


@pytest.mark.parametrize("command", ["quant", "plan", "eval", "presets"])
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"dist-quant {command}" in out


def test_a_recipe_without_dataset_uses_the_bundled_photos(tmp_path):
    from dist_quant.runtime.driver import BUNDLED_DATASETS, resolve_dataset

    text = (Path(__file__).parent / "data" / "plain_w8a8.yaml").read_text()
    assert "dataset" not in text
    (tmp_path / "r.yaml").write_text(text)
    assert resolve_dataset(None, load_recipe(tmp_path / "r.yaml")) == BUNDLED_DATASETS / "calibImages"


def test_presets_point_at_the_bundled_recipes():
    """presets.py names the bundled folder itself (it must not import recipe.py, which imports torch)."""
    assert BUNDLED_CONFIGS == recipe_module.BUNDLED_CONFIGS
    assert all(p.recipe.is_file() and p.recipe.parent == BUNDLED_CONFIGS for p in PRESETS)


def test_the_model_type_warning_never_blocks_on_a_fifo_config(tmp_path, capsys):
    """The --model_type comparison reads config.json before the command does: through the FIFO-safe reader."""
    import os

    from helpers import deadline

    os.mkfifo(tmp_path / "config.json")
    with deadline(60):
        assert main(["plan", "--model_path", str(tmp_path), "--model_type", "Qwen3-VL-30B-A3B"]) == 2
    assert "is a FIFO (named pipe), not a regular file" in capsys.readouterr().err
