"""Every registered scheme keeps its module's promises, checked against plain float math: what it makes of a linear
dequantizes to the linear (``scale * codes``, int rounding aside), the ascendv1 format stores exactly its type's
roles (plus a bias when the linear has one) and the engine's math on them computes the linear, the recipe selects it
by its qconfig, and the output format writes each role under the linear's name."""

import pytest
import torch

from dist_quant import schemes
from dist_quant.checkpoint.formats import ascendv1
from dist_quant.checkpoint.formats.ascendv1_encoding import ENCODINGS
from dist_quant.errors import RecipeError
from dist_quant.schemes import LinearSpec

CASES = [(scheme, bias) for scheme in schemes.SCHEMES.values()
         for bias in ((False, True) if scheme.serves_linears else (False,))]  # routed experts have no bias


@pytest.mark.parametrize("scheme, with_bias", CASES, ids=lambda c: getattr(c, "name", str(c)))
def test_quantize_emits_its_roles_and_serves_the_linear(scheme, with_bias):
    torch.manual_seed(0)
    weight, x = torch.randn(24, 64), torch.randn(5, 64)
    bias = torch.randn(24) if with_bias else None
    input_range = (float(x.min()), float(x.max())) if scheme.needs_input_range else None
    spec = LinearSpec(input_range=input_range)
    quantized = scheme.quantize(weight, bias, spec)
    tolerance = {None: 1e-6, "int8": 0.03, "mxfp8": 0.05, "int4": 0.15}[scheme.weight and scheme.weight.dtype]
    scale = torch.ones(1, 1) if quantized.scale is None else quantized.scale.reshape(len(weight), -1)
    if quantized.group_size:  # a scale per group of inputs
        scale = scale.repeat_interleave(quantized.group_size, dim=1)[:, :weight.shape[1]]
    dequantized = quantized.codes.float() * scale
    assert float((dequantized - weight).norm() / weight.norm()) < tolerance
    encoding = ENCODINGS[scheme.name]
    roles = encoding.encode(quantized, spec)
    assert list(roles) == list(encoding.roles) + (["bias"] if with_bias else [])
    expected = torch.nn.functional.linear(x, weight, bias)
    served = encoding.serve(roles)(x)
    error = float((served - expected).norm() / expected.norm())
    assert error < tolerance, error
    stored_bytes = roles["weight"].numel() * roles["weight"].element_size() / weight.numel()  # packed int4: 0.5
    assert scheme.bytes_per_param(4) == (4 if scheme.weight_bits is None else stored_bytes)


