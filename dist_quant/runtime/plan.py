"""The plan of one quantization: units of work, their assignment to actors, output parts, a memory estimate.

Everything here comes from config.json alone (sizes in closed form, from the family's sizes module), so a plan for a
235B model is printed at once without reading a weight. Expert groups have a fixed size that does not depend on the
number of workers, and their partial sums are added in group order, so the checkpoint is the same whoever computes
which group.

The module imports no torch, no transformers and no scheme: the command line takes its defaults from here to build its
parser, and neither ``--help`` nor ``plan`` may wait seconds for torch. What needs a recipe's schemes imports them
where it needs them (they import torch only to quantize).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Optional

from dist_quant.models.family import sizes_for

if TYPE_CHECKING:
    from dist_quant.recipe import Recipe
    from dist_quant.schemes import QSpec

DEFAULT_EXPERT_GROUP_SIZE = 16
DEFAULT_CALIB_TOKENS = 16 * 1024  # e.g. 16 images of ~1000 tokens: the activations every text unit holds
COMPUTE_BYTES = 4  # weights are computed on in float32
# Python, torch, transformers and the calibration inputs (0.52-0.55 GiB at a Ray actor's or the single card's first
# unit), plus what the allocator keeps of freed blocks inside a unit: measured on CPU at Qwen3-VL-235B-A22B's and
# 30B-A3B's widths (docs/benchmarks.md, "Real width"); a card adds its context
RUNTIME_OVERHEAD = int(0.7 * 1024**3)
# A Ray actor's layer and expert units take the token stream, the MoE inputs and the partial sums through the object
# store, whose pages stay mapped in the actor: 0.35-0.36 GiB measured at 30B width, 0.41-0.64 GiB at 235B, i.e.
# about this many float32 copies of the calibration token stream [tokens, hidden]
OBJECT_STORE_STREAMS = 14
CARRIED_SHARE_PARAMS = 2**29  # parameters of one carried unit at most (1 GiB in bfloat16)
ROW_CHUNK = 8192  # rows of the embeddings and lm_head in float32 at a time (runtime/worker.py)
# GPTQ's working set per entry of an expert's input Gram matrix [hidden, hidden] (float32 Gram in act order, its
# damped reversed copy and float32 factor on the host, the feedback matrix, a weight's working copies). Before the
# nearest-plane form (float64 copies, an inverse factor) it measured 0.45 GiB alone at hidden 4096 (29 bytes an
# entry) while the W4A8 preset's expert groups at 235B width peaked 0.46 GiB over the estimate made with 29; kept
# at 42, with which they peaked within 1.4% of it (docs/benchmarks.md, "W4A8 rounding near its floor"). The next
# expert's Gram matrix and factor (8 bytes an entry), made in the prefetch thread while this one rounds, add to it
HESSIAN_BYTES_PER_ENTRY = 42 + 8
GiB = 1024**3


class Kind(Enum):
    """What a unit of work is."""

    IMAGES = "images"  # the vision tower's forward on a share of the calibration images (writes nothing)
    VISION = "vision"  # the whole vision tower, mergers included, quantized from every share's input ranges
    EMBED = "embed"  # the input embeddings
    LAYER = "layer"  # a decoder layer without its experts: attention, norms, and the router or the dense MLP
    EXPERTS = "experts"  # a group of a MoE layer's experts
    CARRIED = "carried"  # a share of the tensors the family carries unchanged (Qwen3.5's MTP head)
    HEAD = "head"  # the final norm and lm_head


@dataclass(frozen=True)
class Unit:
    kind: Kind
    layer: int = -1
    first_expert: int = 0
    stop_expert: int = 0
    share: int = 0  # images, carried: which share of the images (``image_share``) or tensors, of ``shares``
    shares: int = 1

    @property
    def name(self) -> str:
        """For people: "layer 3", "layer 3 experts 0-15", "vision", "images 1/2", "carried 1/13"."""
        if self.kind in (Kind.IMAGES, Kind.CARRIED):
            return f"{self.kind.value} {self.share + 1}/{self.shares}"
        experts = f" experts {self.first_expert}-{self.stop_expert - 1}" if self.kind is Kind.EXPERTS else ""
        return f"layer {self.layer}{experts}" if self.layer >= 0 else self.kind.value

    @property
    def id(self) -> str:
        """A file-name-safe identifier, stable across runs: "L003", "L003-experts-0000-0016", "vision",
        "images-1-of-2", "carried-1-of-13"."""
        if self.kind in (Kind.IMAGES, Kind.CARRIED):
            return f"{self.kind.value}-{self.share + 1}-of-{self.shares}"
        experts = f"-experts-{self.first_expert:04d}-{self.stop_expert:04d}" if self.kind is Kind.EXPERTS else ""
        return f"L{self.layer:03d}{experts}" if self.layer >= 0 else self.kind.value


def expert_groups(num_experts: int, group_size: int = DEFAULT_EXPERT_GROUP_SIZE) -> list[tuple[int, int]]:
    """``[(first, stop), ...]`` covering ``range(num_experts)`` in order."""
    return [(first, min(first + group_size, num_experts)) for first in range(0, num_experts, group_size)]


def image_share(costs: list[int], share: int, shares: int) -> list[int]:
    """The indexes, in order, of the samples in share ``share`` of ``shares`` of the vision forward: the costliest
    images first (``costs`` per sample, e.g. ``image_costs``), each to the share with the least cost so far, so the
    shares are as even as whole images allow. Which share an image is in changes no bit of the result."""
    loads, owner = [0] * shares, {}
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        least = min(range(shares), key=lambda s: (loads[s], s))
        owner[index], loads[least] = least, loads[least] + costs[index]
    return [index for index in range(len(costs)) if owner[index] == share]


def carried_share(sizes: list[int], share: int, shares: int) -> range:
    """The items (by index, in order) of share ``share`` of ``shares`` of the carried tensors, ``sizes`` their
    parameter counts: consecutive items, an item to the share its first parameter falls in when the total is cut in
    ``shares`` equal parts. The same for every actor and for the layout."""
    total, start, owners = sum(sizes), 0, []
    for size in sizes:
        owners.append(min(shares - 1, start * shares // max(total, 1)))
        start += size
    chosen = [i for i, owner in enumerate(owners) if owner == share]
    return range(chosen[0], chosen[-1] + 1) if chosen else range(0)


def carried_shares(config) -> int:
    """How many units carry the family's carried tensors (none for a family that carries nothing): each at most
    ``CARRIED_SHARE_PARAMS`` of them, so no actor holds the whole MTP head (12.3 GiB at Qwen3.5-397B) at once."""
    params = sizes_for(config.model_type).carried_param_count(config)
    return -(-params // CARRIED_SHARE_PARAMS)


def samples_of(unit: Unit, inputs, family, config) -> list[int]:
    """The samples whose images the images unit ``unit`` runs (the same on every actor and in the evaluator), by
    the vision tower's work per sample (``family.image_costs``)."""
    return image_share(family.image_costs(inputs, config), unit.share, unit.shares)


