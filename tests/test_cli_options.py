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
    """The CLI spells out two defaults whose modules import torch (to start without it): they must stay the same."""
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
