"""A projection of the wall time of a quantization on N cards, from the plan and a few hardware figures.

This is a model, not a measurement: per unit, reading its weights from storage overlaps with computing on the
previous one (prefetch), then its output is written straight into its place in the part files (checksummed on the
way: nothing is assembled or copied at the end); layers are a chain (layer L+1 needs layer L's output) while the
expert groups of a layer run on all actors at once. The figures below are parameters. Defaults: an Atlas 800I A2
node (8 cards of 64 GB HBM2e, about 1.6 TB/s each; float32 matmul throughput taken at a conservative 60 TFLOPS per
card), storage that delivers 2 GB/s read and 1 GB/s write per node, and the host-side cost of serialising and
checksumming output measured on the development machine (docs/benchmarks.md, "Real width"). Change them to match
your cluster.

A weight method that searches or rounds (ssz, GPTQ) is projected as host work, one expert after another inside
its unit, on ``--compute_threads`` threads: that time is projected from per-expert figures measured on the
development machine's CPU (below; no card has measured it), and on the critical path it divides by the actors a
layer's expert groups spread over and by the threads, not by cards' TFLOPS. For the W4A8 GPTQ preset it is most of
the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dist_quant.models.family import sizes_for
from dist_quant.runtime.plan import (
    COMPUTE_BYTES,
    Kind,
    QuantChoice,
    QuantPlan,
    Unit,
    source_bytes_per_param,
    unit_params,
    unit_read_params,
)

if TYPE_CHECKING:
    from dist_quant.schemes import QSpec

GB = 1e9  # storage and link figures are decimal (GB/s), as vendors state them
PARALLEL = (Kind.IMAGES, Kind.EXPERTS, Kind.CARRIED)  # units that run side by side on every actor

# --- host-side rounding, measured --------------------------------------------------------------------------------
# Seconds of ONE host thread of the development machine per expert of Qwen3-VL-235B-A22B's width (gate and up
# [1536, 4096], down [4096, 1536]), at 235B width with the bundled photos (2839 calibration tokens): docs/benchmarks.md,
# "W4A8 experts at 235B width". What a min/max rounding costs (W8A8, W4A8 minmax: a divide, a round, a clamp) is in
# Hardware.elementwise_passes; these are what a weight method adds to it.
MEASURED_EXPERT_PARAMS = 3 * 1536 * 4096
SSZ_ITERATION_S = 0.51 / 10  # ssz: 0.51 s per expert for 10 iterations on gate, up and down (2026-12-07, second)
GPTQ_S = 1.05  # gptq, after ssz's scale: the column loops on the compute thread; the Gram matrices and the
# factorisation (~0.6 s) run in the prefetch thread while the expert before rounds, off the critical path
# (docs/benchmarks.md, "Hessians one expert ahead")


@dataclass(frozen=True)
class Hardware:
    cards_per_node: int = 8
    storage_read_gbps: float = 2.0  # per node, GB/s
    storage_write_gbps: float = 1.0  # per node, GB/s
    hbm_gbps: float = 1600.0  # per card
    matmul_tflops: float = 60.0  # per card, float32 calibration matmuls
    host_gbps: float = 2.0  # per actor: CRC-32 and positioned writes of its output into the page cache (1 core)
    elementwise_passes: int = 12  # fp32 passes over a unit's weights: convert, fuse, rotate, quantize
    actor_start_s: float = 30.0  # import torch/torch_npu and open the checkpoint


@dataclass
class Projection:
    seconds: float
    read_s: float
    compute_s: float  # the cards' calibration forward and elementwise passes, plus round_s
    write_s: float
    nodes: int
    round_s: float = 0.0  # of compute_s: the host's ssz / GPTQ work on the critical path
    compute_threads: int = 1

    def describe(self, workers: int) -> str:
        rounding = (f" (of which host rounding {_minutes(self.round_s)} on {self.compute_threads} thread(s) per "
                    "actor: --compute_threads)" if self.round_s else "")
        return (f"  projected wall time on {workers} card(s) ({self.nodes} node(s)): {_minutes(self.seconds)} "
                f"(critical path: read {_minutes(self.read_s)}, compute {_minutes(self.compute_s)}{rounding}, write "
                f"{_minutes(self.write_s)}) - a projection, not a measurement")


def _minutes(seconds: float) -> str:
    """Minutes, or hours past two of them: a W4A8 GPTQ projection runs to hours, where minutes are unreadable."""
    return f"{seconds / 3600:.1f} h" if seconds >= 7200 else f"{seconds / 60:.1f} min"


def rounding_seconds(weight: QSpec | None, params: int) -> float:
    """Seconds one host thread spends searching scales and rounding a linear of ``params`` weights, beyond a
    min/max rounding, for the recipe's weight qconfig ``weight``: ssz's iterations (``ext.step``, 50 by default),
    and for gptq its Gram matrices and column loop after ssz's scale. Scaled from the measured expert by the
    parameter count: ssz's cost is linear in it; GPTQ's per weight grows with the input width, so it is overestimated
    for narrower models (30B-A3B) and would be underestimated for wider ones."""
    if weight is None or weight.method not in ("ssz", "gptq"):
        return 0.0
    from dist_quant.algorithms.int4_params import SSZ_ITERATIONS

    per_expert = weight.option("step", SSZ_ITERATIONS) * SSZ_ITERATION_S + (GPTQ_S if weight.method == "gptq" else 0.0)
    return per_expert * params / MEASURED_EXPERT_PARAMS


def unit_rounding_seconds(quant_params: dict[QuantChoice, int]) -> float:
    """One host thread's rounding time of a unit's linears (``QuantPlan.unit_quant_params`` of the unit)."""
    return sum(rounding_seconds(weight, params) for (_, weight), params in quant_params.items())


def unit_flops(config, unit: Unit, calib_tokens: int) -> float:
    """Multiply-adds x 2 of the calibration forward of a unit (experts: only the routed tokens; images: its share
    of them; the vision unit only quantizes)."""
    tc = config.get_text_config()
    if unit.kind is Kind.EXPERTS:
        share = (unit.stop_expert - unit.first_expert) / tc.num_experts
        expert_params = sizes_for(config.model_type).expert_param_count(config)
        return 2.0 * calib_tokens * tc.num_experts_per_tok * share * expert_params
    if unit.kind is Kind.IMAGES:
        return 2.0 * calib_tokens / unit.shares * unit_params(config, unit)
    if unit.kind is Kind.LAYER:
        return 2.0 * calib_tokens * unit_params(config, unit)
    return 0.0


def project(plan: QuantPlan, config, raw_config: dict, calib_tokens: int, hw: Hardware = Hardware(), *,
            compute_threads: int) -> Projection:
    """The plan's wall time for its recipe's schemes, each actor rounding on ``compute_threads`` host threads."""
    workers = len(plan.actors)
    nodes = max(1, -(-workers // hw.cards_per_node))
    per_card = min(workers, hw.cards_per_node)
    source_bytes = source_bytes_per_param(raw_config)

    def unit_time(unit: Unit, out: int, quant_params: dict[QuantChoice, int]) -> list[float]:
        """read, compute (the rounding included), write and the rounding alone, in seconds."""
        # expert groups and shares of the images run on every card at once and share their node's storage; other
        # units run alone
        sharing = per_card if unit.kind in PARALLEL else 1
        read_bw, write_bw = hw.storage_read_gbps * GB / sharing, hw.storage_write_gbps * GB / sharing
        params = unit_params(config, unit)
        read = unit_read_params(config, unit) * source_bytes / read_bw
        rounding = unit_rounding_seconds(quant_params) / compute_threads
        compute = unit_flops(config, unit, calib_tokens) / (hw.matmul_tflops * 1e12) \
            + hw.elementwise_passes * params * COMPUTE_BYTES / (hw.hbm_gbps * GB) + rounding
        return [read, compute, out / write_bw + out / (hw.host_gbps * GB), rounding]

    path = [0.0, 0.0, 0.0, 0.0]  # read, compute, write, rounding on the critical path
    layers: dict[tuple, dict[int, list[float]]] = {}
    for unit, actor, out, quant_params in zip(plan.units, plan.assignment, plan.unit_output_bytes,
                                              plan.unit_quant_params):
        times = unit_time(unit, out, quant_params)
        if unit.kind in PARALLEL:  # parallel within the layer (the images): the busiest actor sets the pace
            load = layers.setdefault((unit.kind, unit.layer), {}).setdefault(actor, [0.0, 0.0, 0.0, 0.0])
            load[:] = [a + b for a, b in zip(load, times)]
            continue
        path = [a + b for a, b in zip(path, times)]
    for per_actor in layers.values():
        busiest = max(per_actor.values(), key=lambda t: max(t[0], t[1]) + t[2])
        path = [a + b for a, b in zip(path, busiest)]
    read_s, compute_s, write_s, round_s = path
    total = hw.actor_start_s + max(read_s, compute_s) + write_s
    return Projection(total, read_s, compute_s, write_s, nodes, round_s, compute_threads)