def plan_units(config, group_size: int = DEFAULT_EXPERT_GROUP_SIZE, image_shares: int = 1) -> list[Unit]:
    """Every unit of a model in plan order, of the kinds its family has (``FamilySizes.UNIT_KINDS``): the vision
    forward in ``image_shares`` shares of the images (one per actor: the tower's input ranges of the shares are
    merged exactly, by min and max, so the checkpoint is the same for any number), the vision tower, embeddings,
    each layer and its expert groups, the carried tensors' shares (``carried_shares``), head."""
    family = sizes_for(config.model_type)
    kinds = {Kind(kind) for kind in family.UNIT_KINDS}
    units = [Unit(Kind.IMAGES, share=s, shares=image_shares) for s in range(image_shares)] \
        if Kind.IMAGES in kinds else []
    units += [Unit(kind) for kind in (Kind.VISION, Kind.EMBED) if kind in kinds]
    tc = config.get_text_config()
    for layer_idx in range(tc.num_hidden_layers):
        units.append(Unit(Kind.LAYER, layer_idx))
        if family.is_moe_layer(tc, layer_idx):
            units += [Unit(Kind.EXPERTS, layer_idx, a, b) for a, b in expert_groups(tc.num_experts, group_size)]
    shares = carried_shares(config)
    return units + [Unit(Kind.CARRIED, share=s, shares=shares) for s in range(shares)] + [Unit(Kind.HEAD)]


