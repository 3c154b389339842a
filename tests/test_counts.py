"""The closed-form sizes of plan and check (models/qwen3_vl_moe_sizes.py, read from config.json without torch)
against the modules transformers builds for the same config on the meta device: every tensor with its shape, every
parameter count and every linear, by name and in order, for the reference configs, a tiny one and configs with odd
sizes, attention biases, dense-MLP layers and other deepstack lists (none included)."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as hf

from dist_quant.check.model import Model
from dist_quant.errors import CheckpointError
from dist_quant.models import qwen3_vl_moe as family
from dist_quant.models import qwen3_vl_moe_sizes as sizes

DATA = Path(__file__).parent / "data"
REFERENCE = Path("/work/shared/reference-configs")


def reference_config(name: str) -> dict:
    path = REFERENCE / f"{name}.config.json"
    return json.loads((path if path.exists() else DATA / f"{name}.config.json").read_text())


TINY = {  # dist_quant/synthetic.py's defaults
    "model_type": "qwen3_vl_moe", "image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3,
    "vision_end_token_id": 4,
    "text_config": {"vocab_size": 640, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8,
                    "num_experts_per_tok": 2, "moe_intermediate_size": 48, "mlp_only_layers": [],
                    "rope_scaling": {"mrope_section": [4, 2, 2], "rope_type": "default"}},
    "vision_config": {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 4,
                      "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 64,
                      "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1, 2]},
}


def variant(base: dict, text: dict = (), vision: dict = ()) -> dict:
    raw = copy.deepcopy(base)
    raw["text_config"].update(text)
    raw["vision_config"].update(vision)
    return raw


CONFIGS = {
    "tiny": TINY,
    "30B": reference_config("Qwen3-VL-30B-A3B"),
    "235B": reference_config("Qwen3-VL-235B-A22B"),
    # odd widths, a head size that is not hidden / heads, attention biases, MHA (no kv heads given), 3 input channels
    # by default, a 3x3 merge, no deepstack
    "odd": variant(TINY, {"hidden_size": 72, "intermediate_size": 100, "moe_intermediate_size": 40,
                          "num_attention_heads": 3, "head_dim": 20, "num_key_value_heads": None, "attention_bias": True,
                          "num_experts": 5, "num_experts_per_tok": 3, "vocab_size": 777,
                          "rope_scaling": {"mrope_section": [6, 2, 2], "rope_type": "default"}},
                   {"hidden_size": 36, "num_heads": 3, "intermediate_size": 50, "patch_size": 3, "out_hidden_size": 72,
                    "spatial_merge_size": 3, "temporal_patch_size": 1, "num_position_embeddings": 49,
                    "deepstack_visual_indexes": [], "in_channels": 1, "depth": 3}),
    # dense-MLP layers: listed ones and every other layer (decoder_sparse_step 2); head_dim from hidden / heads
    "dense": variant(TINY, {"mlp_only_layers": [0, 3], "decoder_sparse_step": 2, "num_hidden_layers": 6,
                            "head_dim": None},
                     {"deepstack_visual_indexes": [3, 1]}),
    # deepstack from every block, more than the text layers
    "deepstack": variant(TINY, {"num_hidden_layers": 2}, {"depth": 5, "deepstack_visual_indexes": [0, 1, 2, 3, 4]}),
}


def numel(module: nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


def linears(module: nn.Module, prefix: str) -> list[tuple[str, int]]:
    return [(f"{prefix}.{name}", m.weight.numel()) for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def meta_model_tensors(hf_config) -> dict:
    """The reference: every tensor of the whole model transformers builds on the meta device, with its shape (None
    for the fused experts, whose orientation depends on the transformers version that wrote them)."""
    with torch.device("meta"):
        model = hf.Qwen3VLMoeForConditionalGeneration._from_config(hf_config)
    return {key: None if ".mlp.experts." in key else tuple(t.shape) for key, t in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_closed_form_tensors_are_those_of_the_model_transformers_builds(name):
    raw = CONFIGS[name]
    hf_config = family.load_config(raw)
    reference = meta_model_tensors(hf_config)
    for config in (sizes.load_sizes_config(raw), sizes.load_checked_sizes(raw), hf_config):  # check, plan, quant
        assert sizes.expected_tensors(config) == reference
    assert family.expected_tensors is sizes.expected_tensors  # quant's check against the weights uses the same


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_closed_form_counts_are_the_modules_transformers_builds(name):
    raw = CONFIGS[name]
    hf_config, plan_config = family.load_config(raw), sizes.load_sizes_config(raw)
    with torch.device("meta"):
        vision = hf.Qwen3VLMoeVisionModel._from_config(hf_config.vision_config)
    for config in (plan_config, hf_config):  # the plan reads either
        assert sizes.vision_param_count(config) == numel(vision)
        assert list(sizes.vision_linears(config).items()) == linears(vision, sizes.VISUAL)
        tc = config.text_config
        kinds = set()
        for layer_idx in range(tc.num_hidden_layers):
            if len(kinds) == 2 and name in ("30B", "235B"):
                break  # every layer of a kind is the same; the small configs check them all
            layer = family.meta_layer(hf_config, layer_idx)  # transformers' decoder layer, experts dropped
            kinds.add(sizes.is_moe_layer(tc, layer_idx))
            assert sizes.is_moe_layer(tc, layer_idx) == isinstance(layer.mlp, hf.Qwen3VLMoeTextSparseMoeBlock)
            assert sizes.layer_param_count(config, layer_idx) == numel(layer)
            assert list(sizes.layer_linears(config, layer_idx).items()) == \
                linears(layer, sizes.layer_prefix(layer_idx))
        with torch.device("meta"):
            experts = hf.Qwen3VLMoeTextExperts(hf_config.text_config)
        assert sizes.expert_param_count(config) * tc.num_experts == numel(experts)
        gate_up, down = experts.gate_up_proj.shape[1:], experts.down_proj.shape[1:]  # [H, 2I], [I, H]: x @ W
        assert sizes.expert_shapes(config) == ((gate_up[1] // 2, gate_up[0]),) * 2 + ((down[1], down[0]),)
        assert sizes.expert_linears(config, 1, 2, 4) == {
            f"{sizes.layer_prefix(1)}.mlp.experts.{e}.{proj}": out * inputs
            for e in (2, 3) for proj, (out, inputs) in zip(sizes.EXPERT_PROJS, sizes.expert_shapes(config))}


def test_the_reference_models_have_their_public_parameter_counts():
    """Vision, embeddings, layers, experts and head add up to the published totals (rounded to 0.1%)."""
    for name, published in (("235B", 235.67e9), ("30B", 31.07e9)):
        config = sizes.load_sizes_config(CONFIGS[name])
        tc = config.text_config
        experts = sum(sizes.is_moe_layer(tc, i) for i in range(tc.num_hidden_layers)) * tc.num_experts
        total = (sizes.vision_param_count(config) + 2 * tc.vocab_size * tc.hidden_size + tc.hidden_size
                 + sum(sizes.layer_param_count(config, i) for i in range(tc.num_hidden_layers))
                 + experts * sizes.expert_param_count(config))
        assert total == pytest.approx(published, rel=1e-3)


def test_a_transformers_5_config_reads_the_same_sizes():
    """transformers 5.x writes ``rope_parameters`` (no rope_theta / rope_scaling) and ``dtype``: the sizes do not
    read the rope fields, and the dtype is read from either key; check describes its model as for 4.57's config
    (transformers 4.57's config class, which check used to read it with, finds no rope_scaling there)."""
    raw = copy.deepcopy(CONFIGS["235B"])
    text = raw["text_config"]
    rope = {**text.pop("rope_scaling"), "rope_theta": text.pop("rope_theta")}
    text["rope_parameters"] = rope
    text["dtype"] = text.pop("torch_dtype", "bfloat16")
    assert sizes.load_sizes_config(raw) == sizes.load_sizes_config(CONFIGS["235B"])
    assert sizes.load_checked_sizes(raw) == sizes.load_sizes_config(CONFIGS["235B"])
    assert Model(raw).linears == Model(CONFIGS["235B"]).linears
    assert sizes.source_bytes(raw) == 2
    assert sizes.source_bytes({"dtype": "float32"}) == 4


def test_float_dtype_names_are_torch_s():
    for name, size in sizes.FLOAT_DTYPE_BYTES.items():
        dtype = getattr(torch, name)
        assert dtype.is_floating_point and dtype.itemsize == size
        assert family.source_dtype({"torch_dtype": name}) == dtype
    for not_a_float in ("int8", "bool", "complex64", "no_such_dtype", 16):
        assert family.source_dtype({"torch_dtype": not_a_float}) == torch.bfloat16


@pytest.mark.parametrize("text, vision, field", [
    ({"num_hidden_layers": 10**12}, {}, "num_hidden_layers is 1000000000000, more than"),
    ({"num_experts": 0}, {}, "num_experts is 0, not a positive integer"),
    ({"num_experts_per_tok": 9}, {}, "num_experts_per_tok is 9"),
    ({"mlp_only_layers": [4]}, {}, "mlp_only_layers must list"),
    ({"attention_bias": "yes"}, {}, "attention_bias is 'yes'"),
    ({}, {"deepstack_visual_indexes": [0, 0]}, "deepstack_visual_indexes must list distinct"),
    ({}, {"depth": "4"}, "vision_config.depth is '4', not a positive integer"),
])
def test_sizes_the_plan_cannot_use_are_refused_like_the_quantizer_refuses_them(text, vision, field):
    raw = variant(TINY, text, vision)
    for load in (sizes.load_sizes_config, family.load_config):
        with pytest.raises(CheckpointError, match=field):
            load(raw, "m/config.json")


@pytest.mark.parametrize("change, field", [
    ({"text": {"num_key_value_heads": 3}}, "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
    ({"text": {"num_attention_heads": 3, "num_key_value_heads": None, "head_dim": None}},
     "hidden_size (64) is not a multiple of num_attention_heads (3) and no head_dim is given"),
    ({"text": {"head_dim": 15}}, "head_dim (15) is odd"),
    ({"vision": {"num_heads": 3}}, "vision_config.hidden_size (32) / num_heads (3) must be a whole head size"),
    ({"vision": {"num_heads": 16}}, "vision_config.hidden_size (32) / num_heads (16) must be a whole head size"),
    ({"vision": {"num_position_embeddings": 60}}, "num_position_embeddings (60) is not a square"),
    ({"vision": {"out_hidden_size": 32}}, "out_hidden_size (32) differs from text_config.hidden_size (64)"),
    ({"top": {"image_token_id": 640}}, "image_token_id is 640, not a token id below vocab_size (640)"),
    ({"top": {"vision_end_token_id": "4"}}, "vision_end_token_id is '4', not a token id"),
])
def test_shapes_the_model_cannot_have_are_refused_by_check_as_by_the_quantizer(change, field):
    """What check reads (load_checked_sizes, no transformers) refuses what the quantizer's load_config refuses of
    the model's shapes; the plan, which only counts, takes them."""
    raw = variant(TINY, change.get("text", {}), change.get("vision", {}))
    raw.update(change.get("top", {}))
    for load in (sizes.load_checked_sizes, family.load_config):
        with pytest.raises(CheckpointError, match=re.escape(field)):
            load(raw, "m/config.json")
    with pytest.raises(CheckpointError, match=re.escape(field)):
        Model(raw)
    sizes.load_sizes_config(raw)


def test_a_config_that_is_not_qwen3_vl_moe_is_refused():
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        sizes.load_sizes_config({"model_type": "llama"})
    with pytest.raises(CheckpointError, match="text_config must be a JSON object"):
        sizes.load_sizes_config({"model_type": "qwen3_vl_moe", "text_config": []})
