"""Qwen3-MoE, the text-only family, end to end: a tiny model built by transformers' own Qwen3MoeForCausalLM (per-
expert keys, no vision tower, no image processor) quantizes from a text calibration set on one card and on 2 Ray
workers to the same checkpoint, which `dist-quant check` accepts, and whose experts' int8 codes are the float weights
rounded to the nearest step of a scale computed here from the source weights (within 0.5 LSB).

The model is conftest.py's tiny_text_model (3 layers, top-3 of 8 experts, which groups of 2 add in an order that shows
in the bits; layer 1 a dense MLP). Its resume after a kill is here with the plain recipe (scripts/test5.sh runs this
file on transformers 5.x too) and in tests/test_resume.py with its bundled recipe in several parts."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from dist_quant.calib.dataset import load_samples
from dist_quant.calib.inputs import build_model_inputs
from dist_quant.cli import main
from dist_quant.errors import CheckpointError
from dist_quant.evaluate import evaluate
from dist_quant.recipe import load_recipe
from dist_quant.runtime.local import quantize_single_card
from dist_quant.runtime.ray_driver import quantize_distributed
from dist_quant.synthetic import make_calibration_set
from helpers import assert_same_checkpoint, read_checkpoint

GROUP = 2
TEXTS = ("The quick brown fox jumps over the lazy dog near the river bank.",
         "def add(a, b):\n    return a + b  # adds two numbers",
         "量化把浮点权重映射到八位整数。", "Seven times eight is fifty-six, and nine squared is eighty-one.")

# A plain recipe: no rotation, no smoothing; static W8A8 attention, dynamic W8A8 experts, the router in float
PLAIN = """\
apiversion: multimodal_vlm_modelslim_v1
spec:
  process:
    - type: linear_quant
      qconfig:
        act: {scope: per_tensor, dtype: int8, symmetric: False, method: minmax}
        weight: {scope: per_channel, dtype: int8, symmetric: True, method: minmax}
      include: ["*"]
      exclude: ["*experts*", "*mlp.gate"]
    - type: linear_quant
      qconfig:
        act: {scope: per_token, dtype: int8, symmetric: True, method: minmax}
        weight: {scope: per_channel, dtype: int8, symmetric: True, method: minmax}
      include: ["*experts*"]
  save:
    - type: ascendv1_saver
      part_file_size: 4