def assign_units(plan: list[Unit], workers: int) -> list[int]:
    """The actor of each unit. Layer L goes to actor L mod N; the expert groups of layer L start on the next actor
    and go round, so every actor gets an even share of the experts and the sequential layer chain moves from actor
    to actor. Share s of the images goes to actor s; the vision tower to actor 0 and the embeddings (which need only
    the images' outputs) to actor 1, side by side; the head to the last actor (it needs no input: the Ray executor
    runs it while actor 0 has the vision tower and the first layer), and carried share s to the s-th actor counted
    back from the last (no input either)."""
    assignment = []
    for unit in plan:
        if unit.kind is Kind.IMAGES:
            assignment.append(unit.share % workers)
        elif unit.kind is Kind.CARRIED:
            assignment.append((workers - 1 - unit.share) % workers)
        elif unit.kind is Kind.VISION:
            assignment.append(0)
        elif unit.kind is Kind.EMBED:
            assignment.append(1 % workers)
        elif unit.kind is Kind.LAYER:
            assignment.append(unit.layer % workers)
        elif unit.kind is Kind.EXPERTS:
            group = unit.first_expert // max(1, unit.stop_expert - unit.first_expert)
            assignment.append((unit.layer + 1 + group) % workers)
        else:
            assignment.append(workers - 1)
    return assignment


# --- sizes and memory -----------------------------------------------------------------------------------------------

def unit_params(config, unit: Unit) -> int:
    """Parameters a unit works on (images: the tower it runs, which the vision unit of the same actor writes)."""
    tc, family = config.get_text_config(), sizes_for(config.model_type)
    if unit.kind in (Kind.IMAGES, Kind.VISION):
        return family.vision_param_count(config)
    if unit.kind is Kind.EMBED:
        return tc.vocab_size * tc.hidden_size
    if unit.kind is Kind.LAYER:
        return family.layer_param_count(config, unit.layer)
    if unit.kind is Kind.EXPERTS:
        return (unit.stop_expert - unit.first_expert) * family.expert_param_count(config)
    if unit.kind is Kind.CARRIED:  # an even share (the real shares are cut at whole tensors)
        return family.carried_param_count(config) // unit.shares
    return tc.vocab_size * tc.hidden_size + tc.hidden_size


def unit_linears(config, unit: Unit) -> dict[str, int]:
    """Weight parameters of each linear a unit quantizes per the recipe, by module name (embeddings and the head
    are always FLOAT: none)."""
    family = sizes_for(config.model_type)
    if unit.kind is Kind.VISION:
        return family.vision_linears(config)
    if unit.kind is Kind.LAYER:
        return family.layer_linears(config, unit.layer)
    if unit.kind is Kind.EXPERTS:
        return family.expert_linears(config, unit.layer, unit.first_expert, unit.stop_expert)
    return {}


def source_bytes_per_param(raw_config: dict) -> int:
    """Bytes of one source parameter: the checkpoint's float dtype as config.json states it."""
    return sizes_for(raw_config.get("model_type")).source_bytes(raw_config)


QuantChoice = tuple[str, Optional["QSpec"]]  # a linear's quant type and the recipe's weight qconfig for it


def unit_quant_params(config, unit: Unit, recipe: Recipe) -> dict[QuantChoice, int]:
    """Weight parameters of a unit's linears by what the recipe does to them (quant type, weight qconfig): what its
    output size and its rounding time depend on, looked up once per linear (a 235B plan has 36k of them)."""
    from dist_quant.schemes import FLOAT

    totals: dict[QuantChoice, int] = {}
    for name, params in unit_linears(config, unit).items():
        processor = recipe.linear_quant(name)  # Recipe.quant_type's lookup, done once for both
        choice = (processor.quant_type, processor.weight) if processor is not None else (FLOAT, None)
        totals[choice] = totals.get(choice, 0) + params
    return totals


