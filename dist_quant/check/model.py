"""What config.json says vLLM builds for a Qwen3-VL-MoE checkpoint, from the transformers modules the checkpoint
keys follow (``models/qwen3_vl_moe.py``): every linear (experts per expert) with its shape and tensor-parallel split,
every other parameter, the layers a quant config is looked up for, and the fused groups. Shared by the rules of
every format."""

from __future__ import annotations

from dataclasses import dataclass


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

    def __init__(self, config: dict):
        from dist_quant.models import qwen3_vl_moe as family

        self.family = family
        self.config = family.load_config(config)
        tc = self.config.text_config
        shapes = family.expected_tensors(self.config)
        names = dict(family.vision_linears(self.config))
        for layer in range(tc.num_hidden_layers):
            names.update(family.layer_linears(self.config, layer))
        self.linears: dict[str, Linear] = {}
        for name in names:
            out, inp = shapes[f"{name}.weight"]
            split = "row" if family.splits_input(name) else ("replicated" if name.endswith(".mlp.gate") else "column")
            self.linears[name] = Linear(name, out, inp, f"{name}.bias" in shapes, split=split)
        self.moe_layers = [i for i in range(tc.num_hidden_layers) if family.is_moe_layer(tc, i)]
        self.num_experts = tc.num_experts
        self.fused_expert_keys = {k for k, shape in shapes.items() if shape is None}
        for layer in self.moe_layers:
            for expert in range(tc.num_experts):
                for proj, (out, inp) in zip(family.EXPERT_PROJS, family.expert_shapes(self.config)):
                    name = family.expert_key(layer, expert, proj)
                    self.linears[name] = Linear(name, out, inp, False, True, "row" if proj == "down_proj" else
                                                "column", proj)
        linear_keys = {f"{n}.{s}" for n in names for s in ("weight", "bias")}
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
