"""The compressed-tensors format: what vLLM's ``compressed-tensors`` quantization loads (on GPUs), and vLLM Ascend's
``AscendCompressedTensorsConfig`` for symmetric schemes (docs/compressed-tensors-facts.md has the sources).

Files: Hugging Face weight parts ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``, and the
source's config.json with a ``quantization_config`` laid out as the compressed-tensors library (0.20.1) writes it:
one config group per quant type (named after it), every group ``int-quantized`` (int8 tensors; W4A8's int4 codes
unpacked, one per int8, as the library itself writes int4-weight, int8-activation schemes), each linear of a type
named in its group's ``targets`` (a layer's experts by one regex when they all share the type), every float module in
``ignore``. config.json is the marker: moved in last. QuaRot and smoothing are folded into the weights, so there is no
side file and no online transform.

Targets and ignore entries are read back as vLLM matches them (``Matcher``: a literal is a checkpoint name, a
``re:`` regex is matched against the name vLLM's model class gives the module, ``vllm_name`` with the family's
``SERVED_PREFIXES``), here for ``published_types`` and in the loader check (check/compressed_tensors.py), which
imports them from this module.

Per linear ``[out, in]`` (symmetric per-channel int weights; ``weight_zero_point`` is not written, as the library
drops it for symmetric weights):
- W8A8 (static): ``weight`` int8, ``weight_scale`` float32 ``[out, 1]``, ``input_scale`` float32 ``[1]``,
  ``input_zero_point`` int8 ``[1]`` (asymmetric per-tensor input: ``x_q = clamp(round(x / s + zp))``, our offset as
  is), ``bias`` as a float tensor. ``weight_scale`` is ``deq_scale / input_scale`` in float32: the scheme's roles hold
  msModelSlim's fused ``deq_scale``; the quotient is the per-channel scale to within one float32 rounding;
- W8A8_DYNAMIC: ``weight`` int8, ``weight_scale`` float32 ``[out, 1]``, ``bias`` (input per token, symmetric);
- W4A8_DYNAMIC (experts): ``weight`` int8 ``[out, in]`` holding codes in [-8, 7], ``weight_scale`` float32 ``[out, 1]``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from dist_quant.checkpoint.formats import drop_config_keys, hub_part_names
from dist_quant.checkpoint.regexes import SECONDS_PER_PATTERN, compile_error, match_all

if TYPE_CHECKING:  # `dist-quant check` imports this module: torch and the schemes only where a checkpoint is written
    import torch

NAME = "compressed-tensors"
QUANT_METHOD = "compressed-tensors"
LIBRARY_VERSION = "0.20.1"  # the compressed-tensors release whose layout is written (tests/test_compressed_tensors.py)
WEIGHTS_PREFIX = "model"
INDEX_FILE = f"{WEIGHTS_PREFIX}.safetensors.index.json"
MARKER_FILE = "config.json"  # its quantization_config describes the checkpoint
OPTIONAL_DIR = "optional"  # never written (no side file)
HIJACKING_CONFIG_KEYS = ("quantization_config", "compression_config")  # vLLM reads text_config's too
FORMAT = "int-quantized"

_INT8_CHANNEL = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "channel",
                 "dynamic": False}
_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token", "dynamic": True}
# the compressed-tensors QuantizationArgs of each quant type: (weights, input_activations)
ARGS = {
    "W8A8": (_INT8_CHANNEL, {**_TOKEN, "symmetric": False, "strategy": "tensor", "dynamic": False}),
    "W8A8_DYNAMIC": (_INT8_CHANNEL, _TOKEN),
    "W4A8_DYNAMIC": ({**_INT8_CHANNEL, "num_bits": 4}, _TOKEN),
}
_EXPERT = re.compile(r".*\.layers\.(?P<n>\d+)\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)$")
LINEAR_CLASS_TARGETS = ("linear", "linearbase")  # a class target every vLLM linear (and MoE layer) matches


def part_names(count: int) -> list[str]:
    return hub_part_names(WEIGHTS_PREFIX, count)


def linear_entries(name: str, quant_type: str, roles: dict[str, torch.Tensor],
                   model_dtype: torch.dtype) -> list[tuple[str, torch.Tensor, str]]:
    """(key, tensor, quant type) of the linear ``name`` from its scheme's roles."""
    import torch

    from dist_quant.algorithms.int4 import unpack_int4_rows
    from dist_quant.schemes import FLOAT

    if quant_type == FLOAT:
        return [(f"{name}.{role}", tensor, FLOAT) for role, tensor in roles.items()]
    if quant_type not in ARGS:
        raise ValueError(f"{name}: the compressed-tensors format has no layout for {quant_type}")
    weight = roles["weight"]
    if quant_type == "W8A8":
        scale = (roles["deq_scale"].to(torch.float32) / roles["input_scale"].to(torch.float32))[:, None]
        tensors = {"weight": weight, "weight_scale": scale.contiguous(),
                   "input_scale": roles["input_scale"].to(torch.float32),
                   "input_zero_point": roles["input_offset"].round().to(torch.int8)}
    else:
        if quant_type == "W4A8_DYNAMIC":
            weight = unpack_int4_rows(weight)
        tensors = {"weight": weight, "weight_scale": roles["weight_scale"].to(torch.float32).reshape(-1, 1)}
    entries = [(f"{name}.{role}", tensor, quant_type) for role, tensor in tensors.items()]
    if "bias" in roles:
        entries.append((f"{name}.bias", roles["bias"], FLOAT))
    return entries


