"""The rope fields of a Qwen3-VL-MoE text config read in one way (dist_quant/models/config_fields.py), whichever
transformers wrote the config.json (4.57: rope_theta beside rope_scaling; 5.x: one rope_parameters) and whichever
reads it. The reference is what transformers' own rotary embedding computes with on the running version. Also: the
tiny test model's config.json names a transformers that writes its expert layout."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import transformers
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as hf
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeConfig

from dist_quant import synthetic
from dist_quant.errors import CheckpointError
from dist_quant.models import qwen3_vl_moe as family
from dist_quant.models.config_fields import legacy_rope, rope_section, rope_settings, rope_theta, rope_theta_field

TRANSFORMERS_5 = not transformers.__version__.startswith("4.")
THETA, SECTION = 250_000.0, [6, 1, 1]  # neither version's default: a reader that falls back to one is caught
TEXT = {"vocab_size": 640, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts_per_tok": 2,
        "moe_intermediate_size": 48, "mlp_only_layers": [], "model_type": "qwen3_vl_moe_text"}
VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 4,
          "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 64, "num_position_embeddings": 64,
          "deepstack_visual_indexes": [0]}
TOKENS = {"image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 4}
# config.json as transformers 4.57.1 writes it (save_pretrained of dist_quant/synthetic.py's model) ...
CONFIG_457 = {"model_type": "qwen3_vl_moe", "transformers_version": "4.57.1", **TOKENS,
              "text_config": {**TEXT, "num_experts": 8, "rope_theta": THETA,
                              "rope_scaling": {"rope_type": "default", "mrope_section": SECTION,
                                               "mrope_interleaved": True}},
              "vision_config": {**VISION, "model_type": "qwen3_vl_moe"}}
# ... and as 5.x writes the same model: the rope settings in one rope_parameters, num_experts as num_local_experts
CONFIG_5 = {"model_type": "qwen3_vl_moe", "transformers_version": "5.25.0", **TOKENS,
            "text_config": {**TEXT, "num_local_experts": 8,
                            "rope_parameters": {"rope_type": "default", "mrope_section": SECTION,
                                                "mrope_interleaved": True, "rope_theta": THETA}},
            "vision_config": {**VISION, "model_type": "qwen3_vl_moe_vision",
                              "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}}}


def computed_with(text_config) -> tuple[torch.Tensor, list[int]]:
    """(inverse frequencies, mrope section) that transformers' own text rotary embedding computes with."""
    rotary = hf.Qwen3VLMoeTextRotaryEmbedding(config=text_config)
    return rotary.inv_freq, list(rotary.mrope_section)


