"""One-click presets: ``--model_type`` + ``--quant_type`` pick a bundled recipe, as msModelSlim's quick quantization
does (``msmodelslim quant --model_type Qwen3-VL-235B-A22B --quant_type w8a8``).

Light on purpose: the command line reads the presets to build its parser, before it knows whether the command needs
torch, so this module imports nothing but the standard library and the project's errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dist_quant.errors import RecipeError

BUNDLED_CONFIGS = Path(__file__).parent / "configs"  # the recipes shipped in the package (recipe.py reads it here)


@dataclass(frozen=True)
class Preset:
    model_type: str
    quant_type: str
    recipe: Path
    note: str


PRESETS = (
    Preset("Qwen3-VL-235B-A22B", "w8a8", BUNDLED_CONFIGS / "qwen3_vl_moe_w8a8.yaml",
           "msModelSlim's verified recipe for this model: QuaRot, iterative smoothing, static W8A8 attention and "
           "vision, dynamic W8A8 experts"),
    Preset("Qwen3-VL-30B-A3B", "w8a8", BUNDLED_CONFIGS / "qwen3_vl_moe_w8a8.yaml",
           "the same recipe; msModelSlim has not verified its accuracy on 30B-A3B: check with dist-quant eval"),
    Preset("Qwen3-VL-235B-A22B", "w4a8", BUNDLED_CONFIGS / "qwen3_vl_moe_w4a8.yaml",
           "the W8A8 recipe with int4 experts (W4A8_DYNAMIC, GPTQ rounding), about half the size; no msModelSlim "
           "recipe to compare with: check with dist-quant eval"),
    Preset("Qwen3-VL-30B-A3B", "w4a8", BUNDLED_CONFIGS / "qwen3_vl_moe_w4a8.yaml",
           "the same W4A8 recipe: check with dist-quant eval"),
)
MODEL_TYPES = tuple(dict.fromkeys(p.model_type for p in PRESETS))
QUANT_TYPES = tuple(dict.fromkeys(p.quant_type for p in PRESETS))
DEFAULT_MODEL_TYPE, DEFAULT_QUANT_TYPE = "Qwen3-VL-235B-A22B", "w8a8"  # msModelSlim's quick quantization example
# (layers, routed experts, hidden size) of each model type, from its released config.json (shared/reference-configs)
MODEL_SHAPES = {"Qwen3-VL-235B-A22B": (94, 128, 4096), "Qwen3-VL-30B-A3B": (48, 128, 2048)}


def model_type_mismatch(model_type: str, config: dict) -> str | None:
    """Why config.json is not the model ``--model_type`` names (its layers, experts or width differ), or None: the
    preset's recipe still applies to any model of the family, but a mistyped model folder deserves a word."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    found = tuple(text.get(k) for k in ("num_hidden_layers", "num_experts", "hidden_size"))
    expected = MODEL_SHAPES[model_type]
    if found == expected:
        return None
    return (f"--model_type {model_type} names a model of {expected[0]} layers, {expected[1]} experts and hidden size "
            f"{expected[2]}, but this config.json has {found[0]}, {found[1]} and {found[2]}: its preset recipe is "
            "used as it is")


def find_preset(model_type: str, quant_type: str) -> Preset:
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
    return "\n".join(lines)
