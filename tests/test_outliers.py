"""QuaRot + iterative smoothing: float equivalence of the transformed model, the exported rotation, static ranges
derived without a second forward, and the accuracy they buy on a model with activation outliers."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dist_quant.algorithms.hadamard import check_orthogonal
from dist_quant.calib.dataset import load_samples
from dist_quant.calib.inputs import build_model_inputs
from dist_quant.checkpoint.reader import CheckpointReader
from dist_quant.evaluate import evaluate
from dist_quant.models import qwen3_vl_moe as qvl
from dist_quant.recipe import DEFAULT_RECIPE
from dist_quant.synthetic import make_calibration_set, make_tiny_model
from helpers import PLAIN_RECIPE, float_only, quantize, text_turn_inputs


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory):
    """Layer 2 is a dense MLP, so the norm-linear and up-down smoothing of dense layers run too."""
    return make_tiny_model(tmp_path_factory.mktemp("outl") / "model", mlp_only_layers=(2,), seed=5)


@pytest.fixture(scope="module")
def transformed(dense_model, calib_index, tmp_path_factory):
    """QuaRot + smoothing with quantization switched off: every tensor FLOAT, but rotated and smoothed. quant refuses
    a recipe that quantizes nothing (a user's typo); this one does so on purpose, so that refusal is lifted here."""
    from dist_quant.runtime import assignments

    tmp = tmp_path_factory.mktemp("transformed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(assignments, "check_linear_quants_apply", lambda *args: None)
        return quantize(dense_model, calib_index, tmp / "q", float_only(DEFAULT_RECIPE, tmp))


def test_transformed_float_model_gives_the_same_logits(dense_model, transformed, calib_index):
    inputs = build_model_inputs(dense_model, load_samples(calib_index)[:2])
    inputs.append(text_turn_inputs(dense_model, "Only text, no image: does the rotation hold?"))
    for sample in (inputs[:2], inputs[2:]):  # image+text, then text-only
        report = evaluate(str(dense_model), str(transformed), sample)
        assert report.logits_rel_error < 1e-4
        assert all(row.rel_error < 1e-4 for row in report.rows)


def test_the_weights_really_were_transformed(dense_model, transformed):
    source = CheckpointReader(dense_model)
    out = CheckpointReader(transformed, weights_name="quant_model_weights.safetensors")
    layer = "model.language_model.layers"
    for key in (f"{layer}.0.self_attn.q_proj.weight", f"{layer}.1.mlp.gate.weight", "lm_head.weight",
                "model.language_model.embed_tokens.weight", "model.visual.merger.linear_fc2.weight",
                f"{layer}.2.mlp.down_proj.weight", f"{layer}.0.mlp.experts.3.down_proj.weight"):
        assert key in out
        if key in source:
            assert not torch.allclose(out.get(key), source.get(key), atol=1e-4), key
    assert torch.equal(out.get("model.language_model.norm.weight"), torch.ones(64))
    assert torch.equal(out.get(f"{layer}.0.post_attention_layernorm.weight"), torch.ones(64))
    assert not torch.equal(out.get(f"{layer}.0.input_layernorm.weight"), torch.ones(64))  # 1 / smoothing scales
    assert not torch.equal(out.get(f"{layer}.2.post_attention_layernorm.weight"), torch.ones(64))  # dense: smoothed
    assert torch.equal(out.get("model.visual.blocks.0.attn.qkv.weight"),
                       source.get("model.visual.blocks.0.attn.qkv.weight"))


def test_rotation_is_exported_and_described(transformed):
    description = json.loads((transformed / "quant_model_description.json").read_text())
    assert description["optional"] == {"quarot": {"rotation_map": {"global_rotation": "optional/quarot.safetensors"}}}
    rotation = load_file(transformed / "optional" / "quarot.safetensors")["global_rotation"]
    assert rotation.dtype == torch.float32 and rotation.shape == (64, 64)
    check_orthogonal(rotation, "exported rotation", atol=1e-6)


def test_static_ranges_equal_a_forward_of_the_transformed_model(dense_model, transformed, calib_index, tmp_path):
    """The quantizer derives post-smoothing ranges from pre-smoothing ones; an independent forward of the published
    transformed model (its FLOAT tensors, through the evaluator's served model) must see exactly those ranges."""
    quantized = quantize(dense_model, calib_index, tmp_path / "full")
    q = CheckpointReader(quantized, weights_name="quant_model_weights.safetensors")
    seen = {}
    import dist_quant.evaluate as ev

    inputs = build_model_inputs(dense_model, load_samples(calib_index))
    checkpoint = ev.ascendv1.Checkpoint(transformed, torch.float32)
    linear = checkpoint.linear

    def observed_linear(name):
        module = linear(name)
        module.register_forward_pre_hook(
            lambda m, a: seen.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1])))
        return module

    checkpoint.linear = observed_linear
    config = qvl.load_config(CheckpointReader(dense_model).config)
    runner = ev.ModelRunner(ev.ServedModel(checkpoint, config, torch.float32), qvl.build_text_rotary(config))
    for _ in ev.interpret(ev.plan_units(config), None, inputs, runner):
        pass
    for layer in range(4):
        dense_mlp = ("mlp.gate_proj", "mlp.down_proj") if layer == 2 else ()
        for name in ("self_attn.q_proj", "self_attn.o_proj") + dense_mlp:
            key = f"model.language_model.layers.{layer}.{name}"
            x = torch.cat(seen[key])
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            assert q.get(f"{key}.input_scale").item() == pytest.approx((hi - lo) / 255, rel=1e-4), key


def test_quarot_and_smoothing_cut_the_logit_kl_on_an_outlier_model(tmp_path):
    model = make_tiny_model(tmp_path / "outlier_model", outliers=20, seed=0)
    calib = make_calibration_set(tmp_path / "calib", num_images=6)
    inputs = build_model_inputs(model, load_samples(calib))
    kl = {}
    for name, recipe in (("plain", PLAIN_RECIPE), ("full", DEFAULT_RECIPE)):
        save = quantize(model, calib, tmp_path / name, recipe)
        kl[name] = evaluate(str(model), str(save), inputs).kl_divergence
    assert kl["plain"] > 3 * kl["full"], kl
