"""A recipe against a model, before any work: whether every processor selects a linear and vLLM Ascend can serve what
it selects (``check_recipe_for_model``: quant, ``--dry_run`` and plan), and which scheme each linear gets, as
``dist-quant quant --dry_run`` lists it: the linears grouped by name with their layer, block and expert numbers taken
out (a 235B has ~37,000 linears and ~60 such names), each group with the layers it covers. Torch-free."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Iterator

from dist_quant import schemes
from dist_quant.checkpoint import formats
from dist_quant.errors import RecipeError
from dist_quant.models.family import sizes_for
from dist_quant.recipe import Recipe, check_linear_quants_apply

_NUMBERS = re.compile(r"\.(layers|blocks|experts|deepstack_merger_list)\.(\d+)(?=\.)")


def model_linears(config) -> Iterator[str]:
    """Every linear module name of the model, vision first, then each layer's, then its experts'."""
    family = sizes_for(config.model_type)
    yield from family.vision_linears(config)
    text = config.get_text_config()
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


def _layer_expert_type(recipe: Recipe, layer: int, names: Iterable[str]) -> str:
    """The quant type of a layer's routed experts (``names``: all their linears). vLLM Ascend builds them as one MoE
    layer of one method, the type it reads for expert 0 (its gate, up and down must agree): every expert of the
    layer gets that type, and it has a MoE method."""
    types = {recipe.quant_type(name) for name in names}
    if len(types) > 1:
        raise RecipeError(f"recipe {recipe.path}: the routed experts of layer {layer} get different quant types "
                          f"{sorted(types)}; vLLM Ascend serves a layer's experts with one method (the type of expert "
                          "0's gate, up and down), so select all of a layer's experts in one linear_quant")
    expert_type = schemes.get(types.pop())
    if not expert_type.serves_experts:
        allowed = [s.name for s in schemes.SCHEMES.values() if s.serves_experts]
        raise RecipeError(f"recipe {recipe.path}: experts must be one of {allowed}: vLLM Ascend has no "
                          f"{expert_type.name} MoE method (exclude '*experts*' from that linear_quant)")
    return expert_type.name


def check_recipe_for_model(recipe: Recipe, config) -> None:
    """Refuse, before any work, recipes that select nothing or that vLLM Ascend could not serve: a ``linear_quant``
    no linear gets, static experts, an experts-only scheme elsewhere, expert shapes a scheme cannot pack, or one fused
    projection split across types; an ``iter_smooth`` that selects no decoder linear. Torch-free (the family's sizes
    module): ``plan`` runs it too."""
    family = sizes_for(config.model_type)
    text = config.get_text_config()
    experts = {layer: family.expert_linears(config, layer, 0, text.num_experts)
               for layer in range(text.num_hidden_layers) if family.is_moe_layer(text, layer)}
    expert_types = [_layer_expert_type(recipe, layer, names) for layer, names in experts.items()]
    decoder = [name for layer_idx in range(text.num_hidden_layers) for name in family.layer_linears(config, layer_idx)]
    linears = [*family.vision_linears(config), *decoder]
    check_linear_quants_apply(recipe, linears, (name for names in experts.values() for name in names))
    smooth = recipe.smooth
    if not family.OUTLIER_SUPPRESSION and (recipe.quarot is not None or smooth is not None):
        raise RecipeError(f"recipe {recipe.path}: {family.NAME} has no QuaRot or smoothing points in dist-quant "
                          "(msModelSlim's recipes for it use neither): remove the quarot and iter_smooth processes")
    if smooth is not None and not any(smooth.selects(name) for name in decoder):
        raise RecipeError(f"recipe {recipe.path}: iter_smooth with include {list(smooth.include)} and exclude "
                          f"{list(smooth.exclude)} selects no linear of this model's decoder layers, so nothing "
                          "would be smoothed: fix its globs or remove it")
    problem = formats.for_saver(recipe.saver).unsupported([*map(recipe.quant_type, linears), *expert_types])
    if problem:
        raise RecipeError(f"recipe {recipe.path}: {problem}")
    unquantized = [name for name in linears if name.endswith(tuple(family.UNQUANTIZED_LINEARS))]
    quantized = [name for name in unquantized if recipe.quant_type(name) != schemes.FLOAT]
    if quantized:
        raise RecipeError(f"recipe {recipe.path}: {quantized[0]} gets {recipe.quant_type(quantized[0])}, but vLLM "
                          "builds it without a quant config (it loads a float weight): exclude it from the recipe's "
                          "linear_quant")
    for name in linears:
        scheme = schemes.get(recipe.quant_type(name))
        if not scheme.serves_linears:
            raise RecipeError(f"recipe {recipe.path}: {name} gets {scheme.name}, which vLLM Ascend serves for routed "
                              "experts only (include only '*mlp.experts*' in that linear_quant)")
    for layer_idx in range(text.num_hidden_layers):  # experts of one layer share their shapes
        if family.is_moe_layer(text, layer_idx):
            for proj, shape in zip(family.EXPERT_PROJS, family.expert_shapes(config)):
                name = family.expert_key(layer_idx, 0, proj)
                problem = schemes.get(recipe.quant_type(name)).check_shape(name, shape, family.splits_input(name))
                if problem:
                    raise RecipeError(f"recipe {recipe.path}: {problem}")
    for layer_idx in range(text.num_hidden_layers):
        for group in family.FUSED_GROUPS:
            types = {recipe.quant_type(f"{family.layer_prefix(layer_idx)}.{name}") for name in group}
            if len(types) > 1:
                raise RecipeError(f"recipe {recipe.path}: {', '.join(group)} of layer {layer_idx} get different "
                                  f"quant types {sorted(types)}; vLLM Ascend fuses them, so they must share one")
