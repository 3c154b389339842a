"""Every numeric option is checked before anything runs: a negative expert group size once wrote a checkpoint
without experts, with exit code 0."""

import pytest

from dist_quant.cli import build_parser, main
from dist_quant.errors import DistQuantError
from dist_quant.recipe import load_recipe
from dist_quant.runtime.local import quantize_single_card

QUANT = ["quant", "--model_path", "m", "--save_path", "s", "--device", "cpu"]
PLAN = ["plan", "--model_path", "m"]
EVAL = ["eval", "--model_path", "m", "--quant_path", "q"]


@pytest.mark.parametrize("command, option", [
    (QUANT, "--expert_group_size"), (QUANT, "--workers"), (QUANT, "--compute_threads"),
    (QUANT, "--max_sample_tokens"), (PLAN, "--workers"), (PLAN, "--expert_group_size"), (PLAN, "--calib_tokens"),
    (PLAN, "--cards_per_node"), (PLAN, "--card_memory_gb"), (PLAN, "--storage_read_gbps"),
    (PLAN, "--storage_write_gbps"), (PLAN, "--matmul_tflops"), (PLAN, "--compute_threads"), (EVAL, "--max_samples"),
])
@pytest.mark.parametrize("value", ["-3", "0", "abc", "nan"])
def test_out_of_range_numbers_are_refused(capsys, command, option, value):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and ("at least 1" in err or "above 0" in err or "expected" in err), err


def test_the_python_api_checks_them_too(tmp_path):
    with pytest.raises(DistQuantError, match="expert_group_size must be a whole number of at least 1"):
        quantize_single_card(str(tmp_path / "m"), str(tmp_path / "s"), load_recipe(), expert_group_size=-3)
    with pytest.raises(DistQuantError, match="compute_threads must be a whole number of at least 1, got 0"):
        quantize_single_card(str(tmp_path / "m"), str(tmp_path / "s"), load_recipe(), compute_threads=0)
    assert not (tmp_path / "s").exists()


def test_the_command_lines_defaults_are_the_librarys():
    """The CLI shows the defaults the library uses (read from their torch-free homes: calib, runtime.device)."""
    from dist_quant.calib.inputs import DEFAULT_MAX_SAMPLE_TOKENS
    from dist_quant.runtime.device import DEFAULT_COMPUTE_THREADS

    quant = build_parser().parse_args(QUANT)
    plan = build_parser().parse_args(PLAN)
    assert quant.max_sample_tokens == DEFAULT_MAX_SAMPLE_TOKENS
    assert quant.compute_threads == plan.compute_threads == DEFAULT_COMPUTE_THREADS


@pytest.mark.parametrize("option, value", [("--model_type", "Qwen3-VL-8B"), ("--quant_type", "w2a8")])
def test_plan_takes_only_the_presets_values(capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        main([*PLAN, option, value])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_control_characters_never_reach_the_terminal(tmp_path, capsys):
    """An error quotes what a file says: an escape sequence in a recipe value (here one that clears the line and
    hides what follows) is printed as \\xNN."""
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).parent / "data" / "Qwen3-VL-30B-A3B.config.json", tmp_path / "config.json")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("apiversion: multimodal_vlm_modelslim_v1\nspec:\n  process:\n    - type: linear_quant\n"
                      "      qconfig:\n        act: {scope: per_tensor, dtype: int8, symmetric: false, "
                      "method: \"\\e[2K\\rALL FINE\\e[8m\"}\n"
                      "        weight: {scope: per_channel, dtype: int8, symmetric: true, method: minmax}\n"
                      "      include: ['*']\n")
    assert main(["plan", "--model_path", str(tmp_path), "--config_path", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err and "\\x1b[2K\\x0dALL FINE\\x1b[8m" in err
