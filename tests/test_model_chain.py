"""Chaining dist-quant's per-layer pieces reproduces the HF model's per-layer hidden states and logits (fp32), for
Qwen3-VL-MoE (through the plan interpreter, as quant and eval chain them) and Qwen3-MoE (the family's pieces chained
by hand, and through the interpreter)."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextRMSNorm

from dist_quant.calib.dataset import CalibSample, load_samples
from dist_quant.calib.inputs import build_model_inputs
from dist_quant.checkpoint.formats import ascendv1
from dist_quant.checkpoint.layout import create_parts, plan_layout
from dist_quant.errors import CheckpointError
from dist_quant.evaluate import FloatModel, ModelRunner
from dist_quant.models import moe_decoder
from dist_quant.models import qwen3_moe as qwen3_moe_family
from dist_quant.models import qwen3_vl_moe as qvl
from dist_quant.models.family import VisionOutput, load_checked
from dist_quant.recipe import load_recipe
from dist_quant.runtime.interpret import interpret
from dist_quant.runtime.layout import unit_entries
from dist_quant.runtime.plan import Kind, plan_units
from dist_quant.runtime.resume import STREAM_DIR
from dist_quant.runtime.runner import UnitRunner
from dist_quant.synthetic import make_tiny_text_model
from helpers import hf_kwargs, load_hf_model, text_turn_inputs

TOL = 1e-5
PLAIN_RECIPE = Path(__file__).parent / "data" / "plain_w8a8.yaml"


def hf_reference(model, sample):
    """Each layer's output with its deepstack feature added, taken as the next layer's input (version-independent:
    4.57 adds deepstack in place on the layer output, 5.x does not), the last layer's output, and the logits."""
    layers = model.get_decoder().layers
    outputs = {}

    def next_input(index):
        def hook(module, args, kwargs):
            outputs[index] = (args[0] if args else kwargs["hidden_states"]).clone()
        return hook

    hooks = [layer.register_forward_pre_hook(next_input(i - 1), with_kwargs=True)
             for i, layer in enumerate(layers) if i > 0]
    hooks.append(layers[-1].register_forward_hook(
        lambda m, a, out: outputs.__setitem__(len(layers) - 1, (out[0] if isinstance(out, tuple) else out).clone())))
    try:
        with torch.no_grad():
            logits = model(**hf_kwargs(sample, model)).logits
    finally:
        for h in hooks:
            h.remove()
    return outputs, logits


def quantizing_chain(model_dir, inputs, group_size, work):
    """The quantizing unit runner (untransformed recipe: comparable with plain HF) through the plan interpreter:
    every layer's output but the last, as saved at the layer boundaries for a resume."""
    reader, config = qvl.load_checked(model_dir)
    plan = plan_units(config, group_size)
    recipe = load_recipe(PLAIN_RECIPE)
    layout = plan_layout(unit_entries(qvl, reader, config, recipe, plan), 0, ascendv1.part_names)
    work.mkdir(parents=True, exist_ok=True)
    create_parts(layout.parts, work)
    runner = UnitRunner(0, str(model_dir), recipe, str(work), str(work / "run"), "cpu", plan, layout.units)
    for _ in interpret(plan, None, inputs, runner):
        pass
    saved = sorted((work / "run" / STREAM_DIR).glob("after_layer_*.safetensors"))
    return {int(p.stem.rsplit("_", 1)[1]): [t for _, t in sorted(load_file(p).items(), key=lambda kv: int(kv[0]))]
            for p in saved}


def evaluating_chain(model_dir, inputs, group_size):
    """The evaluator's float model runner through the same interpreter: every layer's output and the logits."""
    family, reader, config = load_checked(model_dir)
    runner = ModelRunner(FloatModel(reader, config, torch.float32), family.build_text_rotary(config))
    per_layer, logits = {}, None
    for unit, result in interpret(plan_units(config, group_size), None, inputs, runner):
        if unit.kind is Kind.LAYER and result is not None:
            per_layer[unit.layer - 1] = result
        elif unit.kind is Kind.HEAD:
            per_layer[config.get_text_config().num_hidden_layers - 1], logits = result
    sizes = [s.input_ids.shape[1] for s in inputs]
    return per_layer, list(torch.split(logits, sizes))


