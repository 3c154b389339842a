"""End to end: the CLI quantizes a tiny model; the checkpoint is checked against FORMAT.md, a hand-written int8
reference quantizer, and an independent HF forward (calibration ranges, simulated outputs)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_quant.algorithms.quantize import dynamic_w8a8_linear, static_w8a8_linear
from dist_quant.calib.dataset import load_samples
from dist_quant.calib.inputs import build_model_inputs
from dist_quant.cli import main
from helpers import hf_kwargs, load_hf_model, read_checkpoint, source_weight

STATIC_SUFFIXES = {"weight", "input_scale", "input_offset", "deq_scale", "quant_bias"}
# no QuaRot/smoothing: compare with the plain HF model
PLAIN_RECIPE = Path(__file__).parent / "data" / "plain_w8a8.yaml"
TOP_LEVEL = {"version", "model_quant_type", "metadata", "group_size", "optional"}


@pytest.fixture(scope="module")
def quantized(tiny_model, calib_index, tmp_path_factory):
    save = tmp_path_factory.mktemp("out") / "quant"
    rc = main(["quant", "--model_path", str(tiny_model), "--save_path", str(save), "--device", "cpu",
               "--dataset", str(calib_index), "--quiet", "--config_path", str(PLAIN_RECIPE)])
    assert rc == 0
    return save


def load_checkpoint(save):
    tensors, description, _ = read_checkpoint(save)
    return tensors, {k: v for k, v in description.items() if k not in TOP_LEVEL}, description


@pytest.fixture(scope="module")
def checkpoint(quantized):
    tensors, per_tensor, _ = load_checkpoint(quantized)
    return tensors, per_tensor


@pytest.fixture(scope="module")
def hf_calibration(tiny_model, calib_index):
    """Every nn.Linear input and every MoE block input of an independent HF forward over the calibration set."""
    model = load_hf_model(tiny_model)
    inputs = build_model_inputs(tiny_model, load_samples(calib_index))
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__.endswith("SparseMoeBlock"):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for sample in inputs:
            model(**hf_kwargs(sample, model))
    for h in hooks:
        h.remove()
    return model, {name: torch.cat(xs) for name, xs in seen.items()}


# --- an independent int8 reference, written from FORMAT.md with numpy ------------------------------------------------

def ref_weight_quant(w: np.ndarray):
    w = w.astype(np.float32)
    scale = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
    q = np.clip(np.round(w / scale[:, None]), -128, 127).astype(np.int8)
    return q, scale


def ref_act_params(x_min: float, x_max: float):
    lo, hi = np.float32(min(x_min, 0.0)), np.float32(max(x_max, 0.0))
    scale = np.float32((hi - lo) / np.float32(255))
    return scale, np.float32(np.round(-lo / scale) - 128)


def static_modules(description):
    return sorted({k.rsplit(".", 1)[0] for k, v in description.items() if v == "W8A8"})


def dynamic_modules(description):
    return sorted({k.rsplit(".", 1)[0] for k, v in description.items() if v == "W8A8_DYNAMIC"})


# --- format --------------------------------------------------------------------------------------------------------

def test_types_per_recipe(checkpoint, tiny_model):
    _, description = checkpoint
    static = static_modules(description)
    assert "model.language_model.layers.0.self_attn.q_proj" in static
    assert "model.language_model.layers.2.mlp.gate_proj" in static  # the dense-MLP layer
    assert "model.visual.blocks.1.mlp.linear_fc1" in static
    assert not [m for m in static if "linear_fc2" in m or "merger" in m or "experts" in m or m.endswith("mlp.gate")]
    dynamic = dynamic_modules(description)
    assert dynamic == sorted(f"model.language_model.layers.{layer}.mlp.experts.{e}.{p}"
                             for layer in (0, 1, 3) for e in range(8) for p in ("gate_proj", "up_proj", "down_proj"))
    for key in ("lm_head.weight", "model.language_model.embed_tokens.weight",
                "model.language_model.layers.0.mlp.gate.weight",
                "model.visual.merger.linear_fc2.weight", "model.visual.deepstack_merger_list.0.linear_fc1.weight",
                "model.visual.blocks.0.mlp.linear_fc2.bias", "model.visual.patch_embed.proj.weight",
                "model.visual.pos_embed.weight", "model.language_model.layers.0.self_attn.q_norm.weight"):
        assert description[key] == "FLOAT", key


def test_description_top_level(quantized):
    _, _, description = load_checkpoint(quantized)
    assert description["model_quant_type"] == "W8A8"
    assert description["version"] == "1.0.0" and description["group_size"] == 0 and description["metadata"] == {}
    assert description["optional"] == {}  # msModelSlim's saver writes it always (f200bca), empty without QuaRot
    assert not {"kv_cache_type", "fa_quant_type"} & set(description)


def test_dtypes_and_shapes_follow_format(checkpoint):
    tensors, description = checkpoint
    assert set(tensors) == set(description)
    for module in static_modules(description):
        out, _ = tensors[f"{module}.weight"].shape
        assert {s for s in STATIC_SUFFIXES if f"{module}.{s}" in tensors} == STATIC_SUFFIXES
        assert f"{module}.weight_scale" not in tensors
        assert tensors[f"{module}.weight"].dtype == torch.int8
        input_scale = tensors[f"{module}.input_scale"]
        assert input_scale.dtype == torch.float32 and input_scale.shape == (1,)
        offset = tensors[f"{module}.input_offset"]
        assert offset.dtype == torch.float32 and offset.shape == (1,) and offset == offset.round()
        # a float32 model: the int64 bit pattern (vLLM Ascend serves it in float16, where the parameter is int64)
        assert tensors[f"{module}.deq_scale"].dtype == torch.int64 and tensors[f"{module}.deq_scale"].shape == (out,)
        assert tensors[f"{module}.quant_bias"].dtype == torch.int32 and tensors[f"{module}.quant_bias"].shape == (out,)
        if f"{module}.bias" in tensors:
            assert module.startswith("model.visual.blocks.")
            assert tensors[f"{module}.bias"].dtype == torch.float32 and description[f"{module}.bias"] == "FLOAT"
    for module in dynamic_modules(description):
        out, _ = tensors[f"{module}.weight"].shape
        assert tensors[f"{module}.weight"].dtype == torch.int8
        assert tensors[f"{module}.weight_scale"].dtype == torch.float32
        assert tensors[f"{module}.weight_scale"].shape == (out, 1)
        assert torch.equal(tensors[f"{module}.weight_offset"], torch.zeros(out, 1))
    assert not [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]


def test_qkv_share_activation_params(checkpoint):
    tensors, _ = checkpoint
    for layer in range(4):
        p = f"model.language_model.layers.{layer}.self_attn"
        for suffix in ("input_scale", "input_offset"):
            assert torch.equal(tensors[f"{p}.q_proj.{suffix}"], tensors[f"{p}.k_proj.{suffix}"])
            assert torch.equal(tensors[f"{p}.q_proj.{suffix}"], tensors[f"{p}.v_proj.{suffix}"])


# --- values against independent computations ----------------------------------------------------------------------

def test_weights_and_scales_equal_reference(checkpoint, hf_calibration):
    tensors, description = checkpoint
    model, _ = hf_calibration
    for module in dynamic_modules(description):
        q, scale = ref_weight_quant(source_weight(model, module).numpy())
        assert np.array_equal(tensors[f"{module}.weight"].numpy(), q), module
        assert np.array_equal(tensors[f"{module}.weight_scale"].numpy()[:, 0], scale), module
    for module in static_modules(description):
        q, _ = ref_weight_quant(source_weight(model, module).numpy())
        assert np.array_equal(tensors[f"{module}.weight"].numpy(), q), module


def test_activation_params_from_independent_forward(checkpoint, hf_calibration):
    tensors, description = checkpoint
    model, seen = hf_calibration
    for module in static_modules(description):
        x = seen[module]
        scale, offset = ref_act_params(float(x.min()), float(x.max()))
        assert tensors[f"{module}.input_scale"].item() == pytest.approx(float(scale), rel=1e-6), module
        assert tensors[f"{module}.input_offset"].item() == float(offset), module
        _, w_scale = ref_weight_quant(source_weight(model, module).numpy())
        deq = float_deq_scale(tensors, module).numpy()
        np.testing.assert_allclose(deq, tensors[f"{module}.input_scale"].numpy() * w_scale, rtol=1e-6)
        bias = model.get_submodule(module).bias
        bias = np.zeros(deq.shape) if bias is None else bias.detach().double().numpy()
        row_sums = tensors[f"{module}.weight"].numpy().astype(np.float64).sum(axis=1)
        expected = np.round(bias / deq.astype(np.float64) - float(offset) * row_sums)
        assert np.array_equal(tensors[f"{module}.quant_bias"].numpy(), expected.astype(np.int32)), module


def float_deq_scale(tensors, module):
    """A float32 model's deq_scale holds float32 bit patterns in int64 (docs/FORMAT.md): reinterpret them."""
    return tensors[f"{module}.deq_scale"].to(torch.int32).view(torch.float32)


