"""W8A8_MXFP8 end to end: msModelSlim's Qwen3-VL-MoE MXFP8 recipe accepted unchanged, its checkpoint's tensors in
the dtypes and shapes vLLM Ascend's w8a8_mxfp8 methods create (checked by the loader rules, which reject one mutant
per new rule), every block of a plain recipe's checkpoint decoding (torch's float8 cast and 2^(byte - 127), written
here) to within E4M3's rounding of the float weight of an independent transformers model, and eval's served linear
against MX arithmetic written here. Single card against 2 Ray workers: tests/test_same_bits.py."""

from pathlib import Path

import pytest
import torch
import yaml

from dist_quant.check import check_checkpoint
from dist_quant.cli import main
from dist_quant.errors import RecipeError
from dist_quant.recipe import load_recipe
from dist_quant.runtime.assignments import check_recipe_for_model
from dist_quant.synthetic import make_calibration_set, make_tiny_model
from helpers import load_hf_model, mutate, read_checkpoint, source_weight

MSMODELSLIM_RECIPE = Path(__file__).parent / "data" / "msmodelslim" / "qwen3_vl_moe_w8a8_mxfp8.yaml"
LAYER0 = "model.language_model.layers.0"
EXPERT = f"{LAYER0}.mlp.experts.0"


def plain_recipe(folder: Path) -> Path:
    """msModelSlim's MXFP8 selection without QuaRot and smoothing: the weights are the float model's."""
    doc = yaml.safe_load(MSMODELSLIM_RECIPE.read_text())
    doc["spec"]["process"] = [p for p in doc["spec"]["process"] if p["type"] == "linear_quant"]
    path = folder / "plain_mxfp8.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def mx_model(tmp_path_factory):
    """A tiny Qwen3-VL-MoE whose expert widths MXFP8 experts can take (an even number of 32-blocks: hidden 64,
    intermediate 128) and a calibration set."""
    root = tmp_path_factory.mktemp("mxfp8")
    model = make_tiny_model(root / "model", moe_intermediate_size=128, mlp_only_layers=(2,))
    return model, make_calibration_set(root / "calib", num_images=2)


def quant(model, calib, save, recipe, *extra) -> Path:
    assert main(["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu", "--dataset",
                 str(calib), "--quiet", "--config_path", str(recipe), *extra]) == 0
    return save