def inv_freq(theta: float, head_dim: int = TEXT["head_dim"]) -> torch.Tensor:
    """RoPE's inverse frequencies of a base, by the formula: base ** (-2i / head_dim)."""
    return torch.tensor([theta ** (-2 * i / head_dim) for i in range(head_dim // 2)], dtype=torch.float32)


def assert_computes_with(text_config, theta, section) -> None:
    freqs, used = computed_with(text_config)
    assert torch.allclose(freqs, inv_freq(theta), rtol=1e-6, atol=0) and used == section


def native_config(theta: float, section: list[int]) -> Qwen3VLMoeConfig:
    """A config built in the running transformers' own spelling."""
    rope = {"rope_type": "default", "mrope_section": section, "mrope_interleaved": True}
    text = {**TEXT, "num_experts": 8}
    if TRANSFORMERS_5:
        text["rope_parameters"] = {**rope, "rope_theta": theta}
    else:
        text.update(rope_theta=theta, rope_scaling=rope)
    return Qwen3VLMoeConfig(text_config=text, vision_config=VISION, **TOKENS)


@pytest.mark.parametrize("build", ["native", "legacy kwargs", "default"])
def test_a_config_transformers_builds_is_read_as_its_rotary_computes(build):
    if build == "native":
        config = native_config(THETA, SECTION)
    elif build == "legacy kwargs":  # 4.57's keyword names: what dist_quant/synthetic.py passes, on either version
        config = Qwen3VLMoeConfig(text_config=copy.deepcopy(CONFIG_457["text_config"]), vision_config=VISION,
                                  **TOKENS)  # 5.x writes rope_theta into the rope_scaling dict it is given
    else:  # transformers' own defaults, which differ: rope_theta 5e6 in 4.57, 5e5 in 5.x
        config = Qwen3VLMoeConfig(text_config={**TEXT, "rope_scaling": {"rope_type": "default",
                                                                         "mrope_section": SECTION}})
    theta, section = rope_theta(config.text_config), rope_section(config.text_config)
    assert_computes_with(config.text_config, theta, section)
    if build != "default":
        assert (theta, section) == (THETA, SECTION)
    else:
        assert section == SECTION and theta == (500_000.0 if TRANSFORMERS_5 else 5_000_000.0)
    written = config.to_dict()["text_config"]  # what save_pretrained writes on this version
    assert (rope_theta(written), rope_section(written)) == (theta, section)
    assert rope_settings(written)[0] == ("rope_parameters" if TRANSFORMERS_5 else "rope_scaling")


@pytest.mark.parametrize("raw", [CONFIG_457, CONFIG_5], ids=["written by 4.57", "written by 5.x"])
def test_config_json_of_either_version_is_read_alike(raw):
    """The raw dict and the config load_config builds from it on this version agree with the rotary embedding."""
    assert rope_theta(raw["text_config"]) == THETA and rope_section(raw["text_config"]) == SECTION
    before = copy.deepcopy(raw)
    config = family.load_config(raw)
    assert raw == before  # the caller's dict is left alone (5.x's from_dict writes into what it is given)
    assert_computes_with(config.text_config, THETA, SECTION)
    assert rope_theta(config.text_config) == THETA and rope_section(config.text_config) == SECTION
    assert config.text_config.num_experts == 8  # 5.x's num_local_experts, read by 4.57 too
    tensors = family.expected_tensors(config)
    assert tensors == family.expected_tensors(family.load_config(copy.deepcopy(CONFIG_457)))


def test_the_two_spellings_name_their_fields():
    text_457, text_5 = CONFIG_457["text_config"], CONFIG_5["text_config"]
    assert rope_settings(text_457) == ("rope_scaling", text_457["rope_scaling"])
    assert rope_settings(text_5) == ("rope_parameters", text_5["rope_parameters"])
    assert (rope_theta_field(text_457), rope_theta_field(text_5)) == ("rope_theta", "rope_parameters.rope_theta")
    assert rope_settings({}) == ("rope_scaling", None) and rope_section({}) is None and rope_theta({}) is None
    assert rope_section({"rope_parameters": {"rope_type": "default"}}) == [24, 20, 20]  # transformers' default
    # both, different: both versions of transformers compute with rope_scaling (5.x drops rope_parameters)
    both = {"rope_scaling": {"mrope_section": [1, 1, 6]}, "rope_parameters": {"mrope_section": [6, 1, 1]}}
    assert rope_section(both) == [1, 1, 6] and legacy_rope(both) is both


def test_legacy_rope_writes_4_57_s_spelling():
    assert legacy_rope(CONFIG_5["text_config"]) == {
        **TEXT, "num_local_experts": 8, "rope_theta": THETA,
        "rope_scaling": {"rope_type": "default", "mrope_section": SECTION, "mrope_interleaved": True}}
    assert "rope_parameters" in CONFIG_5["text_config"]  # a copy: the caller's dict is left alone
    assert legacy_rope(CONFIG_457["text_config"]) is CONFIG_457["text_config"]
    broken = {"rope_parameters": "fast"}
    assert legacy_rope(broken) is broken


@pytest.mark.parametrize("raw, edit, message", [
    (CONFIG_457, lambda t: t.update(rope_theta=-1), "text_config.rope_theta is -1, not a positive number"),
    (CONFIG_5, lambda t: t["rope_parameters"].update(rope_theta=-1),
     "text_config.rope_parameters.rope_theta is -1, not a positive number"),
    (CONFIG_457, lambda t: t["rope_scaling"].update(mrope_section=[4, 4, 4]),
     "text_config.rope_scaling.mrope_section is [4, 4, 4]; it must be 3 non-negative integers that add up to "
     "head_dim / 2 = 8"),
    (CONFIG_5, lambda t: t["rope_parameters"].update(mrope_section=[4, 4, 4]),
     "text_config.rope_parameters.mrope_section is [4, 4, 4]"),
])
def test_a_broken_rope_field_is_named_as_the_file_spells_it(raw, edit, message):
    raw = copy.deepcopy(raw)
    edit(raw["text_config"])
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        family.load_config(raw, "m/config.json")


def test_config_fields_import_no_torch_and_no_transformers():
    code = ("import sys, dist_quant.models.config_fields; "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_the_reference_tells_the_bases_apart():
    """The reference itself: the rotary embedding of one base is not that of another (5.x's default against
    4.57's, as a config read with the wrong default would compute)."""
    assert_computes_with(native_config(THETA, SECTION).text_config, THETA, SECTION)
    with pytest.raises(AssertionError):
        assert_computes_with(native_config(500_000.0, SECTION).text_config, 5_000_000.0, SECTION)


@pytest.mark.parametrize("layout, writer", [("hub", "4."), ("transposed", "5.")])
def test_a_tiny_model_names_a_transformers_that_writes_its_expert_layout(tmp_path, layout, writer):
    """Readers trust config.json's transformers_version where the expert shapes cannot tell the layouts apart, so
    the tiny model's must fit its layout, whichever transformers saved it."""
    model = synthetic.make_tiny_model(tmp_path, num_layers=1, vision_depth=1, deepstack=(0,), layout=layout)
    written = json.loads((model / "config.json").read_text())["transformers_version"]
    assert written.startswith(writer)
    if written.startswith(transformers.__version__.split(".")[0] + "."):
        assert written == transformers.__version__  # as save_pretrained wrote it
