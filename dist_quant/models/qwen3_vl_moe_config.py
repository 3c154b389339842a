"""Qwen3-VL-MoE's config: read with transformers' own class on either transformers line, and checked on its own and
against the weights' headers (re-exported by the family module, models/qwen3_vl_moe.py).

The torch-free checks of the sizes (shared with ``plan`` and ``check``) are models/qwen3_vl_moe_sizes.py's; this
module adds what the quantizer computes with: rope, norms, activations, and the tensors the weights hold.
"""

from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from transformers.activations import ACT2FN
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeConfig, Qwen3VLMoeTextConfig

from dist_quant.checkpoint.reader import CheckpointReader
from dist_quant.errors import CheckpointError, reason, show
from dist_quant.models import moe_decoder
from dist_quant.models.config_fields import legacy_rope, rope_section, rope_settings, rope_theta, rope_theta_field
from dist_quant.models.decoder_sizes import legacy_expert_count
from dist_quant.models.qwen3_vl_moe_experts import expert_layout
from dist_quant.models.qwen3_vl_moe_sizes import (
    DECODER,
    MODEL_TYPE,
    NAME,
    TEXT,
    VISUAL,
    architecture_errors,
    expected_tensors,
    is_int,
    is_moe_layer,
    layer_prefix,
    load_checked_sizes,
    refuse,
    size_errors,
)

# transformers 5.x reads a text config's rope settings from rope_parameters and writes num_experts as
# num_local_experts; 4.57 knows only rope_theta/rope_scaling and num_experts
READS_ROPE_PARAMETERS = "rope_parameters" in inspect.signature(Qwen3VLMoeTextConfig.__init__).parameters