def modules_by_type(types: dict[str, str]) -> dict[str, str]:
    """The quant type of each module, from the types of its tensors (a module is its ``.weight``'s type)."""
    return {key[:-len(".weight")]: t for key, t in types.items() if key.endswith(".weight")}


def _expert_layer(module: str) -> Optional[str]:
    """The layer number of an expert projection's module name, None for any other module."""
    match = _EXPERT.match(module)
    return match.group("n") if match else None


def _targets(modules: list[str], type_of: dict[str, str]) -> list[str]:
    """A group's targets: each module's name, but one regex for a layer's experts when all of them share the group
    (it starts with ``.*``: vLLM maps literal names to its own, not regexes, and such a regex matches both)."""
    experts = Counter(n for n in map(_expert_layer, type_of) if n is not None)
    mine = Counter(n for n in map(_expert_layer, modules) if n is not None)
    whole = {n for n, count in mine.items() if count == experts[n]}
    return ([m for m in modules if _expert_layer(m) not in whole]
            + [rf"re:.*layers\.{n}\.mlp\.experts\.\d+\.(gate|up|down)_proj$" for n in sorted(whole, key=int)])


def vllm_name(module: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    """A checkpoint module name (``lm_head`` included) as vLLM names it, by ``prefixes`` = the family's
    SERVED_PREFIXES, (checkpoint key prefix, vLLM's name for it) pairs (other names unchanged)."""
    for hf, vllm in prefixes:
        if (module + ".").startswith(hf):
            return (vllm + (module + ".")[len(hf):])[:-1]
    return module


class Matcher:
    """vLLM's matching of a layer against targets or ignore entries (compressed_tensors/utils.py
    find_matched_target, should_ignore_layer): a literal is a checkpoint (HF) name, which vLLM maps to its own; a
    ``re:`` regex is not mapped, so it is matched (from the start) against the vLLM name; a class name such as
    "Linear" matches every linear layer by class. The regexes are run by :func:`resolve`, in bounded time; each that
    does not compile or does not finish is a problem naming it, and the others still apply. ``prefixes``: the
    family's SERVED_PREFIXES (:func:`vllm_name`)."""

    def __init__(self, entries: list, where: str = "quantization_config",
                 prefixes: tuple[tuple[str, str], ...] = ()):
        entries = [e for e in entries if isinstance(e, str)]
        self.prefixes = prefixes
        self.every_linear = any(e.lower() in LINEAR_CLASS_TARGETS for e in entries)
        self.literals = {e for e in entries if not e.startswith("re:")}
        self.where = where  # the config field, for the problems
        self.patterns: dict[str, str] = {}  # entry -> its regex, for those Python's re compiles
        self.problems: list[str] = []
        for entry in dict.fromkeys(e for e in entries if e.startswith("re:")):
            error = compile_error(entry[3:])
            if error is None:
                self.patterns[entry] = entry[3:]
            else:
                self.problems.append(f"{entry!r} in config.json {where} is not a regular expression ({error}): "
                                     "vLLM's re.match raises at load; fix or remove it")
        self.matched: Optional[set[str]] = None  # the vLLM names its regexes match, once resolved

    def resolve(self, found: dict[str, Optional[frozenset[int]]], names: list[str]) -> None:
        """Take each regex's matches among ``names`` (vLLM names) from ``found`` (by regex; None: it did not
        finish)."""
        self.matched = set()
        for entry, pattern in self.patterns.items():
            hits = found.get(pattern)
            if hits is None:
                self.problems.append(f"{entry!r} in config.json {self.where} did not finish matching the "
                                     f"layer names in {SECONDS_PER_PATTERN:g} s with Python's re: it backtracks "
                                     "catastrophically and vLLM would hang at load; write it without nested repeats")
            else:
                self.matched.update(names[i] for i in hits)

    def __call__(self, hf: str) -> bool:
        """Whether the layer ``hf`` matches (a matcher with regexes is resolved first: :func:`resolve_regexes`)."""
        if self.every_linear or hf in self.literals:
            return True
        if self.matched is None and self.patterns:
            raise RuntimeError("a Matcher with regexes is called before resolve_regexes ran them")
        return vllm_name(hf, self.prefixes) in (self.matched or ())


def resolve_regexes(matchers: list[Matcher], names: list[str]) -> None:
    """Every matcher's regexes run once against ``names`` (vLLM names), each distinct pattern once."""
    patterns = list(dict.fromkeys(p for m in matchers for p in m.patterns.values()))
    found = dict(zip(patterns, match_all(patterns, names)))
    for matcher in matchers:
        matcher.resolve(found, names)


def quantization_config(types: dict[str, str]) -> dict:
    """config.json's ``quantization_config`` for a checkpoint of these tensor types (ModelCompressor.update_config's
    layout, without the fields older library versions refuse)."""
    from dist_quant.schemes import FLOAT

    type_of = modules_by_type(types)
    groups = {}
    for quant_type, (weights, inputs) in ARGS.items():
        modules = [m for m, t in type_of.items() if t == quant_type]
        if modules:
            groups[quant_type] = {"targets": _targets(modules, type_of), "weights": dict(weights),
                                  "input_activations": dict(inputs), "output_activations": None, "format": FORMAT}
    return {"config_groups": groups, "format": FORMAT, "global_compression_ratio": None,
            "ignore": sorted(m for m, t in type_of.items() if t == FLOAT), "kv_cache_scheme": None,
            "quant_method": QUANT_METHOD, "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": LIBRARY_VERSION}


def description_files(types: dict[str, str], optional: Optional[dict]) -> dict[str, dict]:
    return {}  # the description is config.json's quantization_config (rewrite_config)


def rewrite_config(config: dict, types: dict[str, str]) -> dict:
    config = drop_config_keys(config, HIJACKING_CONFIG_KEYS)
    config["quantization_config"] = quantization_config(types)
    return config


def published_types(save_path: Path) -> dict[str, str]:
    """The quant type of each tensor of a published checkpoint, from its index and quantization_config (the group
    names are the quant types; a module is in the first group whose targets match it, as vLLM matches them:
    ``Matcher``, with the names vLLM's model class of config.json's family gives the modules)."""
    from dist_quant.models.family import sizes_for
    from dist_quant.schemes import FLOAT

    save_path = Path(save_path)
    config = json.loads((save_path / MARKER_FILE).read_text())
    prefixes = sizes_for(config.get("model_type"), str(save_path / MARKER_FILE)).SERVED_PREFIXES
    groups = config["quantization_config"].get("config_groups", {})
    matchers = [(name, Matcher(group.get("targets", []), prefixes=prefixes)) for name, group in groups.items()]
    keys = json.loads((save_path / INDEX_FILE).read_text())["weight_map"]
    modules = list(dict.fromkeys(key.rpartition(".")[0] for key in keys))
    # bounded: a regex that hangs matches none
    resolve_regexes([match for _, match in matchers], [vllm_name(m, prefixes) for m in modules])
    group_of = {m: next((name for name, match in matchers if match(m)), None) for m in modules}
    types = {}
    for key in keys:
        module, _, role = key.rpartition(".")
        group = group_of[module]
        types[key] = FLOAT if group is None or role == "bias" else group
    return types


def rotation_file(rotation: torch.Tensor) -> None:
    return None  # the rotation is folded into the weights; this format has no side file for it


def is_published(save_path: Path) -> bool:
    """A finished checkpoint of this format is in ``save_path``: its config.json carries a compressed-tensors
    quantization_config (every Hugging Face model has a config.json: a float model's folder is not one)."""
    from dist_quant.checkpoint.model_folder import JSON_FILE_ERRORS, load_json_file

    try:  # a FIFO, a huge or a deeply nested config.json is no checkpoint of this format, and must not hang or crash
        config = load_json_file(Path(save_path) / MARKER_FILE)
    except JSON_FILE_ERRORS:
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def is_own_file(name: str) -> bool:
    return name == INDEX_FILE or (name.startswith(WEIGHTS_PREFIX) and name.endswith(".safetensors"))