def unit_output_bytes(unit: Unit, quant_params: dict[QuantChoice, int], source_bytes: int, params: int) -> int:
    """Checkpoint bytes of a unit of ``params`` parameters whose linears are ``quant_params``
    (``unit_quant_params``): each linear at its scheme's bytes per parameter, the rest in the source dtype (scales
    and offsets are negligible)."""
    from dist_quant import schemes

    if unit.kind is Kind.IMAGES:
        return 0
    output = (params - sum(quant_params.values())) * source_bytes
    for (quant_type, _), linear_params in quant_params.items():
        output += linear_params * schemes.get(quant_type).bytes_per_param(source_bytes)
    return int(output)


def unit_activation_bytes(config, unit: Unit, calib_tokens: int) -> int:
    """Float32 activations a unit holds: a few copies of the token stream (input, stream, MLP input, partial sum)."""
    tc = config.get_text_config()
    if unit.kind is Kind.IMAGES:  # patches before the 2x2 merge, a few copies, plus one image's attention scores
        return 8 * calib_tokens * config.vision_config.hidden_size * COMPUTE_BYTES // unit.shares
    if unit.kind is Kind.VISION:  # every image's embeddings and deepstack features
        return 4 * calib_tokens * tc.hidden_size * COMPUTE_BYTES
    if unit.kind in (Kind.HEAD, Kind.CARRIED):
        return 0
    return 5 * calib_tokens * tc.hidden_size * COMPUTE_BYTES


def unit_hessian_bytes(config, unit: Unit, recipe: Recipe) -> int:
    """What rounding by GPTQ adds while an expert group runs (the Gram matrices of the expert being rounded and of
    the next one, with their factors): 0 when the recipe's scheme for the group's experts does not ask for them."""
    if unit.kind is not Kind.EXPERTS:
        return 0
    first = Unit(Kind.EXPERTS, unit.layer, unit.first_expert, unit.first_expert + 1)  # the group's first expert
    for name in unit_linears(config, first):
        if recipe.needs_hessian(name):
            tc = config.get_text_config()
            return HESSIAN_BYTES_PER_ENTRY * tc.hidden_size ** 2 + 16 * tc.moe_intermediate_size ** 2
    return 0


def unit_peak_bytes(config, unit: Unit, params: int, output: int, source_bytes: int, calib_tokens: int,
                    prefetched_params: int, *, object_store: bool = False) -> int:
    """What a worker holds while it runs ``unit``: the unit's float32 weights (the embeddings and lm_head a chunk
    of rows at a time, read, rotated and converted), its activations, and the larger of the next expert group being
    read (its stored weights and the float32 ones they are converted into; the stored copy is freed once converted)
    and the unit's output, which grows until the unit ends, beside that group's float32 weights; with
    ``object_store`` (a Ray actor), the object store's pages a layer or expert unit maps. Measured against the
    resident memory of every unit at Qwen3-VL-235B-A22B and 30B-A3B widths: docs/benchmarks.md, "Real width"."""
    tc = config.get_text_config()
    if unit.kind in (Kind.EMBED, Kind.HEAD):
        weights = 3 * min(ROW_CHUNK, tc.vocab_size) * tc.hidden_size * COMPUTE_BYTES
    elif unit.kind is Kind.CARRIED:  # read as stored and written as read: only its output is held
        weights = 0
    else:
        weights = params * COMPUTE_BYTES
    reading = prefetched_params * (COMPUTE_BYTES + source_bytes)
    held = prefetched_params * COMPUTE_BYTES + output
    mapped = 0
    if object_store and unit.kind in (Kind.LAYER, Kind.EXPERTS):
        mapped = OBJECT_STORE_STREAMS * calib_tokens * tc.hidden_size * COMPUTE_BYTES
    return weights + max(reading, held) + unit_activation_bytes(config, unit, calib_tokens) + mapped


@dataclass
class ActorPlan:
    index: int
    units: list[Unit] = field(default_factory=list)
    read_bytes: int = 0
    peak_bytes: int = 0  # the largest of unit_peaks, plus the runtime's own overhead
    unit_peaks: list[int] = field(default_factory=list)  # unit_peak_bytes of each of units


@dataclass
class QuantPlan:
    units: list[Unit]
    assignment: list[int]
    actors: list[ActorPlan]
    source_bytes: int
    output_bytes: int
    unit_output_bytes: list[int]  # per unit, in plan order
    parts: int
    card_bytes: int
    unit_quant_params: list[dict[QuantChoice, int]]  # per unit, in plan order

    def fits(self, actor: ActorPlan) -> bool:
        return actor.peak_bytes <= self.card_bytes


