"""The demo: build a tiny random Qwen3-VL-MoE, quantize it on the bundled calibration photos, explain the result.

    python scripts/demo.py [--out demo_out]
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

from dist_quant.cli import main as dist_quant
from dist_quant.runtime.local import BUNDLED_DATASETS
from dist_quant.synthetic import make_tiny_model


def describe(save: Path) -> None:
    description = json.loads((save / "quant_model_description.json").read_text())
    kinds = Counter()
    for key, kind in description.items():
        if key.endswith((".weight",)) and isinstance(kind, str):
            module = key.rsplit(".", 1)[0]
            family = ("expert" if ".experts." in module else "vision" if module.startswith("model.visual") else
                      "text attention" if ".self_attn." in module and "norm" not in module else "other")
            kinds[(family, kind)] += 1
    print("\nWhat the checkpoint holds (modules by family and quant type):")
    for (family, kind), n in sorted(kinds.items()):
        print(f"  {family:<15} {kind:<13} {n:>4}")
    print(f"  model_quant_type: {description['model_quant_type']}")
    print("\nFiles:", ", ".join(sorted(p.name for p in save.iterdir())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    print("1/2 building a tiny random Qwen3-VL-MoE (4 layers, 8 experts, bf16) ...")
    model = make_tiny_model(args.out / "tiny-qwen3-vl-moe", dtype="bfloat16")
    dataset = BUNDLED_DATASETS / "calibImages"
    print(f"2/2 quantizing it to W8A8 on {len(list(dataset.glob('*.jpg')))} bundled calibration photos ...")
    save = args.out / "tiny-qwen3-vl-moe-w8a8"
    rc = dist_quant(["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu",
                     "--model_type", "Qwen3-VL-30B-A3B", "--quant_type", "w8a8", "--dataset", str(dataset)])
    if rc:
        raise SystemExit(rc)
    describe(save)
    print(f"\nServe it on Ascend with: vllm serve {save} --quantization ascend")


if __name__ == "__main__":
    main()
