"""Which scheme each linear of a model gets from a recipe, as ``dist-quant quant --dry_run`` lists it before any work:
the linears grouped by name with their layer, block and expert numbers taken out (a 235B has ~37,000 linears and
~60 such names), each group with the layers it covers."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterator

from dist_quant.models.family import family_for
from dist_quant.recipe import Recipe

_NUMBERS = re.compile(r"\.(layers|blocks|experts|deepstack_merger_list)\.(\d+)(?=\.)")


def model_linears(config) -> Iterator[str]:
    """Every linear module name of the model, vision first, then each layer's, then its experts'."""
    family = family_for(config.model_type)
    yield from family.vision_linears(config)
    text = config.text_config
    for layer in range(text.num_hidden_layers):
        yield from family.layer_linears(config, layer)
        if family.is_moe_layer(text, layer):
            yield from family.expert_linears(config, layer, 0, text.num_experts)


def shape_of(name: str) -> tuple[str, int]:
    """The name with its numbers starred (``...layers.*.mlp.experts.*.up_proj``) and its decoder layer, or -1."""
    layer = re.search(r"\blayers\.(\d+)\.", name)
    return _NUMBERS.sub(lambda m: f".{m.group(1)}.*", name), int(layer.group(1)) if layer else -1


def spans(numbers: list[int]) -> str:
    """Sorted whole numbers as ranges: 0-3,5,7-93."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ",".join(out)


def linear_assignments(recipe: Recipe, config) -> list[tuple[str, str, int, str]]:
    """(scheme, starred name, how many linears, which layers) for every group of the model's linears, in model
    order."""
    groups: dict[tuple[str, str], list] = defaultdict(lambda: [0, set()])
    for name in model_linears(config):
        shape, layer = shape_of(name)
        entry = groups[(recipe.quant_type(name), shape)]
        entry[0] += 1
        if layer >= 0:
            entry[1].add(layer)
    return [(scheme, shape, count, spans(sorted(layers)) if layers else "-")
            for (scheme, shape), (count, layers) in groups.items()]


def format_assignments(rows: list[tuple[str, str, int, str]]) -> str:
    width = max((len(shape) for _, shape, _, _ in rows), default=10)
    totals: dict[str, int] = defaultdict(int)
    lines = [f"{'scheme':<13} {'linear':<{width}} {'count':>6}  layers"]
    for scheme, shape, count, layers in rows:
        lines.append(f"{scheme:<13} {shape:<{width}} {count:>6}  {layers}")
        totals[scheme] += count
    lines.append("linears by scheme: " + ", ".join(f"{s}: {n}" for s, n in sorted(totals.items())))
    return "\n".join(lines)
