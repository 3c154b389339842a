"""W4A8_DYNAMIC experts end to end on the tiny model: every expert tensor with the key, dtype and shape vLLM Ascend's
``AscendW4A8DynamicFusedMoEMethod`` (modelslim path, per channel) loads, derived from the parameters it creates
(docs/w4a8-loader-facts.md 1.3: ``w13_weight [E, I, H]`` int8 filled by gate and up ``[I/2, H]`` each, ``w2_weight
[E, H/2, I]``, ``w13_weight_scale/offset/scale_bias [E, 2I, 1]``, ``w2_weight_scale/offset [E, H, 1]``,
``w2_scale_bias [E, H, 16]``), and their values checked with an unpacking of our own in this file; attention stays
static W8A8; an experts-only scheme on attention is refused."""

import pytest
import torch
import yaml

from dist_quant.checkpoint.formats import ascendv1
from dist_quant.errors import RecipeError
from dist_quant.recipe import DEFAULT_RECIPE, load_recipe
from dist_quant.runtime.local import quantize_single_card
from helpers import LAYERS, ascend_roles, ascend_served, moe_layers, read_checkpoint, text_config

EXPERTS = 8


def w4a8_recipe(tmp_path, method: str = "ssz", also: str = "", weight_ext=None, act_ext=None, base=DEFAULT_RECIPE):
    """The bundled recipe (or the W8A8 recipe ``base``) with the experts' weights int4 per channel (and ``also``
    added to that linear_quant)."""
    doc = yaml.safe_load(base.read_text())
    experts = next(step for step in doc["spec"]["process"] if step.get("include") == ["*experts*"])
    weight = {"scope": "per_channel", "dtype": "int4", "symmetric": True, "method": method}
    act = dict(experts["qconfig"]["act"])
    if weight_ext is not None:
        weight["ext"] = weight_ext
    if act_ext is not None:
        act["ext"] = act_ext
    experts["qconfig"] = {"act": act, "weight": weight}
    if also:
        experts["include"].append(also)
        doc["spec"]["process"][2]["exclude"].append(also)
    path = tmp_path / f"w4a8_{method}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_recipe(path)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Nibbles to codes: the low nibble is the even output channel (two's complement in 4 bits)."""
    byte = packed.to(torch.int32) & 0xFF
    low, high = byte & 0xF, byte >> 4
    low, high = low - 16 * (low >= 8).int(), high - 16 * (high >= 8).int()
    return torch.stack([low, high], dim=1).reshape(2 * packed.shape[0], packed.shape[1])


@pytest.fixture(scope="module")
def checkpoint(family_model, tmp_path_factory):
    """The family's tiny model with its W8A8 recipe's experts made W4A8 (ssz), quantized on one card."""
    tmp = tmp_path_factory.mktemp("w4a8")
    save = tmp / "quant"
    quantize_single_card(str(family_model.model), str(save), w4a8_recipe(tmp, base=family_model.recipe),
                         dataset=str(family_model.dataset), progress=False)
    return read_checkpoint(save)


