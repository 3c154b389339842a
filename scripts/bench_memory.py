"""Peak memory of single-card quantization against model depth: it must be bounded by a few layers, not the model.

Builds synthetic Qwen3-VL-MoE models of the same width with different numbers of layers, quantizes each in a fresh
process (`dist-quant quant --device cpu`) and reports the child's peak RSS (from wait4), wall time and sizes.

    python scripts/bench_memory.py --layers 4 16 --out /tmp/bench_memory
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dist_quant.synthetic import make_calibration_set, make_tiny_model

WIDTH = dict(hidden_size=512, num_heads=8, num_kv_heads=4, head_dim=64, num_experts=32, top_k=4,
             moe_intermediate_size=384, vision_depth=4, vision_hidden=128, vision_heads=4, dtype="bfloat16")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(model: Path, calib: Path, save: Path) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one quantization in a child process."""
    cmd = [sys.executable, "-m", "dist_quant.cli", "quant", "--model_path", str(model), "--save_path", str(save),
           "--device", "cpu", "--dataset", str(calib), "--quiet", "--overwrite"]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"quantization of {model} failed: {' '.join(cmd)}")
    return usage.ru_maxrss / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_memory"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    calib = make_calibration_set(args.out / "calib", num_images=4, size=(64, 48))
    print("| layers | source (bf16) | output | peak RSS | wall time |")
    print("|---|---|---|---|---|")
    for layers in args.layers:
        model = make_tiny_model(args.out / f"model_{layers}", num_layers=layers, **WIDTH)
        save = args.out / f"quant_{layers}"
        rss, seconds = measure(model, calib, save)
        print(f"| {layers} | {folder_bytes(model) / 2**20:.0f} MiB | {folder_bytes(save) / 2**20:.0f} MiB "
              f"| {rss:.0f} MiB | {seconds:.1f} s |", flush=True)
        shutil.rmtree(model)
        shutil.rmtree(save)


if __name__ == "__main__":
    main()
