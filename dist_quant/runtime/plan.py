"""Units of work of one quantization, in the order the calibration sweep needs them.

Expert groups have a fixed size that does not depend on the number of workers, and their partial sums are added in
group order, so the checkpoint is the same whoever computes which group.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_quant.models.qwen3_vl_moe import is_moe_layer

DEFAULT_EXPERT_GROUP_SIZE = 16


@dataclass(frozen=True)
class Unit:
    kind: str  # "vision" | "embed" | "attention" | "experts" | "head"
    layer: int = -1
    first_expert: int = 0
    stop_expert: int = 0

    @property
    def name(self) -> str:
        if self.kind == "attention":
            return f"layer {self.layer} attention"
        if self.kind == "experts":
            return f"layer {self.layer} experts {self.first_expert}-{self.stop_expert - 1}"
        return self.kind


def expert_groups(num_experts: int, group_size: int = DEFAULT_EXPERT_GROUP_SIZE) -> list[tuple[int, int]]:
    """``[(first, stop), ...]`` covering ``range(num_experts)`` in order."""
    return [(first, min(first + group_size, num_experts)) for first in range(0, num_experts, group_size)]


def layer_units(text_config, layer_idx: int, group_size: int = DEFAULT_EXPERT_GROUP_SIZE) -> list[Unit]:
    units = [Unit("attention", layer_idx)]
    if is_moe_layer(text_config, layer_idx):
        units += [Unit("experts", layer_idx, a, b) for a, b in expert_groups(text_config.num_experts, group_size)]
    return units


def make_plan(config, group_size: int = DEFAULT_EXPERT_GROUP_SIZE) -> list[Unit]:
    """Every unit of a model: vision, embeddings, each layer's attention and expert groups, then the head."""
    units = [Unit("vision"), Unit("embed")]
    for layer_idx in range(config.text_config.num_hidden_layers):
        units += layer_units(config.text_config, layer_idx, group_size)
    return units + [Unit("head")]
