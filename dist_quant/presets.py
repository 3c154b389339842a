"""One-click presets: ``--model_type`` + ``--quant_type`` pick a bundled recipe, as msModelSlim's quick quantization
does (``msmodelslim quant --model_type Qwen3-VL-235B-A22B --quant_type w8a8``). Without ``--model_type`` the model
folder's config.json picks it: the preset of its family (config.json's ``model_type``) and shape.

Light on purpose: the command line reads the presets to build its parser, before it knows whether the command needs
torch, so this module imports nothing but the standard library and the project's errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dist_quant.errors import RecipeError

BUNDLED_CONFIGS = Path(__file__).parent / "configs"  # the recipes shipped in the package (recipe.py reads it here)


@dataclass(frozen=True)
class Preset:
    model_type: str  # what --model_type names: a released model, as msModelSlim names it
    quant_type: str
    recipe: Path
    note: str
    family: str  # config.json's model_type of that model: which models the recipe is written for


PRESETS = (
    Preset("Qwen3-VL-235B-A22B", "w8a8", BUNDLED_CONFIGS / "qwen3_vl_moe_w8a8.yaml",
           "msModelSlim's verified recipe for this model: QuaRot, iterative smoothing, static W8A8 attention and "
           "vision, dynamic W8A8 experts", "qwen3_vl_moe"),
    Preset("Qwen3-VL-30B-A3B", "w8a8", BUNDLED_CONFIGS / "qwen3_vl_moe_w8a8.yaml",
           "the same recipe; msModelSlim has not verified its accuracy on 30B-A3B: check with dist-quant eval",
           "qwen3_vl_moe"),
    Preset("Qwen3-VL-235B-A22B", "w4a8", BUNDLED_CONFIGS / "qwen3_vl_moe_w4a8.yaml",
           "the W8A8 recipe with int4 experts (W4A8_DYNAMIC, GPTQ rounding), about half the size; no msModelSlim "
           "recipe to compare with: check with dist-quant eval", "qwen3_vl_moe"),
    Preset("Qwen3-VL-30B-A3B", "w4a8", BUNDLED_CONFIGS / "qwen3_vl_moe_w4a8.yaml",
           "the same W4A8 recipe: check with dist-quant eval", "qwen3_vl_moe"),
    Preset("Qwen3-VL-235B-A22B", "w8a8_mxfp8", BUNDLED_CONFIGS / "qwen3_vl_moe_w8a8_mxfp8.yaml",
           "msModelSlim's verified MXFP8 recipe for Ascend 950 / Atlas 350: QuaRot, iterative smoothing, every "
           "linear but the router and a few vision ones in W8A8_MXFP8, experts included", "qwen3_vl_moe"),
    Preset("Qwen3-VL-30B-A3B", "w8a8_mxfp8", BUNDLED_CONFIGS / "qwen3_vl_moe_w8a8_mxfp8.yaml",
           "the same recipe, which msModelSlim verified on 30B-A3B too", "qwen3_vl_moe"),
    Preset("Qwen3-235B-A22B", "w8a8", BUNDLED_CONFIGS / "qwen3_moe_w8a8.yaml",
           "the Qwen3-VL-MoE W8A8 recipe for the text-only model (QuaRot, iterative smoothing, static W8A8 attention, "
           "dynamic W8A8 experts); msModelSlim's W8A8 for Qwen3-MoE is a legacy v0 recipe: check with dist-quant "
           "eval", "qwen3_moe"),
    Preset("Qwen3-30B-A3B", "w8a8", BUNDLED_CONFIGS / "qwen3_moe_w8a8.yaml",
           "the same recipe: check with dist-quant eval", "qwen3_moe"),
    Preset("Qwen3-235B-A22B", "w4a8", BUNDLED_CONFIGS / "qwen3_moe_w4a8.yaml",
           "the W8A8 recipe with int4 experts (W4A8_DYNAMIC, GPTQ rounding); msModelSlim's own W4A8 recipe uses "
           "flex_smooth_quant, which dist-quant does not implement: check with dist-quant eval", "qwen3_moe"),
    Preset("Qwen3-30B-A3B", "w4a8", BUNDLED_CONFIGS / "qwen3_moe_w4a8.yaml",
           "the same W4A8 recipe: check with dist-quant eval", "qwen3_moe"),
)
PRESETS += tuple(
    Preset(model, quant, BUNDLED_CONFIGS / recipe, note, "qwen3_5_moe") for model, quant, recipe, note in (
        ("Qwen3.5-397B-A17B", "w8a8", "qwen3_5_moe_w8a8_vision.yaml",
         "msModelSlim's verified recipe for this model: dynamic W8A8 full-attention q/k/v, vision blocks and routed "
         "experts; linear attention, shared expert and MTP head in float"),
        ("Qwen3.5-122B-A10B", "w8a8", "qwen3_5_moe_w8a8.yaml",
         "msModelSlim's recipe listed for this model: dynamic W8A8 full-attention q/k/v and routed experts"),
        ("Qwen3.5-35B-A3B", "w8a8", "qwen3_5_moe_w8a8.yaml",
         "msModelSlim's recipe listed for this model: dynamic W8A8 full-attention q/k/v and routed experts"),
        ("Qwen3.5-397B-A17B", "w4a8", "qwen3_5_moe_w4a8.yaml",
         "msModelSlim's W4A8 recipe for this model with GPTQ rounding of the int4 experts (it uses ssz alone): "
         "check with dist-quant eval"),
        ("Qwen3.5-122B-A10B", "w4a8", "qwen3_5_moe_w4a8.yaml", "the same W4A8 recipe: check with dist-quant eval"),
        ("Qwen3.5-35B-A3B", "w4a8", "qwen3_5_moe_w4a8.yaml", "the same W4A8 recipe: check with dist-quant eval"),
    ))

# msModelSlim's own names for models with presets (its config.ini): --model_type takes them too
MODEL_TYPE_ALIASES = {"Qwen3-235B": "Qwen3-235B-A22B", "Qwen3-30B": "Qwen3-30B-A3B"}
MODEL_TYPES = tuple(dict.fromkeys(p.model_type for p in PRESETS)) + tuple(MODEL_TYPE_ALIASES)
QUANT_TYPES = tuple(dict.fromkeys(p.quant_type for p in PRESETS))
# when config.json cannot tell (unreadable, or a family without presets): msModelSlim's quick quantization example
DEFAULT_MODEL_TYPE, DEFAULT_QUANT_TYPE = "Qwen3-VL-235B-A22B", "w8a8"
# (layers, routed experts, hidden size) of each model type, from its config.json (shared/reference-configs)
MODEL_SHAPES = {"Qwen3-VL-235B-A22B": (94, 128, 4096), "Qwen3-VL-30B-A3B": (48, 128, 2048),
                "Qwen3-235B-A22B": (94, 128, 4096), "Qwen3-30B-A3B": (48, 128, 2048),
                # Qwen3.5: the 397B reference config; 122B and 35B from their published dimensions (unverified here)
                "Qwen3.5-397B-A17B": (60, 512, 4096), "Qwen3.5-122B-A10B": (48, 256, 3072),
                "Qwen3.5-35B-A3B": (40, 256, 2048)}


def _shape(config: dict) -> tuple:
    """(layers, routed experts, hidden size) of a config.json: its text_config's, or its own for a text-only model."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    experts = text.get("num_experts", text.get("num_local_experts"))  # transformers 5 writes the latter
    return text.get("num_hidden_layers"), experts, text.get("hidden_size")


