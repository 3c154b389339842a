"""A projection of the wall time of a quantization on N cards, from the plan and a few hardware figures.

This is a model, not a measurement: per unit, reading its weights from storage overlaps with computing on the
previous one (prefetch), then its output is written straight into its place in the part files (checksummed on the
way: nothing is assembled or copied at the end); layers are a chain (layer L+1 needs layer L's output) while the
expert groups of a layer run on all actors at once. The figures below are parameters. Defaults: an Atlas 800I A2 node (8 cards of 64 GB HBM2e,
about 1.6 TB/s each; float32 matmul throughput taken at a conservative 60 TFLOPS per card), storage that delivers
2 GB/s read and 1 GB/s write per node, and the host-side cost of serialising and checksumming output measured on
the development machine (docs/benchmarks.md, "Real width"). Change them to match your cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_quant.models.family import family_for
from dist_quant.runtime.plan import (COMPUTE_BYTES, Kind, QuantPlan, Unit, source_bytes_per_param, unit_params,
                                     unit_read_params)

GB = 1e9  # storage and link figures are decimal (GB/s), as vendors state them
PARALLEL = (Kind.IMAGES, Kind.EXPERTS)  # units that run side by side on every actor


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
    compute_s: float
    write_s: float
    nodes: int

    def describe(self, workers: int) -> str:
        return (f"  projected wall time on {workers} card(s) ({self.nodes} node(s)): {self.seconds / 60:.1f} min "
                f"(critical path: read {self.read_s / 60:.1f}, compute {self.compute_s / 60:.1f}, write "
                f"{self.write_s / 60:.1f} min) - a projection, not a measurement")


def unit_flops(config, unit: Unit, calib_tokens: int) -> float:
    """Multiply-adds x 2 of the calibration forward of a unit (experts: only the routed tokens; images: its share
    of them; the vision unit only quantizes)."""
    tc = config.text_config
    if unit.kind is Kind.EXPERTS:
        share = (unit.stop_expert - unit.first_expert) / tc.num_experts
        expert_params = family_for(config.model_type).expert_param_count(config)
        return 2.0 * calib_tokens * tc.num_experts_per_tok * share * expert_params
    if unit.kind is Kind.IMAGES:
        return 2.0 * calib_tokens / unit.shares * unit_params(config, unit)
    if unit.kind is Kind.LAYER:
        return 2.0 * calib_tokens * unit_params(config, unit)
    return 0.0


def project(plan: QuantPlan, config, raw_config: dict, calib_tokens: int, hw: Hardware = Hardware()) -> Projection:
    workers = len(plan.actors)
    nodes = max(1, -(-workers // hw.cards_per_node))
    per_card = min(workers, hw.cards_per_node)
    source_bytes = source_bytes_per_param(raw_config)

    def unit_time(unit: Unit, out: int) -> tuple[float, float, float]:
        # expert groups and shares of the images run on every card at once and share their node's storage; other
        # units run alone
        sharing = per_card if unit.kind in PARALLEL else 1
        read_bw, write_bw = hw.storage_read_gbps * GB / sharing, hw.storage_write_gbps * GB / sharing
        params = unit_params(config, unit)
        read = unit_read_params(config, unit) * source_bytes / read_bw
        compute = unit_flops(config, unit, calib_tokens) / (hw.matmul_tflops * 1e12) \
            + hw.elementwise_passes * params * COMPUTE_BYTES / (hw.hbm_gbps * GB)
        return read, compute, out / write_bw + out / (hw.host_gbps * GB)

    read_s = compute_s = write_s = 0.0
    layers: dict[tuple, dict[int, list[float]]] = {}
    for unit, actor, out in zip(plan.units, plan.assignment, plan.unit_output_bytes):
        read, compute, write = unit_time(unit, out)
        if unit.kind in PARALLEL:  # parallel within the layer (the images): the busiest actor sets the pace
            load = layers.setdefault((unit.kind, unit.layer), {}).setdefault(actor, [0.0, 0.0, 0.0])
            load[0], load[1], load[2] = load[0] + read, load[1] + compute, load[2] + write
            continue
        read_s, compute_s, write_s = read_s + read, compute_s + compute, write_s + write
    for per_actor in layers.values():
        busiest = max(per_actor.values(), key=lambda t: max(t[0], t[1]) + t[2])
        read_s, compute_s, write_s = read_s + busiest[0], compute_s + busiest[1], write_s + busiest[2]
    total = hw.actor_start_s + max(read_s, compute_s) + write_s
    return Projection(total, read_s, compute_s, write_s, nodes)