@pytest.mark.parametrize("group_size", [3, 16])
def test_chain_matches_hf_forward(tiny_model, calib_index, group_size, tmp_path):
    samples = load_samples(calib_index)
    inputs = build_model_inputs(tiny_model, samples[:2])
    inputs.append(text_turn_inputs(tiny_model, "A text-only prompt about quantization."))
    per_layer, logits = evaluating_chain(tiny_model, inputs, group_size)
    quantizing = quantizing_chain(tiny_model, inputs, group_size, tmp_path)
    model = load_hf_model(tiny_model)
    for i, sample in enumerate(inputs):
        ref_layers, ref_logits = hf_reference(model, sample)
        assert set(ref_layers) == set(per_layer) == set(quantizing) | {max(ref_layers)}
        for layer, ref in ref_layers.items():
            torch.testing.assert_close(per_layer[layer][i], ref, atol=TOL, rtol=TOL)
            if layer in quantizing:
                torch.testing.assert_close(quantizing[layer][i], ref, atol=TOL, rtol=TOL)
        torch.testing.assert_close(logits[i].reshape(ref_logits.shape), ref_logits, atol=TOL, rtol=TOL)


# --- Qwen3-MoE ------------------------------------------------------------------------------------------------------

TEXTS = ("The quick brown fox jumps over the lazy dog near the river bank.",
         "Quantization makes large language models smaller and faster.", "A")


@pytest.fixture(scope="module")
def chain_text_model(tmp_path_factory) -> Path:
    """A tiny random fp32 Qwen3-MoE with one dense-MLP layer."""
    return make_tiny_text_model(tmp_path_factory.mktemp("text") / "model", mlp_only_layers=(2,))


def text_inputs(model_dir) -> list:
    return build_model_inputs(model_dir, [CalibSample(image=None, text=text) for text in TEXTS], images=False)


def pieces_chain(model_dir, inputs, group_size):
    """Qwen3-MoE's pieces chained by hand, as a worker chains them: embeddings (nothing placed in them), each
    sample's context, each layer without its experts, the router, the experts read per group and run on their
    tokens, nothing added after a layer, the final norm and lm_head. Every layer's output and the logits."""
    family = qwen3_moe_family
    reader, config = family.load_checked(model_dir)

    def read(key, shape=None):
        return reader.get(key, dtype=torch.float32, shape=shape)

    rotary, act_fn = family.build_text_rotary(config), family.activation(config)
    contexts = [family.sample_context(config, rotary, s, None, torch.float32, torch.device("cpu")) for s in inputs]
    embed = read(family.EMBED_KEY)
    hidden = [family.place_images(config, nn.functional.embedding(s.input_ids, embed), s.input_ids, None)
              for s in inputs]
    per_layer = {}
    for layer_idx in range(config.num_hidden_layers):
        block = family.build_layer(config, layer_idx, read, torch.float32)
        moe = family.is_moe_layer(config, layer_idx)
        streams, x = family.layer_forward(block, hidden, contexts, moe)
        if moe:
            ids, weights = family.route(family.router_logits(block, x), config.num_experts_per_tok, x.dtype)
            out = torch.zeros_like(x)
            for first in range(0, config.num_experts, group_size):
                stop = min(first + group_size, config.num_experts)
                experts = [family.float_expert(*w, act_fn)
                           for w in family.read_experts(reader, config, layer_idx, first, stop, torch.float32)]
                out += family.expert_group_forward(x, ids, weights, experts, first)
            parts = torch.split(out, [s.shape[1] for s in streams])
            streams = [s + p.reshape(s.shape) for s, p in zip(streams, parts)]
        hidden = [family.add_deepstack(h, ctx, layer_idx) for h, ctx in zip(streams, contexts)]
        per_layer[layer_idx] = hidden
    norm, lm_head = read(family.NORM_KEY), read(family.LM_HEAD_KEY)
    return per_layer, [family.rms_norm(h, norm, config.rms_norm_eps) @ lm_head.T for h in hidden]