def load_config(raw: dict, source: str = "config.json") -> Qwen3VLMoeConfig:
    """The transformers config of a ``qwen3_vl_moe`` checkpoint, with SDPA attention (what HF uses on every device).

    Checked as the model code needs it (see :func:`check_config`); a config that only the weights can refute (fewer
    layers than they hold, another vocabulary) is caught by :func:`check_config_against_weights`. The sizes are
    checked before transformers builds anything, as ``dist-quant check`` checks them (5.x's config classes refuse a
    field of the wrong type with an error of their own). A config.json that transformers 5.x wrote
    (``rope_parameters``, ``num_local_experts``) is read by 4.57 in its own spelling (see
    :mod:`dist_quant.models.config_fields`), and 4.57's by 5.x, which converts it itself.
    """
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source} does not hold a JSON object; restore the file from the original model")
    model_type = raw.get("model_type")
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"{source}: model_type is {show(model_type)}; dist-quant supports {MODEL_TYPE!r} (Qwen3-VL-MoE) "
            "checkpoints"
        )
    for section in ("text_config", "vision_config"):
        if not isinstance(raw.get(section, {}), dict):
            raise CheckpointError(f"{source}: {section} must be a JSON object; restore the file from the original "
                                  "model")
    load_checked_sizes(raw, source)
    try:
        readable = copy.deepcopy(raw)  # 5.x's from_dict writes into the dicts it is given (rope_theta)
        if not READS_ROPE_PARAMETERS and isinstance(raw.get("text_config"), dict):
            readable["text_config"] = legacy_expert_count(legacy_rope(readable["text_config"]))
        config = Qwen3VLMoeConfig.from_dict(readable)
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError, RecursionError,
            StrictDataclassError) as error:
        raise CheckpointError(f"{source}: transformers cannot build a Qwen3-VL-MoE config from it "
                              f"({type(error).__name__}: {reason(error)}); restore the file from the original model") \
            from None
    check_config(config, raw, source)
    for cfg in (config, config.text_config, config.vision_config):
        cfg._attn_implementation = "sdpa"
    return config


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _config_errors(config: Qwen3VLMoeConfig, raw: dict) -> list[str]:
    """Every way the config breaks what the transformers modules (and this tool) assume, as 'field: problem': the
    sizes' (torch-free, shared with ``dist-quant check``), then the rope, norm and activation fields the quantizer
    computes with."""
    tc, vc = config.text_config, config.vision_config
    errors = size_errors(config)
    if errors:  # the checks below compute with the sizes
        return errors
    errors = architecture_errors(config, raw)
    # the values transformers computes with; the fields named as the file spells them (4.57's rope_scaling and
    # rope_theta, or 5.x's rope_parameters), whichever transformers reads it
    _, rope = rope_settings(tc)
    section, theta = rope_section(tc), rope_theta(tc)
    spelled = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    rope_field, theta_field = rope_settings(spelled)[0], rope_theta_field(spelled)
    if not isinstance(rope, dict):
        errors.append(f"text_config.{rope_field} is {show(rope)}; Qwen3-VL needs an object with its mrope_section")
    elif not (isinstance(section, list) and len(section) == 3 and all(is_int(n) and n >= 0 for n in section)
              and sum(section) == tc.head_dim // 2):
        errors.append(f"text_config.{rope_field}.mrope_section is {show(section)}; it must be 3 non-negative "
                      f"integers that add up to head_dim / 2 = {tc.head_dim // 2}")
    if not _is_number(theta) or theta <= 0:
        errors.append(f"text_config.{theta_field} is {show(theta)}, not a positive number")
    if not _is_number(tc.rms_norm_eps) or tc.rms_norm_eps <= 0:
        errors.append(f"text_config.rms_norm_eps is {show(tc.rms_norm_eps)}, not a positive number")
    if not isinstance(tc.hidden_act, str) or tc.hidden_act not in ACT2FN:
        errors.append(f"text_config.hidden_act is {show(tc.hidden_act)}, not an activation transformers knows")
    if not isinstance(vc.hidden_act, str) or vc.hidden_act not in ACT2FN:
        errors.append(f"vision_config.hidden_act is {show(vc.hidden_act)}, not an activation transformers "
                      "knows")
    return errors


def check_config(config: Qwen3VLMoeConfig, raw: dict, source: str = "config.json") -> None:
    """Refuse a config the model code would compute garbage from, crash on, or be swamped by; transformers itself
    checks almost nothing (top-k 0, or heads that do not divide the width, build a model)."""
    refuse(_config_errors(config, raw), source)


def check_config_against_weights(config: Qwen3VLMoeConfig, reader: CheckpointReader) -> None:
    """Refuse, from the safetensors headers alone (no weight is read, no module built), a config that does not
    describe these weights: layer, vision block and deepstack merger counts that differ from those the weights
    hold, any tensor the config does not expect or expects but is missing, any shape or dtype other than the
    config's (vocabulary and widths from embed_tokens and lm_head, num_experts from the expert tensors' first dim).

    Every driver calls it right after :func:`load_config` and before anything is sized by the config (the plan,
    the tokenizer, a worker): ``config.json`` may claim 10^12 layers, and the weights are the ground truth.
    """
    tc, vc = config.text_config, config.vision_config
    moe_decoder.check_counts(reader, [
        ("text_config.num_hidden_layers", tc.num_hidden_layers, f"{TEXT}.layers", "text layers"),
        ("vision_config.depth", vc.depth, f"{VISUAL}.blocks", "vision blocks"),
        ("len(vision_config.deepstack_visual_indexes)", len(vc.deepstack_visual_indexes),
         f"{VISUAL}.deepstack_merger_list", "deepstack mergers")])
    moe_decoder.check_tensors(reader, config, DECODER, expected_tensors(config), NAME)
    for layer_idx in range(tc.num_hidden_layers):
        if is_moe_layer(tc, layer_idx):
            expert_layout(reader, layer_prefix(layer_idx), num_experts=tc.num_experts, hidden=tc.hidden_size,
                          intermediate=tc.moe_intermediate_size)


def load_checked(model_path: str | Path) -> tuple[CheckpointReader, Qwen3VLMoeConfig]:
    """The reader and config of a float checkpoint, the config validated on its own and against the weights'
    headers: what a driver needs before it plans anything."""
    return moe_decoder.load_checked(model_path, load_config, check_config_against_weights)
