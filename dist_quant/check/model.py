"""What config.json says vLLM builds for a checkpoint of one of dist-quant's model families, from the family's
closed-form shapes of the transformers modules the checkpoint keys follow (its torch-free sizes module, found by
config.json's ``model_type``): every linear (experts per expert) with its shape and tensor-parallel split, every
other parameter, the layers a quant config is looked up for, the fused groups, and the names vLLM's model class
gives the checkpoint's keys (:func:`served_prefixes`). Shared by the rules of every format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from dist_quant.errors import CheckpointError, reason
from dist_quant.models.family import sizes_for

W4A8_SCALE_BIAS_CHUNKS = 16  # W4A8 down_proj.scale_bias [H, 16], split on dim 1 under TP (vllm-ascend w4a8.py)
# expert linears a check lists without looking at the folder: 1.8x Qwen3-VL-235B's 36096; beyond, one per tensor
# the folder holds (each needs its weight), so a config claiming 1024 layers x 16384 experts costs no more than the
# folder it comes with
FREE_EXPERT_LINEARS = 2**16
Prefixes = tuple[tuple[str, str], ...]  # a family's SERVED_PREFIXES: (checkpoint key prefix, vLLM's name for it)


def hf_name(key: str, prefixes: Prefixes) -> str:
    """A key in vLLM's names back in the checkpoint's (other keys unchanged)."""
    for hf, vllm in prefixes:
        if key.startswith(vllm):
            return hf + key[len(vllm):]
    return key


def served_prefixes(family) -> Prefixes:
    """(checkpoint key prefix, vLLM's name for it) of every top-level module the family's vLLM model loads keys
    under: its SERVED_PREFIXES, or, for a family whose vLLM model names its modules as the checkpoint does (it gives
    none), the first name of each of its keys, unchanged (``model.``, ``lm_head.``)."""
    if family.SERVED_PREFIXES:
        return tuple(family.SERVED_PREFIXES)
    keys = (family.EMBED_KEY, family.NORM_KEY, family.LM_HEAD_KEY, family.layer_prefix(0), family.VISUAL or "")
    return tuple((root, root) for root in dict.fromkeys(key.split(".")[0] + "." for key in keys if key))


@dataclass(frozen=True)
class Linear:
    name: str
    out: int
    inp: int
    bias: bool
    expert: bool = False
    split: str = "column"  # how TP splits it: column (out), row (in), replicated
    proj: str = ""  # an expert's projection


class Model:
    """What config.json says vLLM builds: every linear (experts per expert), every other parameter, the layers
    looked up in the description and the fused groups."""

    def __init__(self, config: dict, tensor_count: Optional[int] = None):
        """``config``: config.json's content, whose ``model_type`` picks the family (CheckpointError for one
        dist-quant has none for). ``tensor_count``: the tensors of the folder checked, when there is one; a config
        with more expert linears than :func:`expert_linear_bound` allows for it is refused (CheckpointError) before
        any is listed."""
        family = self.family = sizes_for(config.get("model_type"))
        self.config = family.load_checked_sizes(config)
        tc = self.config.get_text_config()
        self.moe_layers = [i for i in range(tc.num_hidden_layers) if family.is_moe_layer(tc, i)]
        count = len(self.moe_layers) * tc.num_experts * len(family.EXPERT_PROJS)
        if tensor_count is not None and count > expert_linear_bound(tensor_count):
            raise CheckpointError(f"config.json: {len(self.moe_layers)} MoE layers x {tc.num_experts} experts, "
                                  f"{count} expert linears for {tensor_count} tensors: not this checkpoint's config "
                                  "(each linear needs its weight); use the config.json it was written with")
        shapes = family.expected_tensors(self.config)
        names = dict(family.vision_linears(self.config))
        for layer in range(tc.num_hidden_layers):
            names.update(family.layer_linears(self.config, layer))
        self.linears: dict[str, Linear] = {}
        for name in names:
            out, inp = shapes[f"{name}.weight"]
            split = ("row" if family.splits_input(name) else
                     "replicated" if name.endswith(tuple(family.REPLICATED_LINEARS)) else "column")
            self.linears[name] = Linear(name, out, inp, f"{name}.bias" in shapes, split=split)
        self.num_experts = tc.num_experts
        self.fused_expert_keys = {k for k, shape in shapes.items() if shape is None}
        for layer in self.moe_layers:
            for expert in range(tc.num_experts):
                for proj, (out, inp) in zip(family.EXPERT_PROJS, family.expert_shapes(self.config)):
                    name = family.expert_key(layer, expert, proj)
                    self.linears[name] = Linear(name, out, inp, False, True,
                                                "row" if family.splits_input(name) else "column", proj)
        # a family whose source stores its experts per expert lists their weights among its tensors: linears too
        linear_keys = {f"{n}.{s}" for n in self.linears for s in ("weight", "bias")}
        self.floats = {k: s for k, s in shapes.items() if s is not None and k not in linear_keys}
        self.embeddings = (family.EMBED_KEY, family.LM_HEAD_KEY)
        self.groups: list[tuple[str, ...]] = []  # fused groups of non-expert linears
        for layer in range(tc.num_hidden_layers):
            prefix = family.layer_prefix(layer)
            for group in family.FUSED_GROUPS:
                members = tuple(f"{prefix}.{m}" for m in group)
                if all(m in self.linears and not self.linears[m].expert for m in members):
                    self.groups.append(members)

    def expert0(self, layer: int) -> tuple[str, ...]:
        return tuple(self.family.expert_key(layer, 0, p) for p in self.family.EXPERT_PROJS)

    def lookups(self) -> list[tuple[str, str]]:
        """(module, layer kind) of every layer vLLM Ascend looks up in the description: each non-expert linear
        (a fused group shard by shard), the router, and expert 0's projections for each MoE layer."""
        found = [(n, "linear") for n, lin in self.linears.items() if not lin.expert]
        for layer in self.moe_layers:
            router = f"{self.family.layer_prefix(layer)}.mlp.gate"
            if router not in self.linears:  # transformers 5.x: a router module, not an nn.Linear
                found.append((router, "linear"))
            found += [(n, "moe") for n in self.expert0(layer)]
        return found


