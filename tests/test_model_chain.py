"""Chaining dist-quant's per-layer pieces reproduces the HF model's per-layer hidden states and logits (fp32)."""

from pathlib import Path

import pytest
import torch
from helpers import hf_kwargs, load_hf_model
from safetensors.torch import load_file

from dist_quant.checkpoint.formats import ascendv1
from dist_quant.checkpoint.layout import create_parts, plan_layout
from dist_quant.runtime.worker import checkpoint_entries
from dist_quant.calib.dataset import load_samples
from dist_quant.calib.inputs import build_model_inputs, model_inputs_for_text
from dist_quant.models import qwen3_vl_moe as qvl
from dist_quant.recipe import load_recipe
from dist_quant.evaluate import FloatModel, ModelRunner
from dist_quant.runtime.interpret import interpret
from dist_quant.runtime.plan import Kind, plan_units
from dist_quant.runtime.resume import STREAM_DIR
from dist_quant.runtime.runner import UnitRunner

TOL = 1e-5
PLAIN_RECIPE = Path(__file__).parent / "data" / "plain_w8a8.yaml"


def hf_reference(model, sample):
    """Each layer's output with its deepstack feature added, taken as the next layer's input (version-independent:
    4.57 adds deepstack in place on the layer output, 5.x does not), the last layer's output, and the logits."""
    layers = model.model.language_model.layers
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
    config = qvl.load_checked(model_dir)[1]
    plan = plan_units(config, group_size)
    recipe = load_recipe(PLAIN_RECIPE)
    layout = plan_layout(checkpoint_entries(str(model_dir), recipe, plan), 0, ascendv1.part_names)
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
    reader, config = qvl.load_checked(model_dir)
    runner = ModelRunner(FloatModel(reader, config, torch.float32), qvl.build_text_rotary(config))
    per_layer, logits = {}, None
    for unit, result in interpret(plan_units(config, group_size), None, inputs, runner):
        if unit.kind is Kind.LAYER and result is not None:
            per_layer[unit.layer - 1] = result
        elif unit.kind is Kind.HEAD:
            per_layer[config.text_config.num_hidden_layers - 1], logits = result
    sizes = [s.input_ids.shape[1] for s in inputs]
    return per_layer, list(torch.split(logits, sizes))


@pytest.mark.parametrize("group_size", [3, 16])
def test_chain_matches_hf_forward(tiny_model, calib_index, group_size, tmp_path):
    samples = load_samples(calib_index)
    inputs = build_model_inputs(tiny_model, samples[:2])
    inputs.append(model_inputs_for_text(tiny_model, "A text-only prompt about quantization."))
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