def unit_read_params(config, unit: Unit) -> int:
    """Source parameters a unit reads: the vision unit quantizes the tower its actor's share of the images ran on
    (share 0 is on the vision unit's actor), so only the images units read it."""
    return 0 if unit.kind is Kind.VISION else unit_params(config, unit)


def build_plan(config, raw_config: dict, workers: int, *, group_size: int = DEFAULT_EXPERT_GROUP_SIZE,
               part_file_size_gb: float = 4, calib_tokens: int = DEFAULT_CALIB_TOKENS,
               card_memory_gb: float = 64, recipe: Optional[Recipe] = None) -> QuantPlan:
    """Units, assignment, per-actor bytes read and peak memory estimate, output size (by the recipe's schemes;
    by default the W8A8 preset of the model's family) and part count."""
    from dist_quant.presets import DEFAULT_QUANT_TYPE, default_model_type, find_preset
    from dist_quant.recipe import load_recipe

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    units = plan_units(config, group_size, workers)
    assignment = assign_units(units, workers)
    dtype_bytes = source_bytes_per_param(raw_config)
    if recipe is None:
        recipe = load_recipe(find_preset(default_model_type(raw_config), DEFAULT_QUANT_TYPE).recipe)
    params = [unit_params(config, u) for u in units]
    params_of = dict(zip(units, params))
    actors = [ActorPlan(i) for i in range(workers)]
    for unit, actor_idx in zip(units, assignment):
        actors[actor_idx].units.append(unit)
        actors[actor_idx].read_bytes += unit_read_params(config, unit) * dtype_bytes
    quant_params = [unit_quant_params(config, u, recipe) for u in units]
    outputs = [unit_output_bytes(u, q, dtype_bytes, n) for u, q, n in zip(units, quant_params, params)]
    output_of = dict(zip(units, outputs))
    distributed = workers > 1  # one worker is the single card, without Ray (the quant command's rule)
    for actor in actors:
        actor.unit_peaks = [unit_peak_bytes(config, u, params_of[u], output_of[u], dtype_bytes, calib_tokens,
                                            next((params_of[n] for n in actor.units[i + 1:] if n.kind is Kind.EXPERTS),
                                                 0), object_store=distributed) + unit_hessian_bytes(config, u, recipe)
                            for i, u in enumerate(actor.units)]
        actor.peak_bytes = max(actor.unit_peaks, default=0) + RUNTIME_OVERHEAD
    source = sum(n for u, n in zip(units, params) if u.kind is not Kind.IMAGES) * dtype_bytes
    output = sum(outputs)
    part_bytes = part_file_size_gb * GiB  # msModelSlim's part_file_size 'GB' are GiB
    parts = 1 if part_bytes <= 0 else max(1, -(-output // int(part_bytes)))
    return QuantPlan(units, assignment, actors, source, output, outputs, parts, int(card_memory_gb * GiB),
                     quant_params)


def format_plan(plan: QuantPlan, title: str) -> str:
    kinds = {}
    for unit in plan.units:
        kinds[unit.kind.value] = kinds.get(unit.kind.value, 0) + 1
    lines = [
        title,
        f"  source {plan.source_bytes / GiB:.1f} GiB; units: " + ", ".join(f"{n} {k}" for k, n in kinds.items()),
        f"  output ~{plan.output_bytes / GiB:.1f} GiB in {plan.parts} part file(s)",
        "",
        f"  {'actor':>5} {'units':>6} {'expert groups':>13} {'reads GiB':>9} {'peak mem GiB (est.)':>19}  fits card",
    ]
    for actor in plan.actors:
        groups = sum(u.kind is Kind.EXPERTS for u in actor.units)
        lines.append(f"  {actor.index:>5} {len(actor.units):>6} {groups:>13} {actor.read_bytes / GiB:>9.1f} "
                     f"{actor.peak_bytes / GiB:>19.1f}  {'yes' if plan.fits(actor) else 'NO'}"
                     f" ({plan.card_bytes / GiB:.0f} GiB)")
    return "\n".join(lines)
