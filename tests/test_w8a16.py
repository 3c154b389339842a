"""W8A16 (weight-only int8) end to end, the proof that a scheme without activation quantization fits the seams: the
bundled recipe (a qconfig without ``act``, msModelSlim's weight-only form) writes int8 weights within half a step of
an independent transformers model's float weights, with the tensors vLLM Ascend's w8a16 method creates (the check
accepts it and rejects one mutant per rule the type meets), eval serving the card's dequantize-then-matmul written
here, and the places it cannot go (routed experts: no MoE method; compressed-tensors: vLLM Ascend has no layout for
it) refused before any work."""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from dist_quant import schemes
from dist_quant.check import check_checkpoint
from dist_quant.cli import main
from dist_quant.errors import RecipeError
from dist_quant.recipe import load_recipe
from dist_quant.runtime.assignments import check_recipe_for_model
from dist_quant.synthetic import make_calibration_set, make_tiny_model
from helpers import load_hf_model, mutate, read_checkpoint, source_weight

RECIPE = Path(__file__).parent.parent / "dist_quant" / "configs" / "qwen3_vl_moe_w8a16.yaml"
LAYER0 = "model.language_model.layers.0"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("w8a16")
    return make_tiny_model(root / "model"), make_calibration_set(root / "calib", num_images=2)


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    model, calib = tiny
    save = tmp_path_factory.mktemp("q") / "q"
    assert main(["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu", "--dataset",
                 str(calib), "--quiet", "--config_path", str(RECIPE)]) == 0
    return save


def weight_only(description: dict) -> set[str]:
    return {k[:-len(".weight")] for k, v in description.items() if k.endswith(".weight") and v == "W8A16"}


def test_a_qconfig_without_act_selects_w8a16():
    """msModelSlim's default act (float per tensor) where the qconfig has none."""
    recipe = load_recipe(RECIPE)
    assert recipe.quant_type(f"{LAYER0}.self_attn.q_proj") == "W8A16"
    assert recipe.quant_type("model.visual.blocks.0.attn.qkv") == "W8A16"
    assert recipe.quant_type(f"{LAYER0}.mlp.experts.0.up_proj") == "W8A8_DYNAMIC"
    assert recipe.quant_type(f"{LAYER0}.mlp.gate") == "FLOAT"
    assert schemes.get("W8A16").act == schemes.UNQUANTIZED_ACT


def test_types_follow_the_recipe_and_the_check_accepts_it(checkpoint):
    _, description, _ = read_checkpoint(checkpoint)
    chosen = weight_only(description)
    assert {f"{LAYER0}.self_attn.q_proj", f"{LAYER0}.self_attn.o_proj", "model.visual.blocks.0.attn.qkv",
            "model.visual.blocks.0.attn.proj", "model.visual.blocks.0.mlp.linear_fc1"} <= chosen
    assert not any(".experts." in m or m.endswith(("mlp.gate", "linear_fc2")) or "merger" in m for m in chosen)
    assert description[f"{LAYER0}.mlp.experts.0.down_proj.weight"] == "W8A8_DYNAMIC"
    assert description["model_quant_type"] == "W8A8_DYNAMIC"  # above W8A16 in msModelSlim's priority
    report = check_checkpoint(checkpoint)
    assert report.ok and not report.failed(), report.failed()


def test_tensors_are_the_loaders_and_within_half_a_step_of_the_float_weight(checkpoint, tiny):
    """w8a16.py: weight int8 [out, in], weight_scale and weight_offset [out, 1] (float32 in the file, cast by the
    loader), the bias FLOAT. Per element |q s - w| <= s / 2 with s = max |w| / 127 of its row, computed here from the
    transformers model's weight."""
    tensors, description, _ = read_checkpoint(checkpoint)
    model = load_hf_model(tiny[0])
    chosen = sorted(weight_only(description))
    assert len(chosen) >= 10
    for module in chosen:
        q, scale, offset = (tensors[f"{module}.{r}"] for r in ("weight", "weight_scale", "weight_offset"))
        w = source_weight(model, module).to(torch.float64)
        assert q.dtype == torch.int8 and q.shape == w.shape, module
        assert scale.dtype == offset.dtype == torch.float32 and scale.shape == offset.shape == (w.shape[0], 1)
        assert not offset.any(), module
        expected_scale = w.abs().amax(dim=1, keepdim=True) / 127
        assert torch.allclose(scale.to(torch.float64), expected_scale, rtol=1e-6), module
        assert bool(((q.to(torch.float64) * expected_scale - w).abs() <= expected_scale / 2 * (1 + 1e-5)).all())
        keys = {k for k in tensors if k.startswith(module + ".")}
        assert keys <= {f"{module}.{r}" for r in ("weight", "weight_scale", "weight_offset", "bias")}, keys
        if f"{module}.bias" in keys:
            assert description[f"{module}.bias"] == "FLOAT" and tensors[f"{module}.bias"].dtype == torch.float32
    assert "model.visual.blocks.0.attn.qkv.bias" in tensors  # the vision qkv has a bias: one linear with one


