"""One routed expert's W4A8 rounding at real width, phase by phase: seconds and GFLOP/s per phase.

What the W4A8 preset (ssz scales, GPTQ rounding) does for each expert with routed tokens, on random weights and
inputs: the Gram matrices and their act order, the damped factorisations, ssz, and GPTQ's
column loops for gate and up (sharing one factor) and down. The figures go to docs/benchmarks.md ("W4A8
rounding"); FLOPs count a multiply-add as two.

    python scripts/bench_expert.py --width 235b --tokens 177 --threads 1 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import time

WIDTHS = {"235b": (4096, 1536), "30b": (2048, 768)}  # hidden, moe_intermediate


def best_of(repeat: int, work):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", choices=WIDTHS, default="235b")
    parser.add_argument("--tokens", type=int, default=177, help="routed calibration tokens (the bench's median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs per phase")
    parser.add_argument("--steps", type=int, default=10, help="ssz iterations (the preset's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from dist_quant.algorithms.gptq import DAMP, Hessian, gptq_codes, upper_factor
    from dist_quant.algorithms.int4 import QMAX4, QMIN4, ssz_scale

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden, inter = WIDTHS[args.width]
    device = torch.device(args.device)
    x = torch.randn(args.tokens, hidden, device=device) * (1 + 4 * torch.rand(hidden, device=device))
    h = torch.randn(args.tokens, inter, device=device)
    weights = {"gate": torch.randn(inter, hidden, device=device) * 0.02,
               "up": torch.randn(inter, hidden, device=device) * 0.02,
               "down": torch.randn(hidden, inter, device=device) * 0.02}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(work):
        def run():
            result = work()
            sync()
            return result
        return best_of(args.repeat, run)

    rows = {}
    t, (hin, hdown) = timed(lambda: (Hessian.of_inputs(x), Hessian.of_inputs(h)))
    rows["gram + act order"] = (t, 2 * args.tokens * (hidden ** 2 + inter ** 2))
    t, _ = timed(lambda: (upper_factor(hin.gram, DAMP), upper_factor(hdown.gram, DAMP)))
    rows["damped factorisation"] = (t, (hidden ** 3 + inter ** 3) / 3)
    hin.prepared(DAMP), hdown.prepared(DAMP)
    t, scales = timed(lambda: {k: ssz_scale(w, args.steps) for k, w in weights.items()})
    rows[f"ssz ({args.steps} iterations)"] = (t, 3 * 2 * args.steps * sum(w.numel() for w in weights.values()))
    hessians = {"gate": hin, "up": hin, "down": hdown}
    t, _ = timed(lambda: {k: gptq_codes(w, scales[k], hessians[k], QMIN4, QMAX4) for k, w in weights.items()})
    rows["gptq column loops"] = (t, sum(w.shape[0] * w.shape[1] ** 2 for w in weights.values()))
    total = sum(t for t, _ in rows.values())
    print(f"one {args.width} expert, {args.tokens} tokens, {args.threads} thread(s), {device}, best of {args.repeat}")
    for name, (t, flops) in rows.items():
        print(f"  {name:30s} {t:7.3f} s  {flops / 1e9:7.1f} GFLOP  {flops / 1e9 / t:6.1f} GFLOP/s")
    print(f"  {'total':30s} {total:7.3f} s")
    print(json.dumps({name: round(t, 4) for name, (t, _) in rows.items()} | {"total": round(total, 4)}))


if __name__ == "__main__":
    main()
