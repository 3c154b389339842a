"""Start-up: the command line imports nothing heavy (torch, transformers, Ray, PIL) until a command needs it.

Importing torch and transformers took 4-6 s before every command, 6.6 s for ``dist-quant --help``. Each case runs
in a fresh interpreter (this one has torch loaded by other tests) and lists the heavy modules it ends with. No
timing is asserted: the module list is what decides the start-up, and it does not depend on the machine's load.
"""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
HEAVY = ("torch", "transformers", "ray", "PIL")
RUN_AND_LIST = f"""
import contextlib, io, json, sys
from dist_quant.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(json.loads(sys.argv[1]))
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))
"""


def heavy_modules_after(argv: list[str]) -> list[str]:
    """The heavy modules a fresh interpreter holds after ``dist-quant ARGV`` (its own output swallowed)."""
    done = subprocess.run([sys.executable, "-c", RUN_AND_LIST, json.dumps(argv)], capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_command_line_imports_nothing_heavy():
    code = f"import dist_quant.cli; import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["presets"], ["plan", "--help"], ["quant", "--help"],
                                  ["check", "--help"], ["eval", "--help"], ["report", "--help"]])
def test_help_and_presets_import_nothing_heavy(argv):
    assert heavy_modules_after(argv) == []


@pytest.mark.parametrize("recipe", [[], ["--model_type", "Qwen3-VL-30B-A3B", "--quant_type", "w4a8"],
                                    ["--config_path", str(DATA / "msmodelslim_style.yaml")]])
def test_plan_on_a_config_imports_nothing_heavy(tmp_path, recipe):
    """plan reads config.json into the family's sizes module and the recipe's schemes' declarations (W4A8's ssz
    and GPTQ included, for the time projection): none of them needs torch."""
    shutil.copy(DATA / "Qwen3-VL-30B-A3B.config.json", tmp_path / "config.json")
    assert heavy_modules_after(["plan", "--model_path", str(tmp_path), "--workers", "16", *recipe]) == []


def heavy_modules_after_importing(modules: list[str]) -> list[str]:
    """The heavy modules a fresh interpreter holds after importing ``modules``."""
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return ast.literal_eval(done.stdout.strip())


def test_the_check_and_the_formats_import_nothing_heavy():
    """The rules read dtypes as the safetensors header's names and the few scalars from the bytes; the formats
    import torch and the schemes only in the functions that write or read tensors."""
    assert heavy_modules_after_importing(["dist_quant.check", "dist_quant.check.folder", "dist_quant.check.ascend",
                                          "dist_quant.check.compressed_tensors",
                                          "dist_quant.checkpoint.formats.ascendv1",
                                          "dist_quant.checkpoint.formats.compressed_tensors"]) == []


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny checkpoint in each format (ascendv1 has static W8A8 scalars for R12/R13 to read)."""
    from dist_quant.cli import main
    from dist_quant.synthetic import make_calibration_set, make_tiny_model

    root = tmp_path_factory.mktemp("startup")
    model = make_tiny_model(root / "model", dtype="bfloat16", num_layers=2)
    calib = make_calibration_set(root / "calib", num_images=2)
    for name, extra in (("ascendv1", []), ("compressed-tensors", ["--save_format", "compressed-tensors"])):
        assert main(["quant", "--model_path", str(model), "--save_path", str(root / name), "--device", "cpu",
                     "--dataset", str(calib), "--quiet", *extra]) == 0
    return root


@pytest.mark.parametrize("fmt", ["ascendv1", "compressed-tensors"])
def test_check_imports_nothing_heavy(checkpoints, fmt):
    """check builds what vLLM builds from the family's closed-form shapes (models/qwen3_vl_moe_sizes.py)."""
    assert heavy_modules_after(["check", str(checkpoints / fmt)]) == []
