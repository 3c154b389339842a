"""Chaining dist-quant's per-layer pieces reproduces the HF model's per-layer hidden states and logits (fp32)."""

from pathlib import Path

import pytest
import torch
from helpers import MemorySink, hf_kwargs, load_hf_model

from dist_quant.calib.dataset import load_samples
from dist_quant.calib.inputs import build_model_inputs, model_inputs_for_text
from dist_quant.models import qwen3_vl_moe as qvl
from dist_quant.recipe import load_recipe
from dist_quant.runtime.plan import make_plan
from dist_quant.runtime.sweep import run_sweep
from dist_quant.runtime.worker import Worker

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


def chain(model_dir, inputs, group_size):
    worker = Worker(model_dir, load_recipe(PLAIN_RECIPE), MemorySink())  # untransformed: compare with plain HF
    per_layer = {}
    final = run_sweep(worker, inputs, make_plan(worker.config, group_size),
                      on_layer_done=lambda layer, hidden: per_layer.__setitem__(layer, hidden))
    norm = worker.reader.get(qvl.NORM_KEY)
    lm_head = worker.reader.get(qvl.LM_HEAD_KEY)
    eps = worker.config.text_config.rms_norm_eps
    logits = [qvl.rms_norm(h, norm, eps) @ lm_head.T for h in final]
    return per_layer, logits


@pytest.mark.parametrize("group_size", [3, 16])
def test_chain_matches_hf_forward(tiny_model, calib_index, group_size):
    samples = load_samples(calib_index)
    inputs = build_model_inputs(tiny_model, samples[:2])
    inputs.append(model_inputs_for_text(tiny_model, "A text-only prompt about quantization."))
    per_layer, logits = chain(tiny_model, inputs, group_size)
    model = load_hf_model(tiny_model)
    for i, sample in enumerate(inputs):
        ref_layers, ref_logits = hf_reference(model, sample)
        assert set(ref_layers) == set(per_layer)
        for layer, ref in ref_layers.items():
            torch.testing.assert_close(per_layer[layer][i], ref, atol=TOL, rtol=TOL)
        torch.testing.assert_close(logits[i], ref_logits, atol=TOL, rtol=TOL)
