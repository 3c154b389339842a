"""The one interpretation of a plan: which unit feeds which, walked in plan order, whoever executes the units.

Layer L+1's input is the float output of layer L: the layer unit's post-attention stream plus its expert groups'
partial sums, added in group order (so the result does not depend on who computed which group), plus the deepstack
feature. The unit that needs that input (the next layer, or the head) combines it, so partial sums travel to one
place and the combined stream is never computed twice.

``interpret`` hands each unit to a ``UnitCalls``: the quantizing ``runner.UnitRunner`` called in this process
(single card), the same runner behind Ray actor handles (``ray_driver.RayCalls``), or the evaluator's model runner
(``evaluate``). It yields ``(unit, result)`` as each unit is issued: the runner's report, a Ray object ref of it,
or the evaluator's comparison values.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import torch

from dist_quant.runtime.plan import Kind, Unit


class UnitCalls(Protocol):
    """What executing each kind of unit takes and returns (``result`` last: a report or what the caller wants)."""

    def contexts(self, unit: Unit, inputs, vision) -> Any: ...
    # the samples' contexts (positions, masks) from the vision outputs (None: a family without a vision tower)

    def images(self, unit: Unit, inputs) -> tuple[Any, Any]: ...  # the vision forward on a share, result

    def vision(self, unit: Unit, inputs, *shares) -> tuple[Any, Any, Any]: ...
    # the tower from every share of the images: vision outputs, sample contexts, result

    def embed(self, unit: Unit, inputs, *shares) -> tuple[Any, Any]: ...  # hidden states, result

    def layer(self, unit: Unit, contexts, hidden, *partials, combine: bool) -> tuple[Any, Any, Any]: ...
    # ``combine``: ``hidden`` is the previous layer's stream, to be finished with ``partials``; returns this layer's
    # stream, its MoE input (None for a dense layer) and the result

    def experts(self, unit: Unit, moe) -> tuple[Any, Any]: ...  # partial sum, result

    def gather(self, partials: list, partial) -> list: ...
    # the partial sums a layer has so far with one more: in-process a running sum in group order (one tensor held,
    # see ``running_sum``), on Ray a list of refs the combining actor adds in that order

    def head(self, unit: Unit, contexts, hidden, *partials, combine: bool) -> Any: ...  # result

    def carried(self, unit: Unit) -> Any: ...  # result (no input: the tensors are written as they are stored)


def interpret(units: Sequence[Unit], start, inputs, calls: UnitCalls,
              put: Callable[[Any], Any] = lambda value: value) -> Iterator[tuple[Unit, Any]]:
    """Issue ``units`` (a plan, or what a resume left of it) in order. ``start`` (a resume point with ``.vision``
    and ``.hidden``, the complete output of the layer before the first unit) replaces the images, vision and
    embedding units; ``put`` turns it into what ``calls`` takes (Ray: object refs)."""
    vision = contexts = hidden = moe = None
    if start is not None and units:
        vision, hidden = put(start.vision), put(start.hidden)
        contexts = calls.contexts(units[0], inputs, vision)
    combine = False  # whether ``hidden`` is a layer's stream still to be finished with ``partials``
    partials: list = []
    shares: list = []
    for unit in units:
        if unit.kind is Kind.IMAGES:
            share, result = calls.images(unit, inputs)
            shares.append(share)
        elif unit.kind is Kind.VISION:
            vision, contexts, result = calls.vision(unit, inputs, *shares)
        elif unit.kind is Kind.EMBED:
            hidden, result = calls.embed(unit, inputs, *shares)  # from the images: beside the vision unit
            if contexts is None:  # a family without a vision unit: the contexts come from the token ids alone
                contexts = calls.contexts(unit, inputs, None)
        elif unit.kind is Kind.LAYER:
            hidden, moe, result = calls.layer(unit, contexts, hidden, *partials, combine=combine)
            partials, combine = [], True
        elif unit.kind is Kind.EXPERTS:
            partial, result = calls.experts(unit, moe)
            partials = calls.gather(partials, partial)
        elif unit.kind is Kind.CARRIED:
            result = calls.carried(unit)
        else:
            result = calls.head(unit, contexts, hidden, *partials, combine=combine)
        yield unit, result


def sample_contexts(family, config, rotary, inputs: Sequence, vision: Optional[Sequence], dtype, device) -> list:
    """Each sample's context (positions, mask: ``family.sample_context``) from its vision output; ``vision`` None
    for a family without a vision tower. One home for the quantizing worker and the evaluator."""
    vision = [None] * len(inputs) if vision is None else vision
    return [family.sample_context(config, rotary, s, v, dtype, device) for s, v in zip(inputs, vision)]


def sample_outputs(shares: Sequence[dict[int, Any]], samples: int) -> list[Optional[Any]]:
    """The vision outputs of samples 0..samples-1 from the shares of the images ({sample index: output} each); None
    for a sample without an image."""
    outputs = {index: output for share in shares for index, output in share.items()}
    return [outputs.get(index) for index in range(samples)]


def split_tokens(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Undo the concatenation of samples' tokens: ``flat`` [T, H] back to one (1, S, H) tensor per sample."""
    sizes = [t.shape[1] for t in like]
    return [part.reshape(1, -1, flat.shape[-1]) for part in torch.split(flat, sizes)]


def running_sum(partials: list, partial: torch.Tensor) -> list:
    """``UnitCalls.gather`` in one process: ``[((p0 + p1) + p2) ...]``, the order ``add_partials`` adds in, so the
    result is the same bits while only one sum is held."""
    return [add_partials([*partials, partial])]


def add_partials(partials: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """Sum of the expert groups' partial outputs, always as ((p0 + p1) + p2) + ...: one order, one result."""
    total = None
    for partial in partials:
        total = partial if total is None else total + partial
    return total


def finish_layer(family, layer_idx: int, stream: list[torch.Tensor], partials: Sequence[torch.Tensor],
                 contexts: list) -> list[torch.Tensor]:
    """Output of a layer: its post-attention stream plus the expert sum, then the model family's deepstack feature
    of that layer (``family.add_deepstack``; the identity where a family has none)."""
    hidden = stream
    partial_sum = add_partials(partials)
    if partial_sum is not None:
        hidden = [s + p for s, p in zip(stream, split_tokens(partial_sum, stream))]
    return [family.add_deepstack(h, ctx, layer_idx) for h, ctx in zip(hidden, contexts)]