def test_expert_tensors_are_what_the_loader_creates(checkpoint, family_model):
    tc = text_config(family_model.model)
    layers = LAYERS[family_model.model_type]
    hidden, inter = tc["hidden_size"], tc["moe_intermediate_size"]
    tensors, description, _ = checkpoint
    expected = {  # per expert, from the loader's parameters narrowed to one expert (tp = 1)
        "gate_proj": {"weight": (torch.int8, (inter // 2, hidden)), "weight_scale": (torch.float32, (inter, 1)),
                      "weight_offset": (torch.float32, (inter, 1)), "scale_bias": (torch.float32, (inter, 1))},
        "down_proj": {"weight": (torch.int8, (hidden // 2, inter)), "weight_scale": (torch.float32, (hidden, 1)),
                      "weight_offset": (torch.float32, (hidden, 1)), "scale_bias": (torch.float32, (hidden, 16))},
    }
    expected["up_proj"] = expected["gate_proj"]
    for layer in moe_layers(family_model.model):
        for e in range(EXPERTS):
            for proj, roles in expected.items():
                prefix = f"{layers}.{layer}.mlp.experts.{e}.{proj}"
                keys = {k[len(prefix) + 1:] for k in tensors if k.startswith(prefix + ".")}
                assert keys == set(roles), (prefix, keys)
                for role, (dtype, shape) in roles.items():
                    t = tensors[f"{prefix}.{role}"]
                    assert (t.dtype, tuple(t.shape)) == (dtype, shape), (prefix, role)
                    assert description[f"{prefix}.{role}"] == "W4A8_DYNAMIC"
    assert description["version"] == "1.0.0" and description["group_size"] == 0
    assert description["model_quant_type"] == "W8A8"  # static W8A8 attention; W4A8_DYNAMIC has no say
    assert description[f"{layers}.0.self_attn.q_proj.weight"] == "W8A8"


def test_expert_values_follow_the_kernels_rules(checkpoint, family_model):
    tensors, _, _ = checkpoint
    prefix = f"{LAYERS[family_model.model_type]}.0.mlp.experts.3"
    for proj, chunks in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 16)):
        codes = unpack(tensors[f"{prefix}.{proj}.weight"])
        scale = tensors[f"{prefix}.{proj}.weight_scale"]
        assert int(codes.min()) >= -8 and int(codes.max()) <= 7 and int(codes.abs().max()) >= 6
        assert bool((scale > 0).all()) and not tensors[f"{prefix}.{proj}.weight_offset"].any()
        sums = codes.reshape(codes.shape[0], chunks, -1).sum(dim=2).double()
        assert torch.allclose(tensors[f"{prefix}.{proj}.scale_bias"].double(), 8 * scale.double() * sums,
                              rtol=1e-6, atol=1e-9)


def test_an_experts_only_scheme_on_attention_is_refused(tiny_model, calib_index, tmp_path):
    recipe = w4a8_recipe(tmp_path, also="*self_attn.o_proj")
    with pytest.raises(RecipeError, match="o_proj gets W4A8_DYNAMIC, which vLLM Ascend serves for routed experts"):
        quantize_single_card(str(tiny_model), str(tmp_path / "out"), recipe, dataset=str(calib_index),
                             progress=False)


def test_minmax_and_ssz_select_the_scheme_and_differ(tmp_path):
    from dist_quant import schemes

    for method in ("ssz", "minmax"):
        recipe = w4a8_recipe(tmp_path, method)
        assert recipe.quant_type("model.language_model.layers.0.mlp.experts.0.down_proj") == "W4A8_DYNAMIC"
    weight = torch.randn(16, 64)
    weight[0, 0] = 9.0
    spec = lambda m: schemes.LinearSpec(weight=schemes.QSpec("per_channel", "int4", True, m))  # noqa: E731
    scheme = schemes.get("W4A8_DYNAMIC")
    assert not torch.equal(ascend_roles(scheme, weight, None, spec("ssz"))["weight_scale"],
                           ascend_roles(scheme, weight, None, spec("minmax"))["weight_scale"])


def test_served_expert_is_the_integer_reference():
    """What dist-quant eval runs for a W4A8_DYNAMIC linear, against int8 per-token activations times the codes this
    file unpacks, summed exactly (the kernel's result before its fp16 rounding, docs/w4a8-loader-facts.md 4.2)."""
    from dist_quant import schemes

    torch.manual_seed(3)
    weight, x = torch.randn(32, 48), torch.randn(7, 48) * 3
    scheme = schemes.get("W4A8_DYNAMIC")
    roles = ascend_roles(scheme, weight, None, schemes.LinearSpec(input_split=True))
    codes, ws = unpack(roles["weight"]).double(), roles["weight_scale"].double().reshape(1, -1)
    a = (x.abs().amax(dim=1, keepdim=True) / 127).double()  # the per-token scale in float32, as the engine has it
    x_q = torch.clamp(torch.round(x / a.float()), -128, 127).double()
    expected = ((x_q @ codes.T) * a * ws).float()
    assert torch.equal(ascend_served(scheme.name, roles)(x), expected)
    assert ascendv1.stored_shape(scheme.name, (32, 48)) == (16, 48) and roles["weight"].shape == (16, 48)


def test_gptq_damping_under_another_method_is_ignored_with_a_warning(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="dist_quant"):
        w4a8_recipe(tmp_path, method="ssz", weight_ext={"damp": 0.1})
    assert "damp is GPTQ's option and is ignored by method ssz" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dist_quant"):
        w4a8_recipe(tmp_path, method="gptq", weight_ext={"damp": 0.1, "group_size": 0})
    assert "ignored" not in caplog.text


def test_msmodelslim_group_size_under_per_channel_is_ignored_with_a_warning(tmp_path, caplog):
    """msModelSlim's qwen3-30b-w4a8-v1.yaml writes ``ext: {group_size: 64}`` under per_channel ssz, and ignores it:
    taken here too, with a warning, and the experts stay per channel."""
    with caplog.at_level("WARNING", logger="dist_quant"):
        recipe = w4a8_recipe(tmp_path, weight_ext={"group_size": 64})
    assert "group_size 64 is ignored" in caplog.text and "qconfig.weight.ext" in caplog.text
    assert recipe.quant_type("model.language_model.layers.0.mlp.experts.0.gate_proj") == "W4A8_DYNAMIC"
    caplog.clear()
    with caplog.at_level("WARNING", logger="dist_quant"):
        w4a8_recipe(tmp_path, weight_ext={"group_size": 0, "step": 5})
    assert "ignored" not in caplog.text


@pytest.mark.parametrize("weight_ext, act_ext, message", [
    ({"group_size": -1}, None, "group_size must be a non-negative integer, got -1"),
    ({"group_size": "64"}, None, "group_size must be a non-negative integer, got '64'"),
    ({"step": 0}, None, "step must be a whole number from 1 to 10000"),
    ({"step": True}, None, "step must be a whole number from 1 to 10000"),
    ({"step": 10 ** 400}, None, "step must be a whole number from 1 to 10000"),
    ({"damp": 0}, None, "damp must be a positive number"),
    ({"damp": "0.1"}, None, "damp must be a positive number"),
    ({"damp": float("inf")}, None, "damp must be a positive number"),
    ({"block": 2}, None, "W4A8_DYNAMIC has no option(s) ['block']"),
    (None, {"step": 3}, "W4A8_DYNAMIC's activations take no options"),
])
def test_bad_w4a8_options_are_refused(tmp_path, weight_ext, act_ext, message):
    with pytest.raises(RecipeError) as info:
        w4a8_recipe(tmp_path, weight_ext=weight_ext, act_ext=act_ext)
    assert message in str(info.value) and "qconfig." in str(info.value)


@pytest.mark.parametrize("method", ["ssz", "gptq"])
def test_ssz_step_bounds_the_refinement(method):
    """``ext.step`` is ssz's iteration count: one step is already the least-squares scale of the min/max codes.
    GPTQ keeps ssz's scale (the preset: gptq with ``step: 10``), so its step count is honoured too."""
    from dist_quant import schemes
    from dist_quant.algorithms.int4 import int4_codes, minmax_scale

    torch.manual_seed(5)
    weight = torch.randn(24, 96) * torch.rand(24, 1)
    spec = lambda ext: schemes.LinearSpec(weight=schemes.QSpec("per_channel", "int4", True, method, ext))  # noqa: E731
    scheme = schemes.get("W4A8_DYNAMIC")
    one = ascend_roles(scheme, weight, None, spec((("step", 1),)))["weight_scale"].reshape(-1)
    codes = int4_codes(weight, minmax_scale(weight)).double()
    least_squares = ((weight.double() * codes).sum(1) / (codes * codes).sum(1)).float()
    err = lambda s: (weight - int4_codes(weight, s).float() * s[:, None]).square().mean(1)  # noqa: E731
    expected = torch.where(err(least_squares) < err(minmax_scale(weight)), least_squares, minmax_scale(weight))
    torch.testing.assert_close(one, expected, rtol=1e-6, atol=0)
    full = ascend_roles(scheme, weight, None, spec(()))["weight_scale"].reshape(-1)
    assert bool((err(full) <= err(one)).all()) and bool((err(full) < err(one)).any())


def test_some_layers_experts_kept_at_w8a8_dynamic(tiny_model, calib_index, tmp_path):
    """msModelSlim's 30B W4A8 recipe keeps some layers' experts at W8A8_DYNAMIC: a W8A8_DYNAMIC linear_quant for
    layer 0's experts placed before the W4A8 one wins there (first match), and both MoE layouts are written."""
    doc = yaml.safe_load(DEFAULT_RECIPE.read_text())
    procs = doc["spec"]["process"]
    experts = next(step for step in procs if step.get("include") == ["*experts*"])
    int4 = {"act": dict(experts["qconfig"]["act"]),
            "weight": {"scope": "per_channel", "dtype": "int4", "symmetric": True, "method": "ssz"}}
    procs.append({"type": "linear_quant", "qconfig": int4, "include": ["*experts*"]})
    experts["include"] = ["*layers.0.mlp.experts*"]
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(doc))
    save = tmp_path / "quant"
    quantize_single_card(str(tiny_model), str(save), load_recipe(path), dataset=str(calib_index), progress=False)
    tensors, description, _ = read_checkpoint(save)
    layer = "model.language_model.layers.{}.mlp.experts.0.down_proj.weight"
    assert description[layer.format(0)] == "W8A8_DYNAMIC" and description[layer.format(1)] == "W4A8_DYNAMIC"
    assert tensors[layer.format(0)].shape[0] == 2 * tensors[layer.format(1)].shape[0]  # int4: two rows per byte row
    assert description["model_quant_type"] == "W8A8"


def test_gptq_keeps_ssz_scales_and_rounds_with_the_routed_tokens(tiny_model, calib_index, tmp_path):
    """``method: gptq``: each expert's weight_scale is ssz's, its codes are GPTQ's over the tokens routed to it (so
    they differ from plain rounding where an expert saw tokens), and an expert that saw none is rounded plainly."""
    import json

    runs = {}
    for method in ("ssz", "gptq"):
        save = tmp_path / method
        quantize_single_card(str(tiny_model), str(save), w4a8_recipe(tmp_path, method), dataset=str(calib_index),
                             progress=False)
        runs[method] = read_checkpoint(save)[0]
    coverage = json.loads((tmp_path / "gptq" / "calibration_coverage.json").read_text())["layers"]
    seen = [(int(layer), e) for layer, c in coverage.items() for e, n in enumerate(c["tokens_per_expert"]) if n]
    unseen = [(int(layer), e) for layer, c in coverage.items() for e in c["experts_without_tokens"]]
    key = "model.language_model.layers.{}.mlp.experts.{}.{}_proj.{}"
    changed = 0
    for layer, expert in seen + unseen:
        for proj in ("gate", "up", "down"):
            scale, weight = key.format(layer, expert, proj, "weight_scale"), key.format(layer, expert, proj, "weight")
            assert torch.equal(runs["gptq"][scale], runs["ssz"][scale])
            same = torch.equal(runs["gptq"][weight], runs["ssz"][weight])
            if (layer, expert) in unseen:
                assert same
            changed += not same
    assert changed == 3 * len(seen)


def test_a_gram_matrix_that_cannot_be_factored_is_refused_naming_the_linear(tiny_model, calib_index, tmp_path):
    """Through the worker (the next expert's factorisation is tried in the prefetch thread, which leaves a failure
    to the scheme): a damping far too small for an expert's few routed tokens (fewer than its 64 inputs) is refused
    with the linear's name and the option to raise."""
    recipe = w4a8_recipe(tmp_path, "gptq", weight_ext={"damp": 1e-12})
    with pytest.raises(RecipeError, match=r"linear model\.language_model\.layers\.\d+\.mlp\.experts\.\d+\.\w+_proj: "
                                          r"GPTQ cannot round it: .* raise weight\.ext\.damp \(now 1e-12"):
        quantize_single_card(str(tiny_model), str(tmp_path / "q"), recipe, dataset=str(calib_index), progress=False)
