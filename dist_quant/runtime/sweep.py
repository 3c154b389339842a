"""The calibration sweep: units in plan order, float activations handed from each unit to the next.

Layer L+1's input is the float output of layer L: the post-attention stream plus the expert groups' partial sums,
added in group order (so the result does not depend on who computed which group), plus the deepstack feature.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from dist_quant.calib.inputs import ModelInputs
from dist_quant.models.qwen3_vl_moe import SampleContext, add_deepstack
from dist_quant.runtime.plan import Unit
from dist_quant.runtime.worker import Worker


def split_tokens(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Undo the concatenation of samples' tokens: ``flat`` [T, H] back to one (1, S, H) tensor per sample."""
    sizes = [t.shape[1] for t in like]
    return [part.reshape(1, -1, flat.shape[-1]) for part in torch.split(flat, sizes)]


def add_partials(partials: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """Sum of the expert groups' partial outputs, always as ((p0 + p1) + p2) + ...: one order, one result."""
    total = None
    for partial in partials:
        total = partial if total is None else total + partial
    return total


def finish_layer(layer_idx: int, stream: list[torch.Tensor], partial_sum: Optional[torch.Tensor],
                 contexts: list[SampleContext]) -> list[torch.Tensor]:
    """Output of a layer: its post-attention stream plus the expert sum, then the deepstack feature of that layer."""
    hidden = stream
    if partial_sum is not None:
        hidden = [s + p for s, p in zip(stream, split_tokens(partial_sum, stream))]
    return [add_deepstack(h, ctx, layer_idx) for h, ctx in zip(hidden, contexts)]


def run_sweep(worker: Worker, inputs: list[ModelInputs], plan: list[Unit],
              on_unit_done: Optional[Callable[[Unit], None]] = None,
              on_layer_done: Optional[Callable[[int, list[torch.Tensor]], None]] = None,
              on_vision_done: Optional[Callable[[list], None]] = None,
              start=None) -> list[torch.Tensor]:
    """Run every unit of the plan on one worker; returns the last layer's (pre-norm) hidden states per sample.

    ``on_layer_done(layer, hidden)`` sees each layer's output (deepstack feature included), ``on_vision_done(vision)``
    the vision outputs (to save them for a resume). ``start`` (a resume point: ``.vision``, ``.hidden``) replaces the
    vision and embedding units, which the plan then leaves out.
    """
    done = on_unit_done or (lambda unit: None)
    vision = contexts = hidden = attention = None
    if start is not None:
        vision, hidden = start.vision, start.hidden
        contexts = worker.contexts(inputs, vision)
    partial_sum = None
    for i, unit in enumerate(plan):
        worker.prefetch_next_experts(plan, i)
        if unit.kind == "vision":
            vision = worker.vision(inputs)
            contexts = worker.contexts(inputs, vision)
            if on_vision_done is not None:
                on_vision_done(vision)
        elif unit.kind == "embed":
            hidden = worker.embed(inputs, vision)
        elif unit.kind == "attention":
            attention = worker.attention(unit.layer, hidden, contexts)
            partial_sum = None
        elif unit.kind == "experts":
            partial = worker.experts(unit.layer, unit.first_expert, unit.stop_expert, attention.moe)
            partial_sum = add_partials([partial] if partial_sum is None else [partial_sum, partial])
        elif unit.kind == "head":
            worker.head()
        else:
            raise ValueError(f"unknown unit kind {unit.kind!r}")
        if unit.kind in ("attention", "experts") and (i + 1 == len(plan) or plan[i + 1].layer != unit.layer):
            hidden = finish_layer(unit.layer, attention.stream, partial_sum, contexts)
            if on_layer_done is not None:
                on_layer_done(unit.layer, hidden)
        done(unit)
    return hidden