@pytest.mark.parametrize("group_size", [3, 16])
def test_qwen3_moe_chain_matches_hf_forward(chain_text_model, group_size):
    inputs = text_inputs(chain_text_model)
    per_layer, logits = pieces_chain(chain_text_model, inputs, group_size)
    interpreted, interpreted_logits = evaluating_chain(chain_text_model, inputs, group_size)
    model = Qwen3MoeForCausalLM.from_pretrained(chain_text_model, dtype=torch.float32).eval()
    for i, sample in enumerate(inputs):
        ref_layers, ref_logits = hf_reference(model, sample)
        assert set(ref_layers) == set(per_layer) == set(interpreted)
        for layer, ref in ref_layers.items():
            torch.testing.assert_close(per_layer[layer][i], ref, atol=TOL, rtol=TOL)
            torch.testing.assert_close(interpreted[layer][i], ref, atol=TOL, rtol=TOL)
        torch.testing.assert_close(logits[i], ref_logits, atol=TOL, rtol=TOL)
        torch.testing.assert_close(interpreted_logits[i].reshape(ref_logits.shape), ref_logits, atol=TOL, rtol=TOL)


def test_qwen3_moe_refuses_image_features():
    """A text-only family has no place for image features: a vision output handed to it is an error, not dropped."""
    config = qwen3_moe_family.load_config(json.loads((Path(__file__).parent / "data" /
                                                      "Qwen3-30B-A3B.config.json").read_text()))
    vision = VisionOutput(torch.zeros(1, config.hidden_size), [])
    with pytest.raises(ValueError, match="no vision tower"):
        qwen3_moe_family.place_images(config, torch.zeros(1, 2, config.hidden_size), torch.zeros(1, 2), vision)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_final_rms_norm_is_transformers_own_bit_for_bit(dtype):
    """moe_decoder.rms_norm computes what both families' transformers RMSNorm modules compute, bit for bit."""
    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(2, 7, 64, generator=generator) * 30).to(dtype)
    weight = (1 + 0.1 * torch.randn(64, generator=generator)).to(dtype)
    for norm_class in (Qwen3MoeRMSNorm, Qwen3VLMoeTextRMSNorm):
        norm = norm_class(64, eps=1e-6).to(dtype)
        norm.weight.data = weight
        with torch.no_grad():
            assert torch.equal(moe_decoder.rms_norm(hidden, weight, 1e-6), norm(hidden))


def test_qwen3_moe_weights_must_be_what_the_config_describes(chain_text_model, tmp_path):
    """load_checked refuses, from the headers, weights its config does not describe: a missing expert, another
    expert shape, a layer the config does not count; read_experts returns the stored per-expert tensors."""
    reader, config = qwen3_moe_family.load_checked(chain_text_model)
    gate, up, down = qwen3_moe_family.read_experts(reader, config, 0, 5, 6, torch.float32)[0]
    tensors = load_file(chain_text_model / "model.safetensors")
    assert torch.equal(gate, tensors["model.layers.0.mlp.experts.5.gate_proj.weight"])
    assert torch.equal(down, tensors["model.layers.0.mlp.experts.5.down_proj.weight"])
    key = "model.layers.1.mlp.experts.7.up_proj.weight"
    for change, message in [
        (lambda t: t.pop(key), f"1 tensor(s) it needs are missing ({key})"),
        (lambda t: t.update({key: t[key][:, :-1].contiguous()}), f"tensor {key} in"),
        (lambda t: t.update({"model.layers.4.input_layernorm.weight": t["model.norm.weight"].clone()}),
         "num_hidden_layers=4, but the weights hold layers up to 4"),
    ]:
        broken = tmp_path / "broken"
        shutil.copytree(chain_text_model, broken, dirs_exist_ok=True)
        changed = dict(tensors)
        change(changed)
        save_file(changed, str(broken / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=re.escape(message)):
            qwen3_moe_family.load_checked(broken)
