"""Benchmark: the I/O floor, single card, and 1 and 2 workers on a running Ray, on one synthetic model.

    python scripts/bench.py --width 235b --layers 2            # Qwen3-VL-235B-A22B's exact widths (12.7 GiB)
    python scripts/bench.py --width 30b --layers 4             # Qwen3-VL-30B-A3B's widths
    python scripts/bench.py --width small --layers 5           # the small expert-dominated model of earlier figures
    python scripts/bench.py --width 235b --layers 2 --workers --recipe dist_quant/configs/qwen3_vl_moe_w4a8.yaml

Real widths come from tests/data/<model>.config.json with N decoder layers, written shard by shard in the Hub's
layout (scripts/wide_model.py); "small" is hidden 1024, 128 experts x 384 (scripts/make_tiny_model.py). Every run is
a separate process, so its peak RSS (VmHWM) and its bytes read and written (/proc/<pid>/io rchar/wchar, every byte
through read/write calls, page cache hits included) are its own; a sampler thread here reads them for each process
of a run (the single-card process; the driver and every Ray actor) until it exits. The Ray runtime is started once,
before the Ray runs (`ray start --head`), so actor runs join a running cluster, as a user's would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))  # this Python's, when no venv is active

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SMALL_WIDTH = ["--hidden", "1024", "--heads", "16", "--kv-heads", "4", "--head-dim", "64", "--experts", "128",
               "--top-k", "8", "--moe-intermediate", "384", "--vision-depth", "4", "--vision-hidden", "128",
               "--vision-heads", "4", "--dtype", "bfloat16", "--calib-images", "0"]
MiB, GiB = 2**20, 2**30
PHASES = ("read", "convert", "rotate", "smooth", "forward", "quantize", "serialise", "write", "merge")
CALIB_TOKENS = 2839  # the 12 bundled photos at the real processor's resolution (docs/benchmarks.md, "Real width")
HOST_PHASES = ("read", "convert", "serialise", "write", "merge")  # an accelerator does not shorten these


def build_model(out: Path, width: str, layers: int) -> Path:
    """In a child process, so no process measured here carries the model builder's memory."""
    if width == "small":
        command = [str(HERE / "make_tiny_model.py"), str(out), "--layers", str(layers), *SMALL_WIDTH]
    else:
        command = [str(HERE / "wide_model.py"), str(out), "--width", width, "--layers", str(layers)]
    subprocess.run([sys.executable, *command], check=True, stdout=subprocess.DEVNULL)
    return out


def model_plan(model: Path, workers: int, recipe: Optional[Path] = None):
    from dist_quant.models.family import load_checked
    from dist_quant.recipe import load_recipe
    from dist_quant.runtime.plan import build_plan
    raw = json.loads((model / "config.json").read_text())
    return build_plan(load_checked(model)[2], raw, workers, calib_tokens=CALIB_TOKENS, recipe=load_recipe(recipe))


def output_estimate(model: Path, recipe: Optional[Path] = None) -> int:
    return model_plan(model, 1, recipe).output_bytes


def io_floor(model: Path, scratch: Path, write_bytes: int) -> float:
    """Seconds to read every source byte once and write ``write_bytes`` (the checkpoint's size), fsync'd."""
    files = sorted(model.glob("*.safetensors"))
    start = time.perf_counter()
    written = 0
    with open(scratch, "wb") as out:
        for path in files:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(16 * MiB), b""):
                    if written < write_bytes:
                        out.write(block[:write_bytes - written])
                        written += min(len(block), write_bytes - written)
        out.flush()
        os.fsync(out.fileno())
    seconds = time.perf_counter() - start
    scratch.unlink()
    return seconds


# --- per-process figures ----------------------------------------------------------------------------------------

def _proc(pid: int) -> dict | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return None
    kib = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines()
           if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssShmem"))}
    if "VmHWM" not in kib:  # a process that is exiting (a zombie) has no memory figures any more
        return None
    return {"peak_rss": kib["VmHWM"], "rss": kib["VmRSS"], "anon": kib["RssAnon"], "shmem": kib["RssShmem"],
            "rchar": int(io["rchar"]), "wchar": int(io["wchar"]), "cmd": cmd[:80]}


class Sampler:
    """Peak RSS and I/O counters of the processes that match ``wanted(pid, cmdline)``, sampled until stopped, and
    each one's resident memory over time (epoch seconds, VmRSS, RssAnon, RssShmem: the shared part is mostly Ray's
    object store, mapped by the actors that write or read an object), so each unit's peak can be read off."""

    def __init__(self, wanted):
        self.wanted, self.seen, self.series, self._stop = wanted, {}, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            for entry in os.listdir("/proc"):
                if entry.isdigit() and (int(entry) in self.seen or self.wanted(int(entry))):
                    figures = _proc(int(entry))
                    if figures is not None:
                        self.seen[int(entry)] = figures
                        self.series.setdefault(int(entry), []).append(
                            (time.time(), figures["rss"], figures["anon"], figures["shmem"]))
            self._stop.wait(0.2)

    def stop(self) -> dict[int, dict]:
        self._stop.set()
        self._thread.join()
        return self.seen


