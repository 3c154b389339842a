"""One-click presets and msModelSlim-format recipes."""

import json
from pathlib import Path

import pytest

from dist_quant import recipe as recipe_module
from dist_quant.cli import _recipe, _warn_model_type, build_parser, main
from dist_quant.errors import DistQuantError, RecipeError
from dist_quant.presets import BUNDLED_CONFIGS, PRESETS, default_model_type, find_preset
from dist_quant.recipe import load_recipe

MSMODELSLIM_STYLE = Path(__file__).parent / "data" / "msmodelslim_style.yaml"
REFERENCE_CONFIGS = Path(__file__).parent / "data"  # the released config.json files (shared/reference-configs)
# the reference config of each model type with a preset: Qwen3-MoE's are built from the published dimensions
CONFIG_FILES = {"Qwen3-VL-235B-A22B": "Qwen3-VL-235B-A22B", "Qwen3-VL-30B-A3B": "Qwen3-VL-30B-A3B",
                "Qwen3-235B-A22B": "Qwen3-235B-A22B-Instruct-2507", "Qwen3-30B-A3B": "Qwen3-30B-A3B",
                "Qwen3.5-397B-A17B": "Qwen3.5-397B-A17B"}  # Qwen3.5-122B and -35B: no reference config here


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

    assert set(CONFIG_FILES) <= set(MODEL_SHAPES) == {p.model_type for p in PRESETS}
    for model_type in CONFIG_FILES:
        config = reference_config(model_type)
        assert model_type_mismatch(model_type, config) is None
        assert config["model_type"] == find_preset(model_type, "w8a8").family


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
    assert recipe_module.DEFAULT_RECIPE.parent == BUNDLED_CONFIGS
    assert all(p.recipe.is_file() and p.recipe.parent == BUNDLED_CONFIGS for p in PRESETS)


def test_the_model_type_warning_never_blocks_on_a_fifo_config(tmp_path, capsys):
    """The --model_type comparison reads config.json before the command does: through the FIFO-safe reader."""
    import os

    from helpers import deadline

    os.mkfifo(tmp_path / "config.json")
    with deadline(60):
        assert main(["plan", "--model_path", str(tmp_path), "--model_type", "Qwen3-VL-30B-A3B"]) == 2
    assert "is a FIFO (named pipe), not a regular file" in capsys.readouterr().err


# --- Qwen3-MoE presets, and the preset config.json picks --------------------------------------------------------------

def reference_config(model_type: str) -> dict:
    return json.loads((REFERENCE_CONFIGS / f"{CONFIG_FILES[model_type]}.config.json").read_text())


@pytest.mark.parametrize("model_type", ["Qwen3-235B-A22B", "Qwen3-30B-A3B"])
def test_qwen3_moe_presets(model_type):
    """Text-only recipes: attention static W8A8, the router float, experts W8A8_DYNAMIC (w8a8) or W4A8_DYNAMIC
    (w4a8)."""
    for quant_type, experts in (("w8a8", "W8A8_DYNAMIC"), ("w4a8", "W4A8_DYNAMIC")):
        preset = find_preset(model_type, quant_type)
        assert preset.family == "qwen3_moe" and preset.recipe.name == f"qwen3_moe_{quant_type}.yaml"
        recipe = load_recipe(preset.recipe)
        assert [recipe.quant_type(f"model.layers.3.{n}") for n in ("self_attn.q_proj", "self_attn.o_proj",
                                                                  "mlp.gate", "mlp.experts.9.down_proj")] == [
            "W8A8", "W8A8", "FLOAT", experts]


def test_msmodelslims_names_are_accepted():
    """msModelSlim's config.ini names Qwen3-MoE models Qwen3-235B and Qwen3-30B."""
    assert find_preset("Qwen3-235B", "w4a8") == find_preset("Qwen3-235B-A22B", "w4a8")
    assert find_preset("Qwen3-30B", "W8A8") == find_preset("Qwen3-30B-A3B", "w8a8")
    args = build_parser().parse_args(["plan", "--model_path", "m", "--model_type", "Qwen3-235B"])
    assert args.model_type == "Qwen3-235B"


@pytest.mark.parametrize("model_type", list(CONFIG_FILES))
def test_a_config_picks_its_own_preset(model_type):
    assert default_model_type(reference_config(model_type)) == model_type