def _family_of(model_type: str) -> str:
    return {p.model_type: p.family for p in PRESETS}[MODEL_TYPE_ALIASES.get(model_type, model_type)]


def default_model_type(config: object) -> str:
    """The --model_type of a model folder's config.json: the preset of its family (``model_type``) and shape, else
    the family's first preset (a fine-tune or a size without a preset of its own: the family's recipe applies to
    all), else DEFAULT_MODEL_TYPE (the command's own reading of config.json then says what is wrong with it)."""
    family = config.get("model_type") if isinstance(config, dict) else None
    candidates = [p.model_type for p in PRESETS if p.family == family]
    if not candidates:
        return DEFAULT_MODEL_TYPE
    return next((m for m in candidates if MODEL_SHAPES[m] == _shape(config)), candidates[0])


def model_type_mismatch(model_type: str, config: dict) -> str | None:
    """Why config.json is not the model ``--model_type`` names (another family, or its layers, experts or width
    differ), or None: the preset's recipe still applies to any model of the family, but a mistyped model folder
    deserves a word."""
    family = _family_of(model_type)
    if config.get("model_type") != family:
        return (f"--model_type {model_type} names a {family} model, but this config.json's model_type is "
                f"{config.get('model_type')!r}: its preset recipe is used as it is; leave --model_type out to use "
                "the preset for this model")
    found, expected = _shape(config), MODEL_SHAPES[MODEL_TYPE_ALIASES.get(model_type, model_type)]
    if found == expected:
        return None
    return (f"--model_type {model_type} names a model of {expected[0]} layers, {expected[1]} experts and hidden size "
            f"{expected[2]}, but this config.json has {found[0]}, {found[1]} and {found[2]}: its preset recipe is "
            "used as it is")


def find_preset(model_type: str, quant_type: str) -> Preset:
    """The preset of a --model_type (or msModelSlim's alias for it) and --quant_type (any case)."""
    model_type = MODEL_TYPE_ALIASES.get(model_type, model_type)
    for preset in PRESETS:
        if preset.model_type == model_type and preset.quant_type == quant_type.lower():
            return preset
    available = ", ".join(f"{p.model_type}/{p.quant_type}" for p in PRESETS)
    raise RecipeError(f"no preset for --model_type {model_type} --quant_type {quant_type}; available: {available} "
                      "(or pass your own recipe with --config_path)")


def format_presets() -> str:
    lines = [f"{'model_type':<20} {'quant_type':<10} recipe"]
    for preset in PRESETS:
        lines.append(f"{preset.model_type:<20} {preset.quant_type:<10} {preset.recipe.name}")
        lines.append(f"{'':<31} {preset.note}")
    lines.append("--model_type also takes msModelSlim's names: " + ", ".join(
        f"{alias} ({name})" for alias, name in MODEL_TYPE_ALIASES.items()))
    lines.append("without --model_type, the preset of the model folder's config.json (its model_type and shape)")
    return "\n".join(lines)
