"""The calibration sweep: units in plan order, float activations handed from each unit to the next.

Layer L+1's input is the float output of layer L: the post-attention stream plus the expert groups' partial sums,
added in group order (so the result does not depend on who computed which group), plus the deepstack feature.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from dist_quant.calib.inputs import ModelInputs
from dist_quant.models.qwen3_vl_moe import add_deepstack
from dist_quant.runtime.plan import Unit
from dist_quant.runtime.worker import Worker


def split_tokens(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Undo the concatenation of samples' tokens: ``flat`` [T, H] back to one (1, S, H) tensor per sample."""
    sizes = [t.shape[1] for t in like]
    return [part.reshape(1, -1, flat.shape[-1]) for part in torch.split(flat, sizes)]


def run_sweep(worker: Worker, inputs: list[ModelInputs], plan: list[Unit],
              on_unit_done: Optional[Callable[[Unit], None]] = None,
              on_layer_done: Optional[Callable[[int, list[torch.Tensor]], None]] = None) -> list[torch.Tensor]:
    """Run every unit of the plan on one worker; returns the last layer's (pre-norm) hidden states per sample.

    ``on_layer_done(layer, hidden)`` sees each layer's output (deepstack feature included), e.g. for evaluation.
    """
    done = on_unit_done or (lambda unit: None)
    vision = contexts = hidden = attention = None
    partial_sum = None
    for i, unit in enumerate(plan):
        if unit.kind == "vision":
            vision = worker.vision(inputs)
            contexts = worker.contexts(inputs, vision)
        elif unit.kind == "embed":
            hidden = worker.embed(inputs, vision)
        elif unit.kind == "attention":
            attention = worker.attention(unit.layer, hidden, contexts)
            partial_sum = None
        elif unit.kind == "experts":
            partial = worker.experts(unit.layer, unit.first_expert, unit.stop_expert, attention.moe)
            partial_sum = partial if partial_sum is None else partial_sum + partial
        elif unit.kind == "head":
            worker.head()
        else:
            raise ValueError(f"unknown unit kind {unit.kind!r}")
        layer_ends = unit.kind in ("attention", "experts") and (
            i + 1 == len(plan) or plan[i + 1].layer != unit.layer
        )
        if layer_ends:
            hidden = attention.stream
            if partial_sum is not None:
                hidden = [s + p for s, p in zip(hidden, split_tokens(partial_sum, hidden))]
            hidden = [add_deepstack(h, ctx, unit.layer) for h, ctx in zip(hidden, contexts)]
            if on_layer_done is not None:
                on_layer_done(unit.layer, hidden)
        done(unit)
    return hidden