def ray_actor(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::UnitRunner")
    except OSError:
        return False


def child_run(args: argparse.Namespace) -> None:
    """One quantization in this process (the parent measures it); writes its summary as JSON."""
    import dataclasses

    from dist_quant.recipe import load_recipe
    from dist_quant.runtime.driver import BUNDLED_DATASETS

    dataset = str(BUNDLED_DATASETS / "calibImages")
    timeline: list = []  # (actor, unit, started at, seconds, phases) of each unit

    def on_unit_done(report):
        timeline.append((report.actor, report.unit.name, report.started_at, report.seconds, report.phases))

    options = dict(progress=False, dataset=dataset, overwrite=True, compute_threads=args.compute_threads,
                   device=args.device)
    if args.child == "single":
        from dist_quant.runtime.local import quantize_single_card
        summary = quantize_single_card(str(args.model), str(args.save), load_recipe(args.recipe),
                                       on_unit_done=on_unit_done, **options)
    else:
        from dist_quant.runtime.ray_driver import quantize_distributed
        summary = quantize_distributed(str(args.model), str(args.save), load_recipe(args.recipe),
                                       workers=int(args.child), ray_address="auto",
                                       threads_per_actor=args.compute_threads, on_unit_done=on_unit_done, **options)
    out = {k: v for k, v in vars(summary).items() if isinstance(v, (int, float, str, dict))}
    out["timeline"] = timeline
    out["actors"] = [{**dataclasses.asdict(a), "node_ids": [], "pids": sorted(a.pids)}
                     for a in getattr(summary, "actors", [])]
    args.json.write_text(json.dumps(out))


def measured_run(mode: str, model: Path, args: argparse.Namespace) -> dict:
    result_file, save = args.out / f"summary-{mode}.json", args.out / "quant"
    command = [sys.executable, __file__, "--child", mode, "--model", str(model), "--save", str(save),
               "--json", str(result_file), "--compute-threads", str(args.compute_threads), "--device", args.device,
               *(["--recipe", str(args.recipe)] if args.recipe else [])]
    start = time.perf_counter()
    child = subprocess.Popen(command)
    sampler = Sampler(lambda pid: pid == child.pid or ray_actor(pid))
    child.wait()
    wall = time.perf_counter() - start
    processes = sampler.stop()
    if child.returncode:
        raise SystemExit(f"{mode} run failed with exit status {child.returncode}")
    summary = json.loads(result_file.read_text())
    shutil.rmtree(save)
    driver = processes.pop(child.pid, {})
    order = {pid: actor["index"] for actor in summary.get("actors", []) for pid in actor["pids"]}
    actors = [{**figures, "series": sampler.series[pid]}
              for pid, figures in sorted(processes.items(), key=lambda item: order.get(item[0], 1 << 30))]
    driver["series"] = sampler.series.get(child.pid, [])
    from dist_quant.runtime.plan import RUNTIME_OVERHEAD
    estimates = [{u.name: peak + RUNTIME_OVERHEAD for u, peak in zip(a.units, a.unit_peaks)}
                 for a in model_plan(model, 1 if mode == "single" else int(mode), args.recipe).actors]
    return {"mode": mode, "wall": wall, "summary": summary, "driver": driver, "actors": actors,
            "unit_estimates": estimates}  # by actor index (single card: the driver runs the units)


# --- report -----------------------------------------------------------------------------------------------------

def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def report(figures: dict) -> str:
    floor, source, output = figures["floor_seconds"], figures["source_bytes"], figures["output_estimate"]
    lines = [f"model: {figures['width']} width, {figures['layers']} layers, source {_gib(source)} GiB bf16, "
             f"checkpoint ~{_gib(output)} GiB; compute threads {figures['compute_threads']}",
             f"I/O floor (read the source once, write the checkpoint's size, fsync): {floor:.1f} s", "",
             "| run | wall | x floor | host-side phases | peak RSS GiB (driver; actors) "
             "| read GiB (x source) | written GiB (x checkpoint) |", "|---|---|---|---|---|---|---|"]
    for run in figures["runs"]:
        procs = [run["driver"], *run["actors"]]
        read = sum(p.get("rchar", 0) for p in procs)
        written = sum(p.get("wchar", 0) for p in procs)
        phases = run["summary"].get("phases", {})
        host = sum(phases.get(p, 0.0) for p in HOST_PHASES)
        rss = _gib(run["driver"].get("peak_rss", 0)) + ("; " + ", ".join(_gib(a["peak_rss"]) for a in run["actors"])
                                                          if run["actors"] else "")
        name = "single card" if run["mode"] == "single" else f"Ray, {run['mode']} worker(s)"
        lines.append(f"| {name} | {run['wall']:.1f} s | {run['wall'] / floor:.2f} | {host:.1f} s | {rss} "
                     f"| {_gib(read)} ({read / source:.2f}) | {_gib(written)} ({written / output:.2f}) |")
    lines += ["", "phases, seconds summed over units (reads and conversions of the next expert group overlap the "
              "compute in a prefetch thread):", "", "| run | " + " | ".join(PHASES) + " |",
              "|---|" + "---|" * len(PHASES)]
    for run in figures["runs"]:
        phases = run["summary"].get("phases", {})
        lines.append(f"| {run['mode']} | " + " | ".join(f"{phases.get(p, 0.0):.1f}" for p in PHASES) + " |")
    for run in figures["runs"]:
        for actor in run["summary"].get("actors", []):
            lines.append(f"  {run['mode']} workers, actor {actor['index']}: {actor['units']} units, busy "
                         f"{actor['busy_seconds']:.1f} s, read {_gib(actor['bytes_read'])} GiB, "
                         + idle_text(run["summary"].get("timeline", []), actor["index"]))
        lines += unit_memory_text(run)
    return "\n".join(lines)


def unit_memory_text(run: dict) -> list[str]:
    """Per Ray actor (or the single card), the units whose resident memory while they ran (the sampled VmRSS, its
    anonymous and shared parts at that moment) most exceeds the plan's estimate of the unit (with the runtime's
    overhead)."""
    lines = []
    processes = [run["driver"]] if run["mode"] == "single" else run["actors"]
    for index, (actor, estimate) in enumerate(zip(processes, run["unit_estimates"])):
        rows = []
        for _, name, started, seconds, _ in (t for t in run["summary"]["timeline"] if t[0] == index):
            during = [sample for sample in actor["series"] if started <= sample[0] <= started + seconds]
            if during and name in estimate:
                _, rss, anon, shmem = max(during, key=lambda sample: sample[1])
                rows.append((rss - estimate[name], name, rss, anon, shmem, estimate[name]))
        worst = ", ".join(f"{name} {_gib(rss)} (anon {_gib(anon)}, shared {_gib(shmem)}; estimated {_gib(est)})"
                          for _, name, rss, anon, shmem, est in sorted(rows, reverse=True)[:4])
        who = "single card" if run["mode"] == "single" else f"{run['mode']} workers, actor {index}"
        lines.append(f"  {who}, RSS GiB while a unit ran, most over its estimate: {worst or 'no samples'}")
    return lines


def idle_text(timeline: list, actor: int) -> str:
    """How long an actor waited between the sweep's first unit start and its last unit's end, and its longest waits
    (after which unit)."""
    if not timeline:
        return ""
    start = min(t[2] for t in timeline)
    mine = sorted((t for t in timeline if t[0] == actor), key=lambda t: t[2])
    if not mine:
        return "no unit"
    gaps = [(b[2] - (a[2] + a[3]), a[1]) for a, b in zip(mine, mine[1:])]
    gaps.append((mine[0][2] - start, "start"))
    waits = ", ".join(f"{g:.1f} s after {name}" for g, name in sorted(gaps, reverse=True)[:3] if g > 0.5)
    return f"idle {sum(g for g, _ in gaps):.1f} s (longest: {waits or 'none'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", choices=["235b", "30b", "397b", "small"], default="235b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="Ray runs (none: single card only)")
    parser.add_argument("--no-single", action="store_true", help="skip the single-card run")
    parser.add_argument("--compute-threads", type=int, default=1, help="--compute_threads of every process")
    parser.add_argument("--device", default="cpu", help="--device of every run (cpu, npu, cuda)")
    parser.add_argument("--keep-model", action="store_true", help="reuse OUT/model if it is there, and keep it")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--recipe", type=Path, help="the recipe of every run (default: the bundled W8A8 recipe)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_run(args)

    model = args.out / "model"
    if not (args.keep_model and (model / "config.json").exists()):
        shutil.rmtree(args.out, ignore_errors=True)
        print(f"building the {args.width}-width model with {args.layers} layers in {model} ...", flush=True)
        build_model(model, args.width, args.layers)
    source = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    output = output_estimate(model, args.recipe)
    figures = {"width": args.width, "layers": args.layers, "source_bytes": source, "output_estimate": output,
               "compute_threads": args.compute_threads, "floor_seconds": io_floor(model, args.out / "floor.bin",
                                                                                  output), "runs": []}
    if not args.no_single:
        figures["runs"].append(measured_run("single", model, args))
    if args.workers:
        subprocess.run([RAY, "start", "--head", f"--num-cpus={os.cpu_count()}", "--include-dashboard=false",
                        "--disable-usage-stats"], check=True, stdout=subprocess.DEVNULL)
        try:
            for workers in args.workers:
                figures["runs"].append(measured_run(str(workers), model, args))
        finally:
            subprocess.run([RAY, "stop", "--force"], check=False, stdout=subprocess.DEVNULL)
    text = report(figures)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if not args.keep_model:
        shutil.rmtree(model)


if __name__ == "__main__":
    main()