def test_eval_serves_the_cards_dequantize_then_matmul(checkpoint, tiny):
    """npu_weight_quant_batchmatmul: the weight (w + offset) * scale in the activations' dtype, a float matmul,
    the bias; the activations are not quantized, so the result is the float linear's up to the weight rounding."""
    from dist_quant.checkpoint.formats.ascendv1 import Checkpoint

    module = "model.visual.blocks.0.attn.qkv"
    served = Checkpoint(checkpoint, torch.float32).linear(module)
    tensors, _, _ = read_checkpoint(checkpoint)
    x = torch.randn(7, tensors[f"{module}.weight"].shape[1])
    weight = tensors[f"{module}.weight"].to(torch.float32) * tensors[f"{module}.weight_scale"]
    expected = x @ weight.T + tensors[f"{module}.bias"]
    assert torch.allclose(served(x), expected, rtol=1e-6, atol=1e-6)
    linear = load_hf_model(tiny[0]).get_submodule(module)
    reference = linear(x).detach()
    assert float((served(x) - reference).norm() / reference.norm()) < 0.02  # int8 weight rounding only


@pytest.mark.parametrize("mutation, rule", [("expert", "R8"), ("scale_shape", "R23"), ("weight_dtype", "R22")])
def test_check_rejects_a_mutant_per_rule(checkpoint, tmp_path, mutation, rule):
    """Experts described as W8A16 (vLLM Ascend registers no MoE method for it); a weight_scale of the wrong shape;
    a W8A16 weight stored in float."""
    key = f"{LAYER0}.self_attn.q_proj"
    if mutation == "expert":
        folder = mutate(checkpoint, tmp_path, description=lambda d: d.update(
            {k: "W8A16" for k, v in d.items() if ".experts." in k and v == "W8A8_DYNAMIC"}))
    elif mutation == "scale_shape":
        folder = mutate(checkpoint, tmp_path, tensors=lambda t: t.update(
            {f"{key}.weight_scale": t[f"{key}.weight_scale"].reshape(-1)}))
    else:
        folder = mutate(checkpoint, tmp_path, tensors=lambda t: t.update(
            {f"{key}.weight": t[f"{key}.weight"].to(torch.float32)}))
    assert rule in check_checkpoint(folder).failed()


def test_w8a16_experts_are_refused_before_any_work(tiny, tmp_path):
    """msModelSlim's own default-w8a16.yaml selects every linear, experts included: vLLM Ascend has no W8A16 MoE
    method, so the recipe is refused naming the experts."""
    from dist_quant.models.family import load_checked

    doc = yaml.safe_load(RECIPE.read_text())
    doc["spec"]["process"] = [{"type": "linear_quant", "qconfig": doc["spec"]["process"][0]["qconfig"],
                               "include": ["*"], "exclude": ["*mlp.gate", "*merger*", "*deepstack_merger_list*"]}]
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(doc))
    _, _, config = load_checked(tiny[0])
    with pytest.raises(RecipeError, match=r"experts.*W8A16|W8A16.*experts"):
        check_recipe_for_model(load_recipe(path), config)


def test_compressed_tensors_output_is_refused_before_any_work(tiny):
    """compressed-tensors stores int8 weight-only linears as pack-quantized, which upstream vLLM serves on GPUs and
    vLLM Ascend's compressed-tensors path does not (README, "Serving"): refused up front, pointing to ascendv1."""
    from dist_quant.models.family import load_checked

    _, _, config = load_checked(tiny[0])
    recipe = dataclasses.replace(load_recipe(RECIPE), saver="compressed_tensors")
    with pytest.raises(RecipeError, match=r"\(W8A16\): write it in the ascendv1 format"):
        check_recipe_for_model(recipe, config)


def test_experts_of_any_layer_are_checked_and_share_one_type_per_layer(tiny, tmp_path):
    """vLLM Ascend reads a layer's MoE method from expert 0; every expert of every layer must get a type with a MoE
    method, and one type per layer: W8A16 on a later layer's experts, or on one expert only, is refused up front."""
    from dist_quant.models.family import load_checked

    _, _, config = load_checked(tiny[0])
    layer = max(i for i in range(config.text_config.num_hidden_layers) if i not in (config.text_config.mlp_only_layers
                                                                                    or []))
    for glob, message in ((f"*layers.{layer}.mlp.experts*", "vLLM Ascend has no W8A16 MoE method"),
                          (f"*layers.{layer}.mlp.experts.3.*", f"the routed experts of layer {layer} get different "
                                                               r"quant types \['W8A16', 'W8A8_DYNAMIC'\]")):
        doc = yaml.safe_load(RECIPE.read_text())
        doc["spec"]["process"][0]["include"] = ["*self_attn*", glob]
        doc["spec"]["process"][0]["exclude"].remove("*experts*")
        path = tmp_path / "later.yaml"
        path.write_text(yaml.safe_dump(doc))
        with pytest.raises(RecipeError, match=message):
            check_recipe_for_model(load_recipe(path), config)
