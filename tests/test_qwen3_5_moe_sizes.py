"""Qwen3.5-MoE's torch-free half on any transformers: the sizes of the 397B reference config (layer kinds, shared
expert, MTP head) against numbers written out here from its dimensions, ``dist-quant plan`` on it for 16 and 32
cards, the check's TP rules for the linear attention's heads; on transformers 4.57 the family module says it needs
transformers 5; on 5.x the closed-form shapes are those of transformers' own modules on the meta device."""

import json
import math
from pathlib import Path

import pytest

from dist_quant.errors import CheckpointError
from dist_quant.models import qwen3_5_moe_sizes as sizes

REFERENCE = Path(__file__).parent / "data" / "Qwen3.5-397B-A17B.config.json"


@pytest.fixture(scope="module")
def config():
    return sizes.load_checked_sizes(json.loads(REFERENCE.read_text()))


def test_the_397b_reference_sizes(config):
    """H 4096, 32 heads of 256 (query and gate), 2 kv heads; linear attention 16 key and 64 value heads of 128;
    512 experts of 1024, a shared expert of 1024; one MTP layer."""
    tc = config.text_config
    assert tc.layer_types.count("full_attention") == 15 and tc.layer_types[3] == "full_attention"
    full, linear = sizes.layer_linears(config, 3), sizes.layer_linears(config, 0)
    prefix = "model.language_model.layers"
    assert full[f"{prefix}.3.self_attn.q_proj"] == 2 * 32 * 256 * 4096
    assert full[f"{prefix}.3.self_attn.o_proj"] == 4096 * 32 * 256
    assert linear[f"{prefix}.0.linear_attn.in_proj_qkv"] == (2 * 16 * 128 + 64 * 128) * 4096
    assert linear[f"{prefix}.0.linear_attn.in_proj_b"] == 64 * 4096
    assert linear[f"{prefix}.0.mlp.shared_expert.down_proj"] == 4096 * 1024
    assert linear[f"{prefix}.0.mlp.shared_expert_gate"] == 4096
    assert sizes.expert_param_count(config) == 3 * 1024 * 4096
    conv = (2 * 16 * 128 + 64 * 128) * 4
    norms = 2 * 4096 + 128 + 2 * 64  # layer norms, the gated norm, A_log and dt_bias
    assert sizes.layer_param_count(config, 0) == sum(linear.values()) + conv + norms
    mtp = sizes.mtp_tensors(config)
    assert mtp["mtp.fc.weight"] == (4096, 8192) and "mtp.layers.0.mlp.experts.511.down_proj.weight" in mtp
    assert sizes.carried_param_count(config) == sum(math.prod(s) for s in mtp.values())
    total = (sizes.vision_param_count(config) + sum(sizes.layer_param_count(config, i) for i in range(60))
             + 60 * 512 * sizes.expert_param_count(config) + 2 * 248320 * 4096 + 4096
             + sizes.carried_param_count(config))
    assert 395e9 < total < 405e9  # "397B"


def test_tp_rules_count_the_linear_attention_heads(config):
    assert sizes.tp_errors(config, 16) == []
    assert sizes.tp_errors(config, 32) == ["text linear_num_key_heads 16", "vision num_heads 16"]


@pytest.mark.parametrize("workers", [16, 32])
def test_plan_on_the_reference_config(tmp_path, capsys, workers):
    from dist_quant.cli import main

    (tmp_path / "config.json").write_text(REFERENCE.read_text())
    assert main(["plan", "--model_path", str(tmp_path), "--workers", str(workers), "--model_type",
                 "Qwen3.5-397B-A17B", "--quant_type", "w8a8"]) == 0
    out = capsys.readouterr().out
    assert "60 layers, 512 experts (top-10)" in out and f"units: {workers} images, 1 vision, 1 embed, 60 layer" in out
    assert "qwen3_5_moe_w8a8_vision.yaml" in out and "projected wall time" in out


def test_the_family_needs_transformers_5():
    import transformers

    from dist_quant.models.family import family_for

    if int(transformers.__version__.split(".")[0]) >= 5:
        assert family_for("qwen3_5_moe").NAME == "Qwen3.5-MoE"
    else:
        with pytest.raises(CheckpointError, match=r"Qwen3.5-MoE needs transformers 5 .* pip install"):
            family_for("qwen3_5_moe")


def test_closed_form_shapes_are_transformers_own():
    """Every tensor of a small config (4 layers: 3 linear, 1 full attention) as transformers 5 builds it on the meta
    device, experts fused there, per expert in the closed form."""
    pytest.importorskip("transformers.models.qwen3_5_moe", reason="transformers 5")
    import torch
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    raw = {"model_type": "qwen3_5_moe", "tie_word_embeddings": False,
           "text_config": dict(vocab_size=248320, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=32, linear_key_head_dim=16, linear_value_head_dim=16,
                               linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=48,
                               shared_expert_intermediate_size=96, num_experts=4, num_experts_per_tok=2),
           "vision_config": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                 patch_size=4, num_position_embeddings=16)}
    with torch.device("meta"):
        model = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(**{k: v for k, v in raw.items()
                                                                       if k != "model_type"}))
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    closed = sizes.checkpoint_tensors(sizes.load_checked_sizes(raw), fused=True)
    fused = {k for k, shape in closed.items() if shape is None}
    assert set(built) == set(closed)
    assert {k: s for k, s in built.items() if k not in fused} == {k: s for k, s in closed.items() if k not in fused}


@pytest.mark.parametrize("interval", [0, True, "4", -1])
def test_a_bad_full_attention_interval_is_refused(interval):
    raw = json.loads(REFERENCE.read_text())
    del raw["text_config"]["layer_types"]
    raw["text_config"]["full_attention_interval"] = interval
    with pytest.raises(CheckpointError, match="layer_types must name .* positive full_attention_interval"):
        sizes.load_sizes_config(raw)
    raw["text_config"]["full_attention_interval"] = 4
    assert sizes.load_sizes_config(raw).text_config.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]
