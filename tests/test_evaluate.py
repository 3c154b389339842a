"""The evaluator: its int8 linears equal hand-written integer arithmetic exactly, an all-FLOAT checkpoint evaluates
as identical to the float model, and a W8A8 checkpoint is close but not identical."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from dist_quant.calib.dataset import load_samples
from dist_quant.calib.inputs import build_model_inputs
from dist_quant.cli import main
from dist_quant.evaluate import evaluate
from dist_quant.schemes import LinearSpec, w8a8, w8a8_dynamic

PLAIN_RECIPE = Path(__file__).parent / "data" / "plain_w8a8.yaml"


def test_static_linear_equals_integer_arithmetic_exactly():
    torch.manual_seed(0)
    w, b, x = torch.randn(6, 40), torch.randn(6), torch.randn(5, 40) * 3
    t = w8a8.quantize(w, b, LinearSpec(input_range=(float(x.min()), float(x.max())), model_dtype=torch.bfloat16))
    y = w8a8.serve(t)(x)
    s, o = t["input_scale"].item(), t["input_offset"].item()
    for i in range(5):
        xq = [max(-128, min(127, int(torch.round(torch.tensor(v) / s + o)))) for v in x[i].tolist()]
        for n in range(6):
            acc = sum(a * c for a, c in zip(xq, t["weight"][n].tolist())) + int(t["quant_bias"][n])
            expected = torch.tensor(acc * t["deq_scale"][n].double().item(), dtype=torch.float64).float()
            assert y[i, n].item() == expected.item()


def test_dynamic_linear_equals_integer_arithmetic_exactly():
    torch.manual_seed(1)
    w, x = torch.randn(4, 33), torch.randn(3, 33)
    t = w8a8_dynamic.quantize(w, None, LinearSpec())
    y = w8a8_dynamic.serve(t)(x)
    for i in range(3):
        a_s = (x[i].abs().max() / 127).item()
        xq = [int(torch.round(torch.tensor(v) / torch.tensor(a_s))) for v in x[i].tolist()]
        for n in range(4):
            acc = sum(a * c for a, c in zip(xq, t["weight"][n].tolist()))
            expected = torch.tensor(acc * a_s * t["weight_scale"][n, 0].double().item(), dtype=torch.float64)
            assert y[i, n].item() == expected.float().item()


@pytest.fixture(scope="module")
def inputs(tiny_model, calib_index):
    return build_model_inputs(tiny_model, load_samples(calib_index))


def quantize(tiny_model, calib_index, save, recipe=None):
    args = ["quant", "--model_path", str(tiny_model), "--save_path", str(save), "--device", "cpu",
            "--dataset", str(calib_index), "--quiet"]
    assert main(args + (["--config_path", str(recipe)] if recipe else [])) == 0
    return save


def float_only(recipe_path, tmp_path):
    """The recipe with its linear_quant processors selecting nothing: every tensor stays FLOAT."""
    recipe = yaml.safe_load(Path(recipe_path).read_text())
    for processor in recipe["spec"]["process"]:
        if processor["type"] == "linear_quant":
            processor["include"] = []
    path = tmp_path / f"float_{Path(recipe_path).stem}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_all_float_checkpoint_evaluates_as_the_float_model(tiny_model, calib_index, inputs, tmp_path):
    save = quantize(tiny_model, calib_index, tmp_path / "q", float_only(PLAIN_RECIPE, tmp_path))
    report = evaluate(str(tiny_model), str(save), inputs)
    assert report.kl_divergence == pytest.approx(0.0, abs=1e-12) and report.top1_agreement == 1.0
    assert all(row.rel_error == 0.0 for row in report.rows)


def test_w8a8_checkpoint_is_close_and_the_cli_writes_json(tiny_model, calib_index, tmp_path, capsys):
    save = quantize(tiny_model, calib_index, tmp_path / "q")
    out = tmp_path / "report.json"
    assert main(["eval", "--model_path", str(tiny_model), "--quant_path", str(save), "--dataset", str(calib_index),
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["name"] for row in report["rows"]] == ["vision (merger)"] + [f"layer {i}" for i in range(4)]
    assert all(0.99 < row["cosine"] < 1.0 and 0 < row["rel_error"] < 0.1 for row in report["rows"])
    assert 0 < report["kl_divergence"] < 0.01 and report["top1_agreement"] > 0.8
    assert "top-1 agreement" in capsys.readouterr().out


def test_eval_of_something_that_is_not_a_checkpoint(tiny_model, tmp_path, calib_index, capsys):
    assert main(["eval", "--model_path", str(tiny_model), "--quant_path", str(tmp_path),
                 "--dataset", str(calib_index)]) == 2
    assert "quant_model_description.json" in capsys.readouterr().err
