"""The Qwen3-VL-MoE family's expert layout and mapping: its experts are stored fused, one 3-D ``gate_up_proj`` and one
``down_proj`` per layer, in one of two orientations (transformers 4.57 / the Hub, or transformers 5.x); a unit reads
exactly the rows of its experts and splits them into per-expert nn.Linear weights (gate, up, down), which is how the
quantized checkpoint names them (``...mlp.experts.{e}.gate_proj``) and vLLM's expert mapping loads them.
"""

from __future__ import annotations

import re
from typing import Literal, Optional

import torch

from dist_quant.checkpoint.reader import CheckpointReader
from dist_quant.errors import CheckpointError
from dist_quant.models.qwen3_vl_moe_sizes import fused_expert_keys

ExpertLayout = Literal["hub", "transposed"]


def layout_written_by(transformers_version: object) -> Optional[ExpertLayout]:
    """The expert layout the transformers that wrote a config.json saves (its ``transformers_version``): 4.x writes
    the Hub layout, 5.x and later the transposed one; None when the field is absent or not a version number."""
    match = re.match(r"\s*(\d+)\.\d+", transformers_version) if isinstance(transformers_version, str) else None
    if match is None:
        return None
    return "hub" if int(match.group(1)) < 5 else "transposed"


LAYOUT_NAMES = {"hub": "transformers 4.57 / Hub layout", "transposed": "transformers 5.x layout"}


def detect_expert_layout(
    gate_up_shape: tuple[int, ...],
    down_shape: tuple[int, ...],
    num_experts: int,
    hidden: int,
    intermediate: int,
    transformers_version: object = None,
    only: Optional[ExpertLayout] = None,
) -> ExpertLayout:
    """Tell the transformers 4.57 / Hub layout from the transformers 5.x one, which share tensor names.

    hub: gate_up (E, hidden, 2I), down (E, I, hidden); transposed: gate_up (E, 2I, hidden), down (E, hidden, I).
    When 2I == hidden (or I == hidden) one of the two tensors has the same shape in both layouts, so the shapes alone
    would leave its orientation a guess: then the ``transformers_version`` config.json records decides, and the
    other tensor's shape must agree with it. ``only``: the one layout a family's checkpoints have (the shapes must
    fit it; transformers_version is not asked).
    """
    gate_up_shape, down_shape = tuple(gate_up_shape), tuple(down_shape)
    shapes = {
        "hub": ((num_experts, hidden, 2 * intermediate), (num_experts, intermediate, hidden)),
        "transposed": ((num_experts, 2 * intermediate, hidden), (num_experts, hidden, intermediate)),
    }
    expected = {layout: shapes[layout] for layout in ((only,) if only is not None else shapes)}
    fitting = [layout for layout, pair in expected.items() if pair == (gate_up_shape, down_shape)]
    if not fitting:
        choices = " or ".join(f"{gate_up} and {down} ({LAYOUT_NAMES[layout]})"
                              for layout, (gate_up, down) in expected.items())
        raise CheckpointError(
            f"expert tensors have shapes gate_up_proj {gate_up_shape} and down_proj {down_shape}, but the config "
            f"(num_experts={num_experts}, hidden_size={hidden}, moe_intermediate_size={intermediate}) expects "
            f"{'either ' if len(expected) > 1 else ''}{choices}; check that config.json belongs to these weights"
        )
    if only is not None or (2 * intermediate != hidden and intermediate != hidden):
        return fitting[0]
    written = layout_written_by(transformers_version)
    if written is None:
        raise CheckpointError(
            f"cannot tell the expert layout: with hidden_size={hidden} and moe_intermediate_size={intermediate} "
            f"(2*I == hidden or I == hidden) one of gate_up_proj {gate_up_shape} / down_proj {down_shape} has the "
            "same shape in the transformers 4.57 (Hub) and 5.x (transposed) layouts, and config.json has no "
            "transformers_version to tell which transformers wrote it; add the transformers_version that saved "
            "these weights (e.g. \"4.57.1\") to config.json"
        )
    if written not in fitting:
        raise CheckpointError(
            f"config.json says transformers {transformers_version} wrote these weights, which stores experts in the "
            f"{written} layout {expected[written]}, but they have shapes gate_up_proj {gate_up_shape} and down_proj "
            f"{down_shape} ({fitting[0]} layout); fix transformers_version in config.json or convert the weights"
        )
    return written


def expert_layout(reader: CheckpointReader, layer_prefix: str, *, num_experts: int, hidden: int,
                  intermediate: int, only: Optional[ExpertLayout] = None) -> ExpertLayout:
    """The layout of one MoE layer's fused expert tensors, from their header shapes (and, when the sizes make the
    shapes ambiguous, config.json's transformers_version; ``only``: the family's one layout); errors name the layer
    and its files."""
    gate_up_key, down_key = fused_expert_keys(layer_prefix)
    try:
        return detect_expert_layout(reader.shape(gate_up_key), reader.shape(down_key), num_experts, hidden,
                                    intermediate, reader.config.get("transformers_version"), only)
    except CheckpointError as error:
        files = " and ".join(sorted({str(reader.file_of(gate_up_key)), str(reader.file_of(down_key))}))
        raise CheckpointError(f"{layer_prefix}.mlp.experts in {files}: {error}") from None


def read_experts(
    reader: CheckpointReader,
    layer_prefix: str,
    start: int,
    stop: int,
    *,
    num_experts: int,
    hidden: int,
    intermediate: int,
    dtype: torch.dtype = torch.float32,
    only: Optional[ExpertLayout] = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(gate, up, down) nn.Linear weights [out, in] of experts start..stop-1 of one MoE layer (``only``: as for
    :func:`expert_layout`).

    gate and up are the first and second halves of the fused 2I dimension of `gate_up_proj`.
    """
    gate_up_key, down_key = fused_expert_keys(layer_prefix)
    layout = expert_layout(reader, layer_prefix, num_experts=num_experts, hidden=hidden, intermediate=intermediate,
                           only=only)
    for key in (gate_up_key, down_key):
        reader.check(key)  # floating weights, not codes that a cast would pass off as weights
    gate_up = reader.get_slice(gate_up_key, start, stop)  # as stored: transposed before the (exact) conversion,
    down = reader.get_slice(down_key, start, stop)  # which moves half the bytes of a float32 transpose
    if layout == "hub":  # applied as x @ W: transpose to [out, in]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)

    def weight(w: torch.Tensor) -> torch.Tensor:
        return w.contiguous().to(dtype)

    return [(weight(g_u[:intermediate]), weight(g_u[intermediate:]), weight(d)) for g_u, d in zip(gate_up, down)]
