"""What outlier suppression buys: plain min/max W8A8 against QuaRot + iterative smoothing + W8A8 (the bundled recipe)
on tiny Qwen3-VL-MoE models with planted activation outliers, measured with `dist-quant eval`.

    python scripts/accuracy.py --out /tmp/accuracy --outliers 0 20 50
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from dist_quant.calib.dataset import load_samples
from dist_quant.calib.inputs import build_model_inputs
from dist_quant.cli import main as dist_quant
from dist_quant.evaluate import evaluate
from dist_quant.recipe import DEFAULT_RECIPE
from dist_quant.synthetic import make_calibration_set, make_tiny_model

PLAIN = Path(__file__).resolve().parent.parent / "tests" / "data" / "plain_w8a8.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/accuracy"))
    parser.add_argument("--outliers", type=float, nargs="+", default=[0, 20, 50])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    calib = make_calibration_set(args.out / "calib", num_images=6)
    print("| outlier scale | recipe | KL(float ‖ quant) | top-1 agreement | last layer cosine | last layer rel. error |")
    print("|---|---|---|---|---|---|")
    for scale in args.outliers:
        model = make_tiny_model(args.out / f"model_{scale:g}", outliers=scale, seed=args.seed)
        inputs = build_model_inputs(model, load_samples(calib))
        kl = {}
        for name, recipe in (("plain W8A8", PLAIN), ("QuaRot + smooth + W8A8", DEFAULT_RECIPE)):
            save = args.out / f"q_{scale:g}_{recipe.stem}"
            dist_quant(["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu",
                        "--dataset", str(calib), "--config_path", str(recipe), "--quiet"])
            report = evaluate(str(model), str(save), inputs)
            kl[name] = report.kl_divergence
            last = report.rows[-1]
            print(f"| {scale:g} | {name} | {report.kl_divergence:.2e} | {100 * report.top1_agreement:.1f}% "
                  f"| {last.cosine:.5f} | {last.rel_error:.4f} |", flush=True)
        print(f"|  | ratio plain / suppressed | {kl['plain W8A8'] / kl['QuaRot + smooth + W8A8']:.1f}x | | | |")


if __name__ == "__main__":
    main()
