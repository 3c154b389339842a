"""What outlier suppression and the int4 rounding buy: W8A8, W4A8 (int4 experts) and MXFP8, each with plain min/max
and with QuaRot + iterative smoothing, on tiny Qwen3-VL-MoE models with planted activation outliers, measured with
`dist-quant eval` on the calibration images and on held-out ones no method was fitted on.

    python scripts/accuracy.py --seeds 0 1 2 --outliers 0 20 50
    python scripts/accuracy.py --seeds 0 1 2 --outliers 0 20 50 --moe-intermediate 128 \
        --only "plain W8A8" "QuaRot + smooth + W8A8" "plain MXFP8" "QuaRot + smooth + MXFP8" \
        "QuaRot + smooth + W4A8 gptq (the preset)"

MXFP8 experts need an even number of 32-input blocks, and the tiny models' hidden size is 64: the second command
builds the models with an expert width of 128 (the first keeps the tiny models' 48, the table W4A8 changes are
compared on).

Recipes: plain W8A8 is tests/data/plain_w8a8.yaml, suppressed W8A8 the bundled qwen3_vl_moe_w8a8.yaml; each W4A8 row
is one of them with the experts' weights int4 per channel by ``minmax``, ``ssz`` (msModelSlim's scale search, 50
iterations) or ``gptq`` (ssz's scales, GPTQ's rounding on each expert's routed tokens); "the preset" is
qwen3_vl_moe_w4a8.yaml as ``--quant_type w4a8`` runs it (gptq, ssz at 10 iterations). MXFP8 is msModelSlim's
recipe as ``--quant_type w8a8_mxfp8`` runs it (QuaRot, smoothing) and its linear_quant alone (plain). After the full
table, the held-out KL / W8A8's per model and over all of them (median, worst, how many within 2x).

    .venv5/bin/python scripts/accuracy.py --family qwen3_5_moe --seeds 0 1 2 --outliers 0 20 50

runs the same on tiny Qwen3.5-MoE models (transformers 5; hybrid layers, shared expert, fp32), whose recipes have no
QuaRot or smoothing: msModelSlim's W8A8 (the 397B preset, vision blocks included) against W4A8 experts by min/max,
by msModelSlim's own W4A8 recipe unchanged (ssz, 50 iterations) and by the W4A8 preset (GPTQ after 10 ssz
iterations).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
from pathlib import Path

import yaml

from dist_quant.calib.dataset import load_samples
from dist_quant.calib.inputs import build_model_inputs
from dist_quant.cli import main as dist_quant
from dist_quant.evaluate import evaluate
from dist_quant.presets import find_preset
from dist_quant.recipe import DEFAULT_RECIPE
from dist_quant.synthetic import make_calibration_set, make_tiny_model, make_tiny_qwen3_5_model

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
PLAIN = DATA / "plain_w8a8.yaml"
MXFP8 = find_preset("Qwen3-VL-30B-A3B", "w8a8_mxfp8").recipe
MSMODELSLIM_W4A8_QWEN3_5 = DATA / "msmodelslim" / "qwen3.5_moe_w4a8.yaml"  # ssz, as msModelSlim ships it


def int4_experts(recipe: Path, method: str, out: Path) -> Path:
    """``recipe`` with the routed experts' weights int4 per channel by ``method`` (W4A8_DYNAMIC), written to out."""
    doc = yaml.safe_load(recipe.read_text())
    experts = next(step for step in doc["spec"]["process"]
                   if any("experts" in pattern for pattern in step.get("include", [])))
    experts["qconfig"] = copy.deepcopy(experts["qconfig"])  # YAML anchors share it with other processors
    experts["qconfig"]["weight"].update(dtype="int4", method=method)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def without_transforms(recipe: Path, out: Path) -> Path:
    """``recipe`` with its linear_quant processors only (no QuaRot, no smoothing), written to out."""
    doc = yaml.safe_load(recipe.read_text())
    doc["spec"]["process"] = [step for step in doc["spec"]["process"] if step["type"] == "linear_quant"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


HELD_OUT_IMAGES = 24  # with 6, one model's GPTQ ratio swung 2.0x-5.7x between near-identical variants
PRESET = "QuaRot + smooth + W4A8 gptq (the preset)"


QWEN3_5_W8A8 = "W8A8 (msModelSlim's recipe)"


def recipes(family: str, out: Path) -> dict[str, Path]:
    """The recipes compared on ``family``'s models, by row name."""
    if family == "qwen3_5_moe":
        return {QWEN3_5_W8A8: find_preset("Qwen3.5-397B-A17B", "w8a8").recipe,
                "W4A8 minmax": int4_experts(MSMODELSLIM_W4A8_QWEN3_5, "minmax", out / "qwen3_5_w4a8_minmax.yaml"),
                "W4A8 ssz (msModelSlim's recipe)": MSMODELSLIM_W4A8_QWEN3_5,
                "W4A8 gptq (the preset)": find_preset("Qwen3.5-397B-A17B", "w4a8").recipe}
    return {"plain W8A8": PLAIN, "QuaRot + smooth + W8A8": DEFAULT_RECIPE,
            "plain W4A8 minmax": int4_experts(PLAIN, "minmax", out / "plain_w4a8_minmax.yaml"),
            "plain W4A8 ssz": int4_experts(PLAIN, "ssz", out / "plain_w4a8_ssz.yaml"),
            "plain W4A8 gptq": int4_experts(PLAIN, "gptq", out / "plain_w4a8_gptq.yaml"),
            "QuaRot + smooth + W4A8 minmax": int4_experts(DEFAULT_RECIPE, "minmax", out / "w4a8_minmax.yaml"),
            "QuaRot + smooth + W4A8 ssz": int4_experts(DEFAULT_RECIPE, "ssz", out / "w4a8_ssz.yaml"),
            PRESET: find_preset("Qwen3-VL-30B-A3B", "w4a8").recipe,
            "plain MXFP8": without_transforms(MXFP8, out / "plain_mxfp8.yaml"), "QuaRot + smooth + MXFP8": MXFP8}


def baseline(name: str) -> str:
    """The W8A8 row a recipe's KL is divided by: the one with the same transforms."""
    if name.startswith("W4A8") or name == QWEN3_5_W8A8:
        return QWEN3_5_W8A8
    return "QuaRot + smooth + W8A8" if name.startswith("QuaRot") else "plain W8A8"


def make_model(family: str, out: Path, scale: float, seed: int, moe_intermediate: int) -> Path:
    if family == "qwen3_5_moe":
        return make_tiny_qwen3_5_model(out, outliers=scale, seed=seed, moe_intermediate_size=moe_intermediate,
                                       dtype="float32")
    return make_tiny_model(out, outliers=scale, seed=seed, moe_intermediate_size=moe_intermediate)


def summary(held_ratios: dict[str, dict[str, float]]) -> None:
    """Held-out KL / W8A8's per model (seed/scale) and over all of them, one row per W4A8 and MXFP8 recipe."""
    models = list(next(iter(held_ratios.values())))
    print("\n| recipe | " + " | ".join(models) + " | median | worst | within 2x |")
    print("|---" * (len(models) + 4) + "|")
    for name, ratios in held_ratios.items():
        values = list(ratios.values())
        print(f"| {name} | " + " | ".join(f"{r:.2f}x" for r in values) + f" | {statistics.median(values):.2f}x "
              f"| {max(values):.2f}x | {sum(r <= 2 for r in values)} of {len(values)} |")


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("qwen3_vl_moe", "qwen3_5_moe"), default="qwen3_vl_moe",
                        help="the tiny models' family (qwen3_5_moe needs transformers 5)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/accuracy"))
    parser.add_argument("--outliers", type=float, nargs="+", default=[0, 20, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="the tiny models' seeds (one model each)")
    parser.add_argument("--only", nargs="+", help="recipe names to run (default: all)")
    parser.add_argument("--moe-intermediate", type=int, default=48, help="the models' expert width (MXFP8: 128)")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    calib = make_calibration_set(args.out / "calib", num_images=6)
    heldout = make_calibration_set(args.out / "heldout", num_images=HELD_OUT_IMAGES, seed=1)  # not fitted on
    chosen = {k: v for k, v in recipes(args.family, args.out / "recipes").items() if not args.only or k in args.only}
    print("| model seed | outlier scale | recipe | KL(float ‖ quant) | KL / W8A8's | top-1 agreement "
          "| last layer cosine | last layer rel. error | held-out KL | held-out KL / W8A8's | checkpoint MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    held_ratios: dict[str, dict[str, float]] = {}
    for seed, scale in ((seed, scale) for seed in args.seeds for scale in args.outliers):
        model = make_model(args.family, args.out / f"model_{seed}_{scale:g}", scale, seed, args.moe_intermediate)
        inputs = build_model_inputs(model, load_samples(calib))
        other = build_model_inputs(model, load_samples(heldout))
        kl, held = {}, {}
        for name, recipe in chosen.items():
            save = args.out / f"q_{seed}_{scale:g}_{recipe.stem}"
            dist_quant(["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu",
                        "--dataset", str(calib), "--config_path", str(recipe), "--quiet"])
            report = evaluate(str(model), str(save), inputs)
            kl[name], held[name] = report.kl_divergence, evaluate(str(model), str(save), other).kl_divergence
            group = baseline(name)
            ratio = f"{kl[name] / kl[group]:.2f}x" if group in kl else ""
            held_ratio = f"{held[name] / held[group]:.2f}x" if group in held else ""
            if ("W4A8" in name or "MXFP8" in name) and group in held:
                held_ratios.setdefault(name, {})[f"{seed}/{scale:g}"] = held[name] / held[group]
            last = report.rows[-1]
            print(f"| {seed} | {scale:g} | {name} | {kl[name]:.2e} | {ratio} | {100 * report.top1_agreement:.1f}% "
                  f"| {last.cosine:.5f} | {last.rel_error:.4f} | {held[name]:.2e} | {held_ratio} "
                  f"| {weight_bytes(save) / 2**20:.2f} |", flush=True)
        if "plain W8A8" in kl and "QuaRot + smooth + W8A8" in kl:
            print("|  |  | W8A8 plain / suppressed (calibration KL) "
                  f"| {kl['plain W8A8'] / kl['QuaRot + smooth + W8A8']:.1f}x | | | | | | | |")
    if held_ratios:
        summary(held_ratios)


if __name__ == "__main__":
    main()
