"""The closed-form sizes of plan and check (each family's sizes module, read from config.json without torch) against
the modules transformers builds for the same config on the meta device: every tensor with its shape, every parameter
count and every linear, by name and in order, for the reference configs, a tiny one and configs with odd sizes,
attention biases, dense-MLP layers and other deepstack lists (none included), for Qwen3-VL-MoE and Qwen3-MoE."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf_text
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as hf

from dist_quant.check.model import Model
from dist_quant.errors import CheckpointError
from dist_quant.models import qwen3_moe as text_family
from dist_quant.models import qwen3_moe_sizes as text_sizes
from dist_quant.models import qwen3_vl_moe as family
from dist_quant.models import qwen3_vl_moe_sizes as sizes
from dist_quant.models.family import family_for, sizes_for

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

TINY_TEXT = {  # dist_quant/synthetic.py's make_tiny_text_model defaults
    "model_type": "qwen3_moe", "vocab_size": 640, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 48, "mlp_only_layers": [], "norm_topk_prob": True, "rope_theta": 1000000.0,
}


def variant(base: dict, text: dict = (), vision: dict = ()) -> dict:
    raw = copy.deepcopy(base)
    raw["text_config"].update(text)
    raw["vision_config"].update(vision)
    return raw


def text_variant(base: dict, fields: dict = (), drop: tuple = ()) -> dict:
    raw = {key: value for key, value in copy.deepcopy(base).items() if key not in drop}
    raw.update(fields)
    return raw


def transformers_5_spelling(raw: dict) -> dict:
    """A qwen3_moe config.json as transformers 5.x writes it: the rope fields in rope_parameters, num_experts as
    num_local_experts, dtype for torch_dtype."""
    raw = text_variant(raw, drop=("rope_theta", "rope_scaling", "num_experts", "torch_dtype"))
    raw.update(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, dtype="bfloat16",
               num_local_experts=TINY_TEXT["num_experts"])
    return raw


CONFIGS = {
    "qwen3_vl_moe": {
        "tiny": TINY,
        "30B": reference_config("Qwen3-VL-30B-A3B"),
        "235B": reference_config("Qwen3-VL-235B-A22B"),
        # odd widths, a head size that is not hidden / heads, attention biases, MHA, 3 input channels by default,
        # a 3x3 merge, no deepstack
        "odd": variant(TINY, {"hidden_size": 72, "intermediate_size": 100, "moe_intermediate_size": 40,
                              "num_attention_heads": 3, "head_dim": 20, "num_key_value_heads": 3,
                              "attention_bias": True, "num_experts": 5, "num_experts_per_tok": 3, "vocab_size": 777,
                              "rope_scaling": {"mrope_section": [6, 2, 2], "rope_type": "default"}},
                       {"hidden_size": 36, "num_heads": 3, "intermediate_size": 50, "patch_size": 3,
                        "out_hidden_size": 72, "spatial_merge_size": 3, "temporal_patch_size": 1,
                        "num_position_embeddings": 49, "deepstack_visual_indexes": [], "in_channels": 1, "depth": 3}),
        # dense-MLP layers: listed ones and every other layer (decoder_sparse_step 2); head_dim from hidden / heads
        "dense": variant(TINY, {"mlp_only_layers": [0, 3], "decoder_sparse_step": 2, "num_hidden_layers": 6,
                                "head_dim": None},
                         {"deepstack_visual_indexes": [3, 1]}),
        # deepstack from every block, more than the text layers
        "deepstack": variant(TINY, {"num_hidden_layers": 2},
                             {"depth": 5, "deepstack_visual_indexes": [0, 1, 2, 3, 4]}),
    },
    "qwen3_moe": {
        "tiny": TINY_TEXT,
        "30B": reference_config("Qwen3-30B-A3B"),
        "235B": reference_config("Qwen3-235B-A22B-Instruct-2507"),
        # odd widths, no head_dim (hidden / heads), MHA, attention biases
        "odd": text_variant(TINY_TEXT, {"hidden_size": 72, "intermediate_size": 100, "moe_intermediate_size": 40,
                                        "num_attention_heads": 3, "num_key_value_heads": 3, "attention_bias": True,
                                        "num_experts": 5, "num_experts_per_tok": 3, "vocab_size": 777},
                            drop=("head_dim",)),
        # dense-MLP layers: listed ones and every other layer (decoder_sparse_step 2)
        "dense": text_variant(TINY_TEXT, {"mlp_only_layers": [0, 3], "decoder_sparse_step": 2,
                                          "num_hidden_layers": 6}),
        "transformers5": transformers_5_spelling(TINY_TEXT),
    },
}
CASES = [(model_type, name) for model_type, configs in CONFIGS.items() for name in sorted(configs)]
MODEL_CLASSES = {"qwen3_vl_moe": hf.Qwen3VLMoeForConditionalGeneration, "qwen3_moe": hf_text.Qwen3MoeForCausalLM}
LAYER_CLASSES = {"qwen3_vl_moe": hf.Qwen3VLMoeTextDecoderLayer, "qwen3_moe": hf_text.Qwen3MoeDecoderLayer}
MOE_BLOCKS = {"qwen3_vl_moe": hf.Qwen3VLMoeTextSparseMoeBlock, "qwen3_moe": hf_text.Qwen3MoeSparseMoeBlock}


def numel(module: nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


def linears(module: nn.Module, prefix: str) -> list[tuple[str, int]]:
    """The module's linears: nn.Linear, and transformers 5's router (``mlp.gate``, a top-k router module holding the
    linear's weight)."""
    return [(f"{prefix}.{name}", m.weight.numel()) for name, m in module.named_modules()
            if isinstance(m, nn.Linear) or type(m).__name__.endswith("TopKRouter")]


def per_expert(state: dict[str, tuple]) -> dict[str, tuple]:
    """A state dict's shapes with fused expert tensors (transformers 5 holds Qwen3-MoE's experts as
    ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] in memory) as save_pretrained writes them: per expert,
    nn.Linear [out, in]."""
    shapes = {}
    for key, shape in state.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            shapes.update({f"{prefix}{e}.{proj}.weight": (shape[1] // 2, shape[2])
                           for e in range(shape[0]) for proj in ("gate_proj", "up_proj")})
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            shapes.update({f"{prefix}{e}.down_proj.weight": shape[1:] for e in range(shape[0])})
        else:
            shapes[key] = shape
    return shapes


def meta_model_tensors(model_type: str, hf_config) -> dict:
    """The reference: every tensor of the whole model transformers builds on the meta device, with its shape: for
    Qwen3-VL-MoE None for the fused experts (their orientation depends on the transformers version that wrote them),
    for Qwen3-MoE per expert, as saved."""
    with torch.device("meta"):
        model = MODEL_CLASSES[model_type]._from_config(hf_config)
    state = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    if model_type == "qwen3_vl_moe":
        return {key: None if ".mlp.experts." in key else shape for key, shape in state.items()}
    return per_expert(state)


def expert_module_shapes(experts: nn.Module, hidden: int) -> tuple[tuple[int, int], ...]:
    """(gate, up, down) nn.Linear shapes of one expert of transformers' experts module: per-expert MLPs (Qwen3-MoE,
    4.57) or fused tensors, [H, 2I] and [I, H] (applied as x @ W) or [2I, H] and [H, I] (applied as a linear)."""
    if isinstance(experts, nn.ModuleList):
        return tuple(tuple(getattr(experts[0], proj).weight.shape) for proj in ("gate_proj", "up_proj", "down_proj"))
    gate_up, down = tuple(experts.gate_up_proj.shape[1:]), tuple(experts.down_proj.shape[1:])
    if gate_up[0] == hidden:
        gate_up, down = gate_up[::-1], down[::-1]
    return ((gate_up[0] // 2, gate_up[1]),) * 2 + (down,)


@pytest.mark.parametrize("model_type, name", CASES)
def test_closed_form_tensors_are_those_of_the_model_transformers_builds(model_type, name):
    raw, family_module, sizes_module = CONFIGS[model_type][name], family_for(model_type), sizes_for(model_type)
    if model_type == "qwen3_moe" and name in ("30B", "235B"):
        # 4.57 builds every expert as modules: 36096 of them on meta take a minute; 4 layers hold every shape
        raw = text_variant(raw, {"num_hidden_layers": 4})
    hf_config = family_module.load_config(raw)
    reference = meta_model_tensors(model_type, hf_config)
    for config in (sizes_module.load_sizes_config(raw), sizes_module.load_checked_sizes(raw), hf_config):
        assert sizes_module.expected_tensors(config) == reference  # check, plan, quant
    assert family_module.expected_tensors is sizes_module.expected_tensors  # quant's check against the weights


@pytest.mark.parametrize("model_type, name", CASES)
def test_closed_form_counts_are_the_modules_transformers_builds(model_type, name):
    raw, family_module, sizes_module = CONFIGS[model_type][name], family_for(model_type), sizes_for(model_type)
    hf_config, plan_config = family_module.load_config(raw), sizes_module.load_sizes_config(raw)
    vision = None
    if model_type == "qwen3_vl_moe":
        with torch.device("meta"):
            vision = hf.Qwen3VLMoeVisionModel._from_config(hf_config.vision_config)
    for config in (plan_config, hf_config):  # the plan reads either
        assert sizes_module.vision_param_count(config) == (numel(vision) if vision else 0)
        assert list(sizes_module.vision_linears(config).items()) == \
            (linears(vision, sizes_module.VISUAL) if vision else [])
        tc = config.get_text_config()
        kinds, present = set(), {sizes_module.is_moe_layer(tc, i) for i in range(tc.num_hidden_layers)}
        for layer_idx in range(tc.num_hidden_layers):
            if kinds == present and name in ("30B", "235B"):
                break  # every layer of a kind is the same; the small configs check them all
            layer = family_module.meta_layer(hf_config, layer_idx)  # transformers' decoder layer, experts dropped
            kinds.add(sizes_module.is_moe_layer(tc, layer_idx))
            assert sizes_module.is_moe_layer(tc, layer_idx) == isinstance(layer.mlp, MOE_BLOCKS[model_type])
            assert sizes_module.layer_param_count(config, layer_idx) == numel(layer)
            assert list(sizes_module.layer_linears(config, layer_idx).items()) == \
                linears(layer, sizes_module.layer_prefix(layer_idx))
        moe_layer = next(i for i in range(tc.num_hidden_layers) if sizes_module.is_moe_layer(tc, i))
        with torch.device("meta"):
            experts = LAYER_CLASSES[model_type](hf_config.get_text_config(), moe_layer).mlp.experts
        assert sizes_module.expert_param_count(config) * tc.num_experts == numel(experts)
        assert sizes_module.expert_shapes(config) == expert_module_shapes(experts, tc.hidden_size)
        shapes = sizes_module.expert_shapes(config)
        assert sizes_module.expert_linears(config, 1, 2, 4) == {
            f"{sizes_module.layer_prefix(1)}.mlp.experts.{e}.{proj}": out * inputs
            for e in (2, 3) for proj, (out, inputs) in zip(sizes_module.EXPERT_PROJS, shapes)}


@pytest.mark.parametrize("model_type, name, published, digits", [
    ("qwen3_vl_moe", "235B", 235.67e9, 0.01e9), ("qwen3_vl_moe", "30B", 31.07e9, 0.01e9),  # the Hub's safetensors
    ("qwen3_moe", "235B", 235e9, 1e9), ("qwen3_moe", "30B", 30.5e9, 0.1e9),  # the model cards: 235B, 30.5B
])
def test_the_reference_models_have_their_public_parameter_counts(model_type, name, published, digits):
    """Vision, embeddings, layers, experts and head add up to the published totals (as rounded there)."""
    sizes_module = sizes_for(model_type)
    config = sizes_module.load_sizes_config(CONFIGS[model_type][name])
    tc = config.get_text_config()
    experts = sum(sizes_module.is_moe_layer(tc, i) for i in range(tc.num_hidden_layers)) * tc.num_experts
    total = (sizes_module.vision_param_count(config) + 2 * tc.vocab_size * tc.hidden_size + tc.hidden_size
             + sum(sizes_module.layer_param_count(config, i) for i in range(tc.num_hidden_layers))
             + experts * sizes_module.expert_param_count(config))
    assert abs(total - published) <= digits / 2


def test_a_transformers_5_config_reads_the_same_sizes():
    """transformers 5.x writes ``rope_parameters`` (no rope_theta / rope_scaling), ``dtype`` and
    ``num_local_experts``: the sizes do not read the rope fields, and the dtype and expert count are read from either
    key; check describes its model as for 4.57's config
    (transformers 4.57's config class, which check used to read it with, finds no rope_scaling there)."""
    reference = CONFIGS["qwen3_vl_moe"]["235B"]
    raw = copy.deepcopy(reference)
    text = raw["text_config"]
    rope = {**text.pop("rope_scaling"), "rope_theta": text.pop("rope_theta")}
    text["rope_parameters"] = rope
    text["dtype"] = text.pop("torch_dtype", "bfloat16")
    text["num_local_experts"] = text.pop("num_experts")
    assert sizes.load_sizes_config(raw) == sizes.load_sizes_config(reference)
    assert sizes.load_checked_sizes(raw) == sizes.load_sizes_config(reference)
    assert Model(raw).linears == Model(reference).linears
    assert sizes.source_bytes(raw) == 2
    assert sizes.source_bytes({"dtype": "float32"}) == 4


def test_float_dtype_names_are_torch_s():
    for name, size in sizes.FLOAT_DTYPE_BYTES.items():
        dtype = getattr(torch, name)
        assert dtype.is_floating_point and dtype.itemsize == size
        assert getattr(torch, sizes.source_dtype_name({"torch_dtype": name})) == dtype
    for not_a_float in ("int8", "bool", "complex64", "no_such_dtype", 16):
        assert sizes.source_dtype_name({"torch_dtype": not_a_float}) == "bfloat16"


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


# --- Qwen3-MoE's own config checks ------------------------------------------------------------------------------------

def test_a_transformers_5_qwen3_moe_config_builds_the_same_model_on_either_transformers():
    """transformers 5.x writes num_experts as num_local_experts and the rope base in rope_parameters; 4.57 reads
    neither by itself (it would build 128 experts and a 10000 rope base): the family reads both spellings."""
    spelled_5 = CONFIGS["qwen3_moe"]["transformers5"]
    assert text_sizes.load_sizes_config(spelled_5) == text_sizes.load_sizes_config(TINY_TEXT)
    for raw in (spelled_5, TINY_TEXT):
        config = text_family.load_config(raw)
        assert config.num_experts == 8
        assert text_family.build_text_rotary(config).inv_freq[1] == pytest.approx(1e6 ** (-2 / 16))
    assert text_sizes.source_bytes(spelled_5) == 2 and text_sizes.source_bytes(TINY_TEXT) == 2


def test_a_head_dim_left_out_is_hidden_over_heads_as_transformers_computes_it():
    raw = text_variant(TINY_TEXT, drop=("head_dim",))
    assert text_sizes.load_sizes_config(raw).head_dim == 16
    config = text_family.load_config(raw)
    assert config.head_dim == 16 == text_family.meta_layer(config, 0).self_attn.head_dim


@pytest.mark.parametrize("fields, field", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok is 9"),
    ({"num_hidden_layers": 10**12}, "num_hidden_layers is 1000000000000, more than"),
    ({"head_dim": None}, "head_dim is None, not a positive integer"),
    ({"num_key_value_heads": None}, "num_key_value_heads is None, not a positive integer"),
    ({"mlp_only_layers": [4]}, "mlp_only_layers must list"),
])
def test_qwen3_moe_sizes_the_plan_cannot_use_are_refused_like_the_quantizer_refuses_them(fields, field):
    raw = text_variant(TINY_TEXT, fields)
    for load in (text_sizes.load_sizes_config, text_family.load_config):
        with pytest.raises(CheckpointError, match=re.escape(field)):
            load(raw, "m/config.json")


@pytest.mark.parametrize("fields, field", [
    ({"num_key_value_heads": 3}, "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
    ({"head_dim": 15}, "head_dim (15) is odd"),
])
def test_qwen3_moe_shapes_the_model_cannot_have_are_refused_by_check_as_by_the_quantizer(fields, field):
    raw = text_variant(TINY_TEXT, fields)
    for load in (text_sizes.load_checked_sizes, text_family.load_config):
        with pytest.raises(CheckpointError, match=re.escape(field)):
            load(raw, "m/config.json")
    text_sizes.load_sizes_config(raw)


@pytest.mark.parametrize("fields, field", [
    ({"norm_topk_prob": False}, "norm_topk_prob is False"),
    ({}, "norm_topk_prob is False"),  # transformers' default
    ({"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window is true"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings is true"),
    ({"rope_theta": -1.0}, "rope_theta is -1.0, not a positive number"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps is -1e-06, not a positive number"),
    ({"hidden_act": "nope"}, "hidden_act is 'nope', not an activation"),
])
def test_what_qwen3_moe_computes_differently_is_refused(fields, field):
    """What the shared pieces do not compute as transformers would (routing without renormalisation, sliding-window
    attention, a head tied to the embeddings) and rope, norm and activation fields that break the model."""
    raw = text_variant(TINY_TEXT, fields, drop=() if fields else ("norm_topk_prob",))
    with pytest.raises(CheckpointError, match=re.escape(field)):
        text_family.load_config(raw, "m/config.json")


@pytest.mark.parametrize("model_type, tp, errors", [
    ("qwen3_moe", 4, []),
    ("qwen3_moe", 8, []),  # 4 kv heads replicated over 8 ranks
    ("qwen3_moe", 3, ["text num_attention_heads 32", "text num_key_value_heads 4 (neither divides the other)"]),
    ("qwen3_moe", 64, ["text num_attention_heads 32"]),
    ("qwen3_vl_moe", 8, []),
    ("qwen3_vl_moe", 32, ["vision num_heads 16"]),
    ("qwen3_vl_moe", 6, ["text num_attention_heads 32", "text num_key_value_heads 4 (neither divides the other)",
                         "vision num_heads 16"]),
])
def test_tp_errors_name_the_heads_a_tensor_parallel_size_cannot_split(model_type, tp, errors):
    """30B: 32 heads, 4 kv heads (and, for Qwen3-VL, 16 vision heads)."""
    sizes_module = sizes_for(model_type)
    for config in (sizes_module.load_sizes_config(CONFIGS[model_type]["30B"]),
                   family_for(model_type).load_config(CONFIGS[model_type]["30B"])):
        assert sizes_module.tp_errors(config, tp) == errors
