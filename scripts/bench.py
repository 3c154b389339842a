"""Benchmark of distributed quantization on an expert-dominated synthetic Qwen3-VL-MoE (~1.5 GB bf16, 128 experts).

Quantizes the same model with 1 and 2 Ray workers against a Ray runtime that is already running (its start-up is
timed separately), and reports wall time, speedup, peak RSS per process and bytes read per worker, next to the
input/output floor (reading the source once plus writing an output of the same size).

    python scripts/bench.py --out /tmp/bench --layers 5 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIDTH = ["--hidden", "1024", "--heads", "16", "--kv-heads", "4", "--head-dim", "64", "--experts", "128",
         "--top-k", "8", "--moe-intermediate", "384", "--vision-depth", "4", "--vision-hidden", "128",
         "--vision-heads", "4", "--dtype", "bfloat16", "--calib-images", "0"]
MiB = 2**20


def build_model(out: Path, layers: int) -> Path:
    """In a child process, so this (driver) process's peak RSS is only what quantization needs."""
    subprocess.run([sys.executable, str(HERE / "make_tiny_model.py"), str(out), "--layers", str(layers), *WIDTH],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def io_floor(model: Path, scratch: Path) -> tuple[float, int]:
    """Seconds to read every source byte once and write the same number of bytes (page cache warm, fsync'd)."""
    files = sorted(model.glob("*.safetensors"))
    total = 0
    start = time.perf_counter()
    with open(scratch, "wb") as out:
        for path in files:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(16 * MiB), b""):
                    total += len(block)
                    out.write(block)
        out.flush()
        os.fsync(out.fileno())
    seconds = time.perf_counter() - start
    scratch.unlink()
    return seconds, total