def relative_error(y, ref):
    return float((y - ref).norm() / ref.norm())


def test_simulated_static_linears_close_to_float(checkpoint, hf_calibration):
    tensors, description = checkpoint
    model, seen = hf_calibration
    for module in static_modules(description):
        linear = model.get_submodule(module)
        x = seen[module]
        y = static_w8a8_linear(x, tensors[f"{module}.weight"], tensors[f"{module}.quant_bias"],
                               float_deq_scale(tensors, module), tensors[f"{module}.input_scale"],
                               tensors[f"{module}.input_offset"])
        assert relative_error(y, linear(x).detach()) < 0.05, module


def test_simulated_expert_linears_close_to_float(checkpoint, hf_calibration):
    tensors, description = checkpoint
    model, seen = hf_calibration
    for module in dynamic_modules(description):
        layer_mlp = module.split(".experts.")[0]
        x = seen[layer_mlp]
        if module.endswith("down_proj"):
            prefix = module.rsplit(".", 1)[0]
            gate, up = (source_weight(model, f"{prefix}.{p}") for p in ("gate_proj", "up_proj"))
            x = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
        y = dynamic_w8a8_linear(x, tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"])
        assert relative_error(y, x @ source_weight(model, module).T) < 0.05, module


def test_float_tensors_are_the_source(checkpoint, hf_calibration):
    tensors, description = checkpoint
    model, _ = hf_calibration
    state = model.state_dict()
    for key, kind in description.items():
        if kind == "FLOAT" and key in state and not key.endswith(".bias"):
            assert torch.equal(tensors[key], state[key]), key


def test_static_linear_bias_is_the_source_bias(checkpoint, hf_calibration):
    """FORMAT.md: a static W8A8 linear that has a bias keeps it as a float32 `.bias` ("FLOAT"), besides folding it into
    quant_bias; the plain recipe transforms nothing, so it is the source bias bit for bit (zeros would not do)."""
    tensors, description = checkpoint
    model, _ = hf_calibration
    with_bias = [m for m in static_modules(description) if model.get_submodule(m).bias is not None]
    assert {m.rsplit(".", 1)[1] for m in with_bias} == {"qkv", "proj", "linear_fc1"}  # the vision blocks' linears
    for module in static_modules(description):
        bias = model.get_submodule(module).bias
        if bias is None:
            assert f"{module}.bias" not in tensors, module
            continue
        assert description[f"{module}.bias"] == "FLOAT" and tensors[f"{module}.bias"].dtype == torch.float32, module
        assert torch.equal(tensors[f"{module}.bias"], bias.detach().to(torch.float32)), module


def test_output_files(quantized, tiny_model):
    names = {p.name for p in quantized.iterdir()}
    assert "config.json" in names and "tokenizer.json" in names and "chat_template.jinja" in names
    assert "plain_w8a8.yaml" in names
    assert not [n for n in names if n.startswith("model") and n.endswith(".safetensors")]
    config = json.loads((quantized / "config.json").read_text())
    assert "quantization_config" not in config and "quantization_config" not in config["text_config"]
    assert config == {k: v for k, v in json.loads((tiny_model / "config.json").read_text()).items()
                      if k != "quantization_config"}
