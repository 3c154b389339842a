"""Peak memory of single-card quantization against model depth: it must be bounded by a few layers, not the model.

Builds synthetic Qwen3-VL-MoE models of the same width with different numbers of layers and quantizes each in a fresh
process (`dist-quant quant --device cpu`), reporting that process's peak RSS, wall time and sizes.

    python scripts/bench_memory.py --layers 4 16 --out /tmp/bench_memory

This parent process imports nothing heavy on purpose: Linux charges a child's peak RSS with its parent's RSS at fork
time, so a parent that had built the model in memory would inflate every figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIDTH = ["--hidden", "512", "--heads", "8", "--kv-heads", "4", "--head-dim", "64", "--experts", "32", "--top-k", "4",
         "--moe-intermediate", "384", "--vision-depth", "4", "--vision-hidden", "128", "--vision-heads", "4",
         "--dtype", "bfloat16"]


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_memory"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    print("| layers | source (bf16) | output | peak RSS | wall time |")
    print("|---|---|---|---|---|")
    for layers in args.layers:
        model = args.out / f"model_{layers}"
        subprocess.run([sys.executable, str(HERE / "make_tiny_model.py"), str(model), "--layers", str(layers), *WIDTH],
                       check=True, stdout=subprocess.DEVNULL)
        save = args.out / f"quant_{layers}"
        rss, seconds = run_measured([sys.executable, "-m", "dist_quant.cli", "quant", "--model_path", str(model),
                                     "--save_path", str(save), "--device", "cpu", "--quiet",
                                     "--dataset", str(model / "calib" / "index.jsonl")])
        print(f"| {layers} | {folder_bytes(model) / 2**20:.0f} MiB | {folder_bytes(save) / 2**20:.0f} MiB "
              f"| {rss:.0f} MiB | {seconds:.1f} s |", flush=True)
        shutil.rmtree(model)
        shutil.rmtree(save)


if __name__ == "__main__":
    main()