@pytest.mark.parametrize("scheme, with_bias", CASES, ids=lambda c: getattr(c, "name", str(c)))
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16])
def test_quantize_runs_on_fake_tensors_with_the_real_dtypes_and_shapes(scheme, with_bias, model_dtype):
    """The writer lays out the checkpoint before any unit runs by running the units' emission on fake tensors
    (runtime/worker.py Worker.entries): every scheme must run there and give the dtypes and shapes it gives for real,
    through the format too (fp16's int64 deq_scale)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def entries(make):
        weight, bias = make((24, 64)), make((24,)) if with_bias else None
        spec = LinearSpec(input_range=(-1.0, 1.0), model_dtype=model_dtype)
        return [(key, t.dtype, tuple(t.shape)) for key, t, _ in
                ascendv1.linear_entries("m.proj", scheme.name, scheme.quantize(weight, bias, spec), spec)]

    real = entries(lambda shape: torch.randn(shape))
    with FakeTensorMode():
        fake = entries(lambda shape: torch.empty(shape))
    assert fake == real


@pytest.mark.parametrize("scheme", schemes.SELECTABLE, ids=lambda s: s.name)
def test_the_recipe_qconfig_selects_the_scheme(scheme):
    assert schemes.for_qconfig(scheme.act, scheme.weight) is scheme


def test_priority_orders_the_model_quant_type():
    assert set(ENCODINGS) == set(schemes.SCHEMES)  # the format stores every scheme
    # msModelSlim's AscendV1Saver.QUANT_TYPE_PRIORITY (a later entry wins; save/ascendv1.py, 26.1), W4A8_DYNAMIC
    # hidden below all of them
    msmodelslim = ["FLOAT", "W16A16S", "W8A16", "W8A8_DYNAMIC", "W8A8_MIX", "W8A8", "WFP8AFP8_DYNAMIC", "W8A8_MXFP8",
                   "W4A8_MXFP", "W4A4_DYNAMIC", "W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE", "W4A4_MXFP4_SVD"]
    ranked = sorted(ENCODINGS, key=lambda t: ENCODINGS[t].priority)
    assert ranked == ["W4A8_DYNAMIC"] + [t for t in msmodelslim if t in ENCODINGS]
    assert ranked == ["W4A8_DYNAMIC", "FLOAT", "W8A16", "W8A8_DYNAMIC", "W8A8", "W8A8_MXFP8"]
    assert ascendv1.model_quant_type(["FLOAT", "W8A8_DYNAMIC", "W8A8"]) == "W8A8"
    # msModelSlim's AscendV1Saver keeps W4A8_DYNAMIC out of model_quant_type ("W4A8_DYNAMIC is hidden" in its
    # QUANT_TYPE_PRIORITY; docs/w4a8-loader-facts.md, section 2): W8A8_DYNAMIC attention + W4A8 experts name the first
    assert ascendv1.model_quant_type(["FLOAT", "W4A8_DYNAMIC", "W8A8_DYNAMIC"]) == "W8A8_DYNAMIC"
    assert ascendv1.model_quant_type(["FLOAT", "W4A8_DYNAMIC", "W8A8"]) == "W8A8"
    with pytest.raises(RecipeError):
        schemes.get("W2A2")


@pytest.mark.parametrize("scheme", list(schemes.SCHEMES.values()), ids=lambda s: s.name)
def test_the_format_writes_every_role_under_the_linear(scheme):
    spec = LinearSpec(input_range=(-1.0, 1.0), model_dtype=torch.bfloat16)
    quantized = scheme.quantize(torch.randn(8, 16), torch.randn(8) if scheme.serves_linears else None, spec)
    entries = ascendv1.linear_entries("m.proj", scheme.name, quantized, spec)
    roles = [*ENCODINGS[scheme.name].roles, *(["bias"] if quantized.bias is not None else [])]
    assert [key for key, _, _ in entries] == [f"m.proj.{role}" for role in roles]
    assert {key: t for key, _, t in entries}.get("m.proj.bias") == ("FLOAT" if scheme.serves_linears else None)
    assert all(t == scheme.name for key, _, t in entries if not key.endswith(".bias"))


def test_a_qconfig_ext_option_reaches_only_a_scheme_that_takes_it(tmp_path):
    """msModelSlim qconfigs may carry ``ext`` options (``ext: {group_size: 64}``); a scheme that does not take an
    option refuses it when the recipe is parsed, naming the field."""
    import yaml

    from dist_quant.recipe import DEFAULT_RECIPE, load_recipe

    doc = yaml.safe_load(DEFAULT_RECIPE.read_text())
    doc["spec"]["process"][3]["qconfig"]["weight"]["ext"] = {"group_size": 64}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(RecipeError, match=r"spec\.process\[3\]\.qconfig\.weight\.ext: W8A8_DYNAMIC has no option"):
        load_recipe(path)
    doc["spec"]["process"][3]["qconfig"]["weight"]["ext"] = ["group_size"]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(RecipeError, match=r"\.ext: must be a mapping"):
        load_recipe(path)


def test_the_family_says_which_linears_vllm_splits_by_input():
    from dist_quant.models.qwen3_vl_moe import expert_key, layer_prefix, splits_input

    assert splits_input(f"{layer_prefix(0)}.self_attn.o_proj") and splits_input(expert_key(0, 3, "down_proj"))
    assert splits_input("model.visual.blocks.0.attn.proj") and splits_input("model.visual.merger.linear_fc2")
    assert not any(splits_input(n) for n in (f"{layer_prefix(0)}.self_attn.q_proj", expert_key(0, 3, "gate_proj"),
                                             "model.visual.blocks.0.attn.qkv"))