def test_a_config_of_no_preset_shape_gets_its_familys_first_preset():
    """Qwen3-VL-235B and Qwen3-235B have the same shape: the family tells them apart; a size without a preset of its
    own gets its family's first preset (the family's recipes apply to all its sizes)."""
    for model_type, first in (("Qwen3-30B-A3B", "Qwen3-235B-A22B"), ("Qwen3-VL-30B-A3B", "Qwen3-VL-235B-A22B")):
        config = reference_config(model_type)
        config.get("text_config", config)["num_hidden_layers"] = 4
        assert default_model_type(config) == first
    for unknown in (None, [], {}, {"model_type": "llama"}, {"model_type": ["qwen3_moe"]}):
        assert default_model_type(unknown) == "Qwen3-VL-235B-A22B"  # the command's reading then says what is wrong


def model_folder(tmp_path, model_type, **changes):
    folder = tmp_path / model_type
    folder.mkdir()
    config = reference_config(model_type)
    config.get("text_config", config).update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def parse(*argv):
    return build_parser().parse_args(["quant", "--save_path", "unused", *argv])


@pytest.mark.parametrize("model_type", ["Qwen3-235B-A22B", "Qwen3-30B-A3B"])
def test_without_model_type_a_qwen3_moe_gets_its_recipe(tmp_path, model_type, caplog):
    """A Qwen3-MoE needs no Qwen3-VL name: without --model_type, config.json picks the qwen3_moe preset, and no
    mismatch is said."""
    folder = str(model_folder(tmp_path, model_type))
    assert _recipe(parse("--model_path", folder)).path == BUNDLED_CONFIGS / "qwen3_moe_w8a8.yaml"
    assert _recipe(parse("--model_path", folder, "--quant_type", "w4a8")).path == \
        BUNDLED_CONFIGS / "qwen3_moe_w4a8.yaml"
    other = str(model_folder(tmp_path, "Qwen3-VL-30B-A3B"))
    assert _recipe(parse("--model_path", other, "--quant_type", "w4a8")).path == \
        BUNDLED_CONFIGS / "qwen3_vl_moe_w4a8.yaml"
    _warn_model_type(parse("--model_path", folder))
    assert "names a" not in caplog.text


def test_a_config_path_is_checked_against_the_preset_of_the_configs_family(tmp_path):
    """--config_path with --quant_type and no --model_type: the quant type is checked against the model's own
    family's preset (a qwen3_moe model against qwen3_moe_w4a8.yaml), and agreeing is fine."""
    folder = str(model_folder(tmp_path, "Qwen3-30B-A3B"))
    w8a8 = str(BUNDLED_CONFIGS / "qwen3_moe_w8a8.yaml")
    assert _recipe(parse("--model_path", folder, "--config_path", w8a8, "--quant_type", "w8a8")).path == Path(w8a8)
    with pytest.raises(DistQuantError, match="--quant_type w4a8 quantizes to W4A8_DYNAMIC, W8A8, but --config_path"):
        _recipe(parse("--model_path", folder, "--config_path", w8a8, "--quant_type", "w4a8"))
    assert _recipe(parse("--model_path", str(tmp_path / "missing"), "--config_path", w8a8)).path == Path(w8a8)


def test_a_model_type_of_another_family_is_said(tmp_path, caplog):
    """Qwen3-VL-235B-A22B and Qwen3-235B-A22B have the same shape: the family mismatch is what is said."""
    folder = str(model_folder(tmp_path, "Qwen3-235B-A22B"))
    _warn_model_type(parse("--model_path", folder, "--model_type", "Qwen3-VL-235B-A22B"))
    assert ("--model_type Qwen3-VL-235B-A22B names a qwen3_vl_moe model, but this config.json's model_type is "
            "'qwen3_moe': its preset recipe is used as it is; leave --model_type out") in caplog.text
    caplog.clear()
    _warn_model_type(parse("--model_path", folder, "--model_type", "Qwen3-235B"))
    assert "names a" not in caplog.text
    small = str(model_folder(tmp_path, "Qwen3-30B-A3B", num_hidden_layers=4))
    _warn_model_type(parse("--model_path", small, "--model_type", "Qwen3-30B"))
    assert ("--model_type Qwen3-30B names a model of 48 layers, 128 experts and hidden size 2048, but this "
            "config.json has 4, 128 and 2048") in caplog.text