def dense_vs_sparse(model: Path, tokens: int, repeats: int = 3) -> tuple[float, float]:
    """Seconds for one MoE layer's calibration forward: each expert on its routed tokens only (dist-quant) against
    every expert on every token (msModelSlim), same weights, same routing, ``tokens`` tokens."""
    import torch

    from dist_quant.checkpoint.reader import CheckpointReader
    from dist_quant.models import qwen3_vl_moe as qvl

    reader = CheckpointReader(model)
    config = qvl.load_config(reader.config)
    tc = config.text_config
    experts = qvl.read_experts(reader, config, 0, 0, tc.num_experts, torch.float32)
    act = qvl.activation(config)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, tc.hidden_size, generator=generator)
    ids, weights = qvl.route(torch.randn(tokens, tc.num_experts, generator=generator), tc.num_experts_per_tok,
                             x.dtype)
    dense_weights = torch.zeros(tokens, tc.num_experts).scatter_(1, ids, weights)

    def sparse():
        return qvl.expert_group_forward(x, ids, weights, [qvl.float_expert(*e, act) for e in experts], 0)

    def dense():
        out = torch.zeros_like(x)
        for e, (gate, up, down) in enumerate(experts):
            out += ((act(x @ gate.T) * (x @ up.T)) @ down.T) * dense_weights[:, e:e + 1]
        return out

    timings = []
    for fn in (sparse, dense):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        timings.append((time.perf_counter() - start) / repeats)
    torch.testing.assert_close(sparse(), dense(), rtol=1e-4, atol=1e-5)  # the same result, by both routes
    return timings[0], timings[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--part-file-size", type=float, default=0.25,
                        help="GB per part file (default 0.25: the ~0.75 GB output gets several parts, as a 220 GB "
                             "output does at the recipe's 4 GB)")
    parser.add_argument("--unpinned", action="store_true",
                        help="do not pin each actor to one core (by default each actor stands for one card: one core)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens for the dense-vs-sparse comparison")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    model = build_model(args.out / "model", args.layers)

    import ray

    import dataclasses

    from dist_quant.recipe import load_recipe
    from dist_quant.runtime.driver import BUNDLED_DATASETS
    from dist_quant.runtime.ray_driver import quantize_distributed

    floor_seconds, source_bytes = io_floor(model, args.out / "floor.bin")
    from dist_quant.runtime.local import quantize_single_card

    single = quantize_single_card(str(model), str(args.out / "quant_single"), load_recipe(), progress=False,
                                  dataset=str(BUNDLED_DATASETS / "calibImages"))
    shutil.rmtree(args.out / "quant_single")
    start = time.perf_counter()
    ray.init(num_cpus=max(args.workers), include_dashboard=False, logging_level="warning")
    ray_seconds = time.perf_counter() - start
    results = []
    for workers in args.workers:
        save = args.out / f"quant_{workers}"
        recipe = dataclasses.replace(load_recipe(), part_file_size_gb=args.part_file_size)
        summary = quantize_distributed(str(model), str(save), recipe, workers=workers, progress=False,
                                       dataset=str(BUNDLED_DATASETS / "calibImages"), overwrite=True,
                                       threads_per_actor=None if args.unpinned else 1)
        results.append({"workers": workers, "seconds": summary.seconds, "bytes_written": summary.bytes_written,
                        "actor_start_s": summary.actor_start_seconds, "sweep_s": summary.sweep_seconds,
                        "assemble_s": summary.assemble_seconds, "phases": summary.phases,
                        "actors": [{"units": a.units, "busy_s": round(a.busy_seconds, 2), "read_bytes": a.bytes_read,
                                    "peak_rss_mib": round(a.peak_rss / MiB)} for a in summary.actors]})
        shutil.rmtree(save)
    ray.shutdown()
    driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"model: {args.layers} layers x 128 experts, source {source_bytes / MiB:.0f} MiB bf16")
    print(f"single card, no Ray (--workers 1): {single.seconds:.1f} s = {single.seconds / floor_seconds:.2f} x the I/O "
          f"floor; phases (summed): " + ", ".join(f"{k} {v:.1f} s" for k, v in single.phases.items()))
    print(f"I/O floor (read source once + write as much): {floor_seconds:.1f} s; Ray start-up: {ray_seconds:.1f} s")
    print("| workers | wall time | actors start | sweep | assemble | speedup (wall / w/o actor start) "
          "| x I/O floor | read per worker (MiB) | peak RSS per actor (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = results[0]
    for r in results:
        reads = ", ".join(f"{a['read_bytes'] / MiB:.0f}" for a in r["actors"])
        rss = ", ".join(str(a["peak_rss_mib"]) for a in r["actors"])
        warm = r["seconds"] - r["actor_start_s"]
        print(f"| {r['workers']} | {r['seconds']:.1f} s | {r['actor_start_s']:.1f} s | {r['sweep_s']:.1f} s "
              f"| {r['assemble_s']:.1f} s | {base['seconds'] / r['seconds']:.2f}x / "
              f"{(base['seconds'] - base['actor_start_s']) / warm:.2f}x | {r['seconds'] / floor_seconds:.1f} "
              f"| {reads} | {rss} |")
        print("    phases (summed over actors): " + ", ".join(f"{k} {v:.1f} s" for k, v in r["phases"].items()))
        total_read = sum(a["read_bytes"] for a in r["actors"])
        print(f"    bytes read in total: {total_read / MiB:.0f} MiB ({total_read / source_bytes:.3f} x source)")
    print(f"driver peak RSS: {driver_rss:.0f} MiB")
    for tokens in (args.tokens, 16384):
        sparse_s, dense_s = dense_vs_sparse(model, tokens)
        print(f"MoE layer calibration forward, {tokens} tokens, 128 experts top-8: routed tokens only {sparse_s:.2f} s, "
              f"every expert on every token (msModelSlim) {dense_s:.2f} s: {dense_s / sparse_s:.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"source_bytes": source_bytes, "floor_seconds": floor_seconds,
                                         "single_card_seconds": single.seconds, "single_card_phases": single.phases,
                                         "ray_seconds": ray_seconds, "driver_rss_mib": driver_rss,
                                         "runs": results}, indent=2))


if __name__ == "__main__":
    main()