"""


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("text_calib") / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS[:2])
                    + "".join(json.dumps({"inputs_pretokenized": t}, ensure_ascii=False) + "\n" for t in TEXTS[2:]),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "plain.yaml"
    path.write_text(PLAIN)
    return load_recipe(path)


@pytest.fixture(scope="module")
def single(tiny_text_model, calib, recipe, tmp_path_factory):
    save = tmp_path_factory.mktemp("single") / "quant"
    quantize_single_card(str(tiny_text_model), str(save), recipe, dataset=str(calib), progress=False,
                         expert_group_size=GROUP)
    return save


def test_two_ray_workers_write_the_single_card_checkpoint(local_ray, tiny_text_model, calib, recipe, single, tmp_path):
    quantize_distributed(str(tiny_text_model), str(tmp_path / "out"), recipe, workers=2, dataset=str(calib),
                         progress=False, expert_group_size=GROUP)
    assert_same_checkpoint(tmp_path / "out", read_checkpoint(single))


def test_check_accepts_it(single, capsys):
    assert main(["check", str(single)]) == 0, capsys.readouterr().out


def source_tensors(model) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(model.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def test_expert_codes_are_the_float_weights_rounded(tiny_text_model, single):
    source = source_tensors(tiny_text_model)
    quant, description, _ = read_checkpoint(single)
    experts = [key for key in source if ".mlp.experts." in key]
    assert len(experts) == 2 * 8 * 3  # two MoE layers (layer 1 is dense), per-expert keys
    for key in experts:
        weight = source[key].to(torch.float64)
        assert description[key] == "W8A8_DYNAMIC"
        codes = quant[key]
        assert codes.dtype == torch.int8 and codes.shape == weight.shape
        scale = weight.abs().amax(dim=1, keepdim=True) / 127  # per output channel, symmetric
        stored = quant[key[:-len("weight")] + "weight_scale"].to(torch.float64).reshape(-1, 1)
        torch.testing.assert_close(stored, scale.to(stored.dtype), rtol=1e-6, atol=0)
        assert ((codes.to(torch.float64) * scale - weight).abs() <= 0.5 * scale * (1 + 1e-6)).all(), key


def test_router_norms_and_embeddings_stay_the_source(tiny_text_model, single):
    source = source_tensors(tiny_text_model)
    quant, description, _ = read_checkpoint(single)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.0.mlp.gate.weight",
                "model.layers.0.input_layernorm.weight"):
        assert description[key] == "FLOAT"
        assert torch.equal(quant[key], source[key]), key
    assert description["model.layers.0.self_attn.q_proj.weight"] == "W8A8"
    assert description["model.layers.1.mlp.down_proj.weight"] == "W8A8"  # the dense layer's MLP


def cli_args(model, calib, recipe, save, *extra) -> list[str]:
    return ["quant", "--model_path", str(model), "--save_path", str(save), "--config_path", str(recipe.path),
            "--dataset", str(calib), "--expert_group_size", str(GROUP), "--device", "cpu", "--quiet", *extra]


@pytest.mark.parametrize("point", ["experts:5", "unit:4"])
def test_resume_after_a_kill_writes_the_same_checkpoint(tiny_text_model, calib, recipe, single, tmp_path, point):
    """SIGKILL mid-run (no vision file exists for this family: the resume point is a saved layer output alone)."""
    save, log = tmp_path / "quant", tmp_path / "killed.log"
    env = {k: v for k, v in os.environ.items() if k != "DIST_QUANT_KILL_AT"}
    child = subprocess.run([sys.executable, "-m", "dist_quant.cli", *cli_args(tiny_text_model, calib, recipe, save)],
                           env={**env, "DIST_QUANT_KILL_AT": point}, stdout=subprocess.DEVNULL,
                           stderr=open(log, "wb"), timeout=600)
    assert child.returncode == -9, f"not killed at {point}: {log.read_text()[-2000:]}"
    assert main(cli_args(tiny_text_model, calib, recipe, save, "--resume")) == 0
    assert_same_checkpoint(save, read_checkpoint(single))


def test_eval_compares_the_text_model_layer_by_layer(tiny_text_model, calib, single):
    samples = load_samples(calib, images=False)
    report = evaluate(str(tiny_text_model), str(single), build_model_inputs(tiny_text_model, samples, images=False))
    assert [row.name for row in report.rows] == ["layer 0", "layer 1", "layer 2"]  # no vision row
    assert report.samples == len(TEXTS) and report.tokens > len(TEXTS)
    assert 0 <= report.kl_divergence < 0.05 and report.top1_agreement > 0.9
    assert all(row.cosine > 0.99 for row in report.rows)


def test_eval_refuses_a_checkpoint_of_the_other_family(tiny_text_model, calib, single, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(single, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_vl_moe"}))
    inputs = build_model_inputs(tiny_text_model, load_samples(calib, images=False)[:1], images=False)
    with pytest.raises(CheckpointError, match="quantization of a 'qwen3_vl_moe' model, not of the 'qwen3_moe' model"):
        evaluate(str(tiny_text_model), str(other), inputs)


def test_dry_run_refuses_an_image_set_for_the_text_model(tiny_text_model, calib, recipe, tmp_path, capsys):
    """--dry_run reads the calibration set as the run would: a text model given images fails there, not later."""
    images = make_calibration_set(tmp_path / "images", num_images=1)
    assert main(cli_args(tiny_text_model, images, recipe, tmp_path / "q", "--dry_run")) == 2
    assert "reads text only" in capsys.readouterr().err
    assert main(cli_args(tiny_text_model, calib, recipe, tmp_path / "q", "--dry_run")) == 0
    assert f"{len(TEXTS)} calibration samples" in capsys.readouterr().out
    assert not (tmp_path / "q").exists()
