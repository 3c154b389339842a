"""Tiny model and calibration set builders: layout, shapes, determinism, offline tokenizer and processor files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, Qwen3MoeForCausalLM, Qwen3VLMoeForConditionalGeneration

from dist_quant.synthetic import (
    OUTLIER_CHANNELS,
    SPECIAL_TOKENS,
    draw_weight,
    expert_shapes,
    make_calibration_set,
    make_tiny_model,
    make_tiny_text_model,
    rewrite_expert_layout,
    train_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
GATE_UP = "model.language_model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.language_model.layers.0.mlp.experts.down_proj"


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory) -> Path:
    """Every non-default option at once, to keep the test set fast."""
    return make_tiny_model(
        tmp_path_factory.mktemp("variant"),
        num_layers=2,
        mlp_only_layers=(1,),
        vision_depth=2,
        dtype="bfloat16",
        shard_size="200KB",
        seed=1,
    )


def test_hub_layout_expert_shapes(hub_dir):
    tensors = read_tensors(hub_dir)
    assert tensors[GATE_UP].shape == (8, 64, 96)
    assert tensors[DOWN].shape == (8, 48, 64)
    assert "lm_head.weight" in tensors


def test_transposed_layout_holds_the_same_experts(hub_dir, tmp_path):
    transposed = read_tensors(make_tiny_model(tmp_path, layout="transposed"))
    hub = read_tensors(hub_dir)
    assert transposed[GATE_UP].shape == (8, 96, 64)
    assert transposed[DOWN].shape == (8, 64, 48)
    assert torch.equal(transposed[GATE_UP], hub[GATE_UP].transpose(1, 2))
    assert torch.equal(transposed[DOWN], hub[DOWN].transpose(1, 2))


def test_rewrite_restores_hub_layout_from_transposed(hub_dir, tmp_path):
    """What make_tiny_model does when transformers 5.x save_pretrained writes the transposed layout."""
    make_tiny_model(tmp_path, layout="transposed")
    rewrite_expert_layout(tmp_path, expert_shapes(8, 64, 48, "hub"))
    rewritten, hub = read_tensors(tmp_path), read_tensors(hub_dir)
    assert rewritten.keys() == hub.keys()
    assert all(torch.equal(rewritten[name], hub[name]) for name in hub)


def test_same_seed_same_weights_and_nontrivial_vectors(hub_dir, tmp_path):
    again = read_tensors(make_tiny_model(tmp_path))
    hub = read_tensors(hub_dir)
    assert all(torch.equal(again[name], hub[name]) for name in hub)
    norm = hub["model.language_model.layers.0.input_layernorm.weight"]
    bias = hub["model.visual.blocks.0.attn.qkv.bias"]
    assert 0.05 < norm.std() < 0.2 and abs(norm.mean() - 1) < 0.1
    assert bias.abs().max() > 0


@pytest.mark.parametrize("moe_intermediate_size", [32, 64])
def test_ambiguous_expert_shapes_are_refused(tmp_path, moe_intermediate_size):
    with pytest.raises(ValueError, match="ambiguous"):
        make_tiny_model(tmp_path, hidden_size=64, moe_intermediate_size=moe_intermediate_size)
    assert not any(tmp_path.iterdir())


def test_bad_layout_and_dtype_are_refused(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        make_tiny_model(tmp_path, layout="sideways")
    with pytest.raises(ValueError, match="dtype"):
        make_tiny_model(tmp_path, dtype="int8")


def test_config_token_ids_match_tokenizer(hub_dir):
    config = AutoConfig.from_pretrained(hub_dir)
    tokenizer = AutoTokenizer.from_pretrained(hub_dir)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.vocab_size == len(tokenizer)
    rope = config.text_config.rope_scaling
    assert sum(rope["mrope_section"]) == config.text_config.head_dim // 2 and rope["mrope_interleaved"]


def test_tokenizer_is_offline_byte_level_bpe_with_qwen_specials(hub_dir):
    tokenizer = AutoTokenizer.from_pretrained(hub_dir)
    assert 500 <= len(tokenizer) <= 1000
    for token in SPECIAL_TOKENS:
        assert tokenizer.tokenize(f"a{token}b")[1] == token
    text = "Describe the picture, ünïcode too!"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
                        "<|im_start|>assistant\n")


def test_preprocessor_config_keeps_images_small(hub_dir):
    config = json.loads((hub_dir / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "Qwen2VLImageProcessor"
    assert (config["patch_size"], config["temporal_patch_size"], config["merge_size"]) == (4, 2, 2)
    # transformers 4.57 saves max_pixels; 5.x saves the same limit as size.longest_edge
    assert config.get("max_pixels", config.get("size", {}).get("longest_edge")) <= 32 * 32


def test_variant_options(variant_dir):
    index = json.loads((variant_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    tensors = read_tensors(variant_dir)
    assert tensors.keys() == index["weight_map"].keys()
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert tensors[GATE_UP].shape == (8, 64, 96)
    assert "model.language_model.layers.1.mlp.gate_proj.weight" in tensors
    assert not any(name.startswith("model.language_model.layers.1.mlp.experts") for name in tensors)
    config = AutoConfig.from_pretrained(variant_dir)
    assert config.vision_config.deepstack_visual_indexes == [0, 1]


def test_model_loads_and_runs_text(variant_dir):
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(variant_dir).eval()
    input_ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    assert logits.shape == (1, 4, model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all() and logits.float().std() > 0.01


def test_calibration_set(tmp_path):
    index = make_calibration_set(tmp_path, num_images=5, seed=3)
    entries = [json.loads(line) for line in index.read_text().splitlines()]
    assert len(entries) == 5 and all(entry["text"] for entry in entries)
    assert {Path(entry["image"]).suffix for entry in entries} == {".png", ".jpg"}
    sizes = set()
    for entry in entries:
        with Image.open(tmp_path / entry["image"]) as image:
            sizes.add(image.size)
            low, high = image.convert("L").getextrema()
            assert high - low > 10
    assert len(sizes) > 1
    again = make_calibration_set(tmp_path / "again", num_images=5, seed=3)
    assert again.read_text() == index.read_text()
    assert (tmp_path / "again" / "img0.png").read_bytes() == (tmp_path / "img0.png").read_bytes()


def test_cli_writes_model_and_calibration_set(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/make_tiny_model.py"), str(tmp_path / "m"), "--layers", "2",
         "--experts", "4", "--deepstack", "0", "--calib-images", "2"],
        capture_output=True, text=True, env=env, check=True,
    )
    assert str(tmp_path / "m") in result.stdout and "index.jsonl" in result.stdout
    config = AutoConfig.from_pretrained(tmp_path / "m")
    assert config.text_config.num_hidden_layers == 2 and config.text_config.num_experts == 4
    assert len((tmp_path / "m" / "calib" / "index.jsonl").read_text().splitlines()) == 2


# --- the text-only Qwen3-MoE model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    return make_tiny_text_model(tmp_path_factory.mktemp("text"), mlp_only_layers=(1,), seed=2)


def test_text_model_stores_experts_per_expert_with_its_config(text_dir):
    tensors = read_tensors(text_dir)
    config = json.loads((text_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["norm_topk_prob"] is True and config["mlp_only_layers"] == [1]
    assert config.get("num_experts", config.get("num_local_experts")) == 8  # 5.x writes num_local_experts
    for e in range(8):
        assert tensors[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"].shape == (48, 64)
        assert tensors[f"model.layers.0.mlp.experts.{e}.up_proj.weight"].shape == (48, 64)
        assert tensors[f"model.layers.0.mlp.experts.{e}.down_proj.weight"].shape == (64, 48)
    assert tensors["model.layers.0.mlp.gate.weight"].shape == (8, 64)
    assert tensors["model.layers.1.mlp.gate_proj.weight"].shape == (96, 64)
    assert not any(".experts." in name for name in tensors if name.startswith("model.layers.1."))
    assert tensors["lm_head.weight"].shape == tensors["model.embed_tokens.weight"].shape == (len(train_tokenizer()), 64)
    assert not (text_dir / "preprocessor_config.json").exists()


def test_text_model_weights_are_drawn_by_their_saved_names(text_dir):
    """Every tensor is what its saved name draws (so transformers 4.57, which holds experts per expert, and 5.x,
    which fuses them in memory, write the same model), and a second build is the same."""
    tensors = read_tensors(text_dir)
    assert all(torch.equal(tensor, draw_weight(name, tuple(tensor.shape), 2)) for name, tensor in tensors.items())
    again = read_tensors(make_tiny_text_model(text_dir.parent / "again", mlp_only_layers=(1,), seed=2))
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_text_model_loads_and_runs_and_renders_text_turns(text_dir):
    model = Qwen3MoeForCausalLM.from_pretrained(text_dir).eval()
    input_ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    assert torch.isfinite(logits).all() and logits.float().std() > 0.01
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_text_model_outliers_are_planted_in_its_decoder(tmp_path):
    tensors = read_tensors(make_tiny_text_model(tmp_path, num_layers=2, outliers=30, dtype="bfloat16"))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    norm = tensors["model.layers.1.input_layernorm.weight"].float()
    assert (norm.abs() > 10).sum() == OUTLIER_CHANNELS
    with pytest.raises(ValueError, match="dtype"):
        make_tiny_text_model(tmp_path / "bad", dtype="int8")