def expert_linear_bound(tensor_count: int) -> int:
    """The most expert linears a config may describe for a folder holding ``tensor_count`` tensors: each linear
    needs at least its weight, so a config beyond that cannot describe the folder, and listing its linears (one
    object per expert and projection, in every rule) would cost minutes and gigabytes for nothing."""
    return FREE_EXPERT_LINEARS + tensor_count


def model_problem(error: Exception) -> str:
    """The violation line for a config no :class:`Model` is built from: the family's refusals (and an unknown
    model_type) name config.json and the fields and say what to do; anything else is a config whose sizes the
    family could not compute with."""
    if isinstance(error, CheckpointError):
        return str(error)
    return f"config.json does not describe a model vLLM can build ({reason(error)})"


def tp_violations(model: Model, tp: int, is_w4a8: Callable[[str], bool]) -> list[str]:
    """What a tensor-parallel size of ``tp`` cannot split: the family's own (attention heads, kv heads, a vision
    tower's heads: ``tp_errors``), then every linear's split dimension (vLLM's Column/RowParallelLinear and FusedMoE
    assert divisibility; vLLM Ascend's W4A8 MoE splits the 16 scale_bias chunks of down_proj):
    docs/ascend-loader-rules.md R17. ``is_w4a8`` says which experts are int4."""
    bad = list(model.family.tp_errors(model.config, tp))
    for name, lin in model.linears.items():
        if lin.expert and not name.split(".experts.")[1].startswith("0."):
            continue  # every expert has expert 0's shapes
        if lin.split == "column" and lin.out % tp or lin.split == "row" and lin.inp % tp:
            bad.append(f"{name} [{lin.out}, {lin.inp}] ({lin.split}-parallel)")
        if lin.expert and is_w4a8(name):
            if W4A8_SCALE_BIAS_CHUNKS % tp and lin.proj == "down_proj":
                bad.append(f"{name}.scale_bias [{lin.out}, 16]: 16 chunks")
            if lin.proj == "gate_proj" and (lin.out // tp) % 2:
                bad.append(f"{name}: {lin.out}/{tp} rows per rank, packed two per byte")
    return bad