@pytest.fixture(scope="module")
def plain(mx_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    return quant(*mx_model, root / "q", plain_recipe(root))


@pytest.fixture(scope="module")
def msmodelslim(mx_model, tmp_path_factory):
    return quant(*mx_model, tmp_path_factory.mktemp("ms") / "q", MSMODELSLIM_RECIPE)


def mx_types(description: dict) -> set[str]:
    return {k[:-len(".weight")] for k, v in description.items() if k.endswith(".weight") and v == "W8A8_MXFP8"}


def decode(elements: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An MXFP8 block's values, written here: torch's float8_e4m3fn -> float64 cast times 2^(byte - 127) for each
    block of 32 inputs (float64: exact for every E4M3 value times any E8M0 scale)."""
    factors = torch.tensor([[2.0 ** (int(b) - 127) for b in row] for row in scale.tolist()], dtype=torch.float64)
    return elements.to(torch.float64) * factors.repeat_interleave(32, dim=1)[:, :elements.shape[1]]


def test_msmodelslim_recipe_is_accepted_unchanged_and_its_checkpoint_loads(msmodelslim):
    """Its types follow the recipe's globs (the router, vision attn.proj and linear_fc2, the mergers stay FLOAT;
    experts, attention, the vision qkv and linear_fc1 are MXFP8), QuaRot's rotation is named in ``optional``, and
    every loader rule passes."""
    _, description, _ = read_checkpoint(msmodelslim)
    assert description["model_quant_type"] == "W8A8_MXFP8" and description["group_size"] == 32
    assert description["optional"]["quarot"]["rotation_map"]["global_rotation"] == "optional/quarot.safetensors"
    quantized = mx_types(description)
    assert {f"{EXPERT}.down_proj", f"{LAYER0}.self_attn.q_proj", "model.visual.blocks.0.attn.qkv",
            "model.visual.blocks.0.mlp.linear_fc1"} <= quantized
    assert not quantized & {f"{LAYER0}.mlp.gate", "model.visual.blocks.0.attn.proj",
                            "model.visual.blocks.0.mlp.linear_fc2", "model.visual.merger.linear_fc1", "lm_head"}
    report = check_checkpoint(msmodelslim)
    assert report.ok and not report.failed(), report.failed()


def test_tensors_have_the_dtypes_and_shapes_the_loader_creates(plain):
    """w8a8_mxfp8.py: weight float8_e4m3fn [out, in]; weight_scale uint8 [out, cdiv(in, 32)] for a linear,
    [out, in // 32] for an expert (equal here: every width is a whole number of blocks); bias FLOAT."""
    tensors, description, _ = read_checkpoint(plain)
    for module in mx_types(description):
        weight, scale = tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"]
        assert weight.dtype == torch.float8_e4m3fn and scale.dtype == torch.uint8, module
        assert scale.shape == (weight.shape[0], -(-weight.shape[1] // 32)), module
        assert set(k for k in tensors if k.startswith(module + ".")) <= {f"{module}.{r}" for r in
                                                                       ("weight", "weight_scale", "bias")}
        if f"{module}.bias" in tensors:
            assert description[f"{module}.bias"] == "FLOAT" and tensors[f"{module}.bias"].dtype == torch.float32


def test_every_block_decodes_to_within_e4m3_rounding_of_the_float_weight(plain, mx_model):
    """Per element: |decoded - w| at most half E4M3's spacing at w's magnitude in its block (2^(e - 3) with the
    element's exponent e, at least -6, times the block's scale), or w beyond 448 times the scale saturated to
    448 times it; and the block's scale is the one that puts its largest magnitude in [256, 512)."""
    tensors, description, _ = read_checkpoint(plain)
    model = load_hf_model(mx_model[0])
    checked = 0
    for module in sorted(mx_types(description)):
        w = source_weight(model, module).to(torch.float64)
        scale = tensors[f"{module}.weight_scale"]
        got = decode(tensors[f"{module}.weight"], scale)
        block_scale = decode(torch.ones_like(w, dtype=torch.float8_e4m3fn), scale)
        scaled = w / block_scale
        exponent = torch.floor(torch.log2(scaled.abs().clamp(min=2.0 ** -30))).clamp(min=-6)
        half_step = torch.exp2(exponent - 4) * block_scale
        saturated = scaled.abs() > 448
        assert bool(((got - w).abs() <= half_step)[~saturated].all()), module
        assert torch.equal(got[saturated], (448 * block_scale * scaled.sign())[saturated]), module
        amax = scaled.abs().reshape(w.shape[0], -1, 32).amax(dim=-1)
        assert bool(((amax >= 256) & (amax < 512) | (amax == 0)).all()), module
        checked += 1
    assert checked >= 20


def test_eval_serves_mx_arithmetic(plain):
    """What dist-quant eval runs for an MXFP8 linear: the activations MX-quantized per 32-block (floor exponent of
    the block's largest magnitude minus 8, elements rounded to E4M3, ties away from zero), times the decoded weight,
    here in plain float64 arithmetic."""
    from dist_quant.checkpoint.formats.ascendv1 import Checkpoint

    module = f"{LAYER0}.self_attn.q_proj"
    checkpoint = Checkpoint(plain, torch.float32)
    x = torch.randn(5, 64) * 3
    served = checkpoint.linear(module)(x)
    tensors, _, _ = read_checkpoint(plain)
    w = decode(tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"])
    xd = x.to(torch.float64).reshape(5, 2, 32)
    exp = torch.floor(torch.log2(xd.abs().amax(dim=-1, keepdim=True))) - 8
    scaled = xd / torch.exp2(exp)
    private = torch.floor(torch.log2(scaled.abs().clamp(min=2.0 ** -30))).clamp(min=-6)
    step = torch.exp2(private - 3)
    rounded = (torch.sign(scaled) * torch.floor(scaled.abs() / step + 0.5) * step).clamp(-448, 448)
    expected = ((rounded * torch.exp2(exp)).reshape(5, 64) @ w.T).to(torch.float32)
    assert torch.allclose(served, expected, rtol=1e-6, atol=1e-6)
    reference = torch.nn.functional.linear(x, source_like(tensors, module))
    assert float((served - reference).norm() / reference.norm()) < 0.1  # MX rounding only


def source_like(tensors, module) -> torch.Tensor:
    return decode(tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"]).to(torch.float32)


@pytest.mark.parametrize("mutation, rule", [
    ("group_size", "R25"),
    ("scale_shape", "R23"),
    ("weight_dtype", "R22"),
])
def test_check_rejects_a_mutant_per_new_rule(msmodelslim, tmp_path, mutation, rule):
    """The description's group_size other than 32 (the methods size the scale by it); an expert scale of the
    wrong width; an MXFP8 weight stored as int8."""
    key = f"{EXPERT}.down_proj"
    if mutation == "group_size":
        folder = mutate(msmodelslim, tmp_path, description=lambda d: d.update(group_size=0))
    elif mutation == "scale_shape":
        folder = mutate(msmodelslim, tmp_path, tensors=lambda t: t.update(
            {f"{key}.weight_scale": torch.cat([t[f"{key}.weight_scale"]] * 2, dim=1)}))
    else:
        folder = mutate(msmodelslim, tmp_path, tensors=lambda t: t.update(
            {f"{key}.weight": t[f"{key}.weight"].to(torch.float32).round().to(torch.int8)}))
    assert rule in check_checkpoint(folder).failed()


def test_experts_of_an_odd_number_of_blocks_are_refused_before_any_work(tmp_path):
    """The tiny model's default expert width (48 inputs to down_proj: one and a half blocks) cannot be loaded by
    the MoE method, which pairs whole blocks: the recipe is refused naming the projection."""
    from dist_quant.models.family import load_checked

    model = make_tiny_model(tmp_path / "model")
    _, _, config = load_checked(model)
    with pytest.raises(RecipeError, match=r"down_proj \[64, 48\]: W8A8_MXFP8 experts need an input size that is a "
                                          r"multiple of 64"):
        check_recipe_for_model(load_recipe(MSMODELSLIM_RECIPE), config)


def test_mxfp8_and_w4a8_in_one_checkpoint_are_refused_before_any_work(mx_model, tmp_path):
    """The description has one group_size: MXFP8 needs 32, W4A8_DYNAMIC 0 (vLLM Ascend's main refuses per-group
    W4A8), so a recipe mixing them is refused naming both."""
    from dist_quant.models.family import load_checked

    doc = yaml.safe_load(MSMODELSLIM_RECIPE.read_text())
    quant = doc["spec"]["process"][2]
    quant["exclude"] = [*quant["exclude"], "*experts*"]
    int4 = {"act": {"scope": "per_token", "dtype": "int8", "symmetric": True, "method": "minmax"},
            "weight": {"scope": "per_channel", "dtype": "int4", "symmetric": True, "method": "minmax"}}
    doc["spec"]["process"].append({"type": "linear_quant", "qconfig": int4, "include": ["*experts*"]})
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(doc))
    _, _, config = load_checked(mx_model[0])
    with pytest.raises(RecipeError, match=r"one group_size, and these types need different ones: W4A8_DYNAMIC 0, "
                                          r"W8A8_MXFP8 32"):
        check_recipe_for_model(load_recipe(path), config)
