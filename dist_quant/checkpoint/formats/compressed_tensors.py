"""The compressed-tensors format: what vLLM's ``compressed-tensors`` quantization loads (on GPUs), and vLLM Ascend's
``AscendCompressedTensorsConfig`` for symmetric schemes (docs/compressed-tensors-facts.md has the sources).

Files: Hugging Face weight parts ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``, and the
source's config.json with a ``quantization_config`` laid out as the compressed-tensors library (0.20.1) writes it:
one config group per quant type (named after it) with the library's format for it (``int-quantized`` for the int8
schemes, W4A8's int4 codes unpacked one per int8 as the library itself writes int4-weight, int8-activation schemes;
``mxfp8-quantized`` for W8A8_MXFP8) and a top-level format that is the groups' one, or ``mixed-precision`` when they
differ; each linear of a type named in its group's ``targets`` (a layer's experts by one regex when they all share
the type), every float module in ``ignore``. config.json is the marker: moved in last. QuaRot and smoothing are
folded into the weights, so there is no side file and no online transform.

Targets and ignore entries are read back as vLLM matches them (``Matcher``: a literal is a checkpoint name, a
``re:`` regex is matched against the name vLLM's model class gives the module, ``vllm_name`` with the family's
``SERVED_PREFIXES``), here for ``published_types`` and in the loader check (check/compressed_tensors.py), which
imports them from this module.

Each group's QuantizationArgs are derived from its scheme's qconfig sides (``quantization_args``: element type and
bits, scope, symmetry), and each linear's tensors from what its scheme made (symmetric weights;
``weight_zero_point`` is not written, as the library drops it for symmetric weights). Integer schemes: ``weight``
int8 ``[out, in]`` (int4 codes one per int8, in [-8, 7]), ``weight_scale`` float32 ``[out, 1]``, and for a static
activation quantization (W8A8) ``input_scale`` float32 ``[1]`` and ``input_zero_point`` int8 ``[1]`` (asymmetric
per-tensor input: ``x_q = clamp(round(x / s + zp))``). MXFP8 (the library's MXFP8 preset, served by upstream vLLM's
``CompressedTensorsW8A8Mxfp8``): ``weight`` float8_e4m3fn ``[out, in]`` and ``weight_scale`` uint8
``[out, ceil(in/32)]``, each byte a block's exponent + 127 (the library's ``compress_mx_scale``), the same elements
and scales as the ascendv1 checkpoint of the run. ``bias`` as a float tensor.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from dist_quant.checkpoint.formats.common import drop_config_keys, hub_part_names
from dist_quant.checkpoint.regexes import SECONDS_PER_PATTERN, compile_error, match_all

if TYPE_CHECKING:  # `dist-quant check` imports this module: torch and the schemes only where a checkpoint is written
    import torch

    from dist_quant.schemes import LinearSpec, QSpec, QuantizedLinear

NAME = "compressed-tensors"
SAVER = "compressed_tensors"
CLI_NAME = "compressed-tensors"
CHECK_RULES = "dist_quant.check.compressed_tensors"
QUANT_METHOD = "compressed-tensors"
LIBRARY_VERSION = "0.20.1"  # the compressed-tensors release whose layout is written (tests/test_compressed_tensors.py)
WEIGHTS_PREFIX = "model"
INDEX_FILE = f"{WEIGHTS_PREFIX}.safetensors.index.json"
MARKER_FILE = "config.json"  # its quantization_config describes the checkpoint
OPTIONAL_DIR = "optional"  # never written (no side file)
HIJACKING_CONFIG_KEYS = ("quantization_config", "compression_config")  # vLLM reads text_config's too
INT_FORMAT, MX_FORMAT = "int-quantized", "mxfp8-quantized"  # the library's CompressionFormat of a group
MIXED_FORMAT = "mixed-precision"  # the top-level format of a checkpoint whose groups have different ones
MX_SCALE_DTYPE = "torch.uint8"  # an MX group's scale_dtype, as the library serializes it: E8M0 bytes

# a qconfig dtype -> (QuantizationArgs type, num_bits, the group's format)
_ELEMENTS = {"int8": ("int", 8, INT_FORMAT), "int4": ("int", 4, INT_FORMAT), "mxfp8": ("float", 8, MX_FORMAT)}
# a qconfig scope -> (strategy, dynamic as an activation side)
_STRATEGIES = {"per_channel": ("channel", False), "per_token": ("token", True), "per_tensor": ("tensor", False),
               "per_block": ("group", True)}
_EXPERT = re.compile(r".*\.layers\.(?P<n>\d+)\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)$")
LINEAR_CLASS_TARGETS = ("linear", "linearbase")  # a class target every vLLM linear (and MoE layer) matches


def part_names(count: int) -> list[str]:
    return hub_part_names(WEIGHTS_PREFIX, count)


def quantization_args(side: QSpec, activation: bool) -> dict:
    """compressed-tensors' QuantizationArgs (as the library writes them) for one side of a scheme's qconfig, or
    ValueError for a side this format has no layout for. An MX side is the library's MXFP8 preset: float 8-bit
    elements in groups of 32 with uint8 (E8M0) scales; its activations are quantized by the engine at run time."""
    from dist_quant.schemes.w8a8_mxfp8 import MX_BLOCK

    if side.dtype not in _ELEMENTS or side.scope not in _STRATEGIES or (side.scope == "per_block") != (
            _ELEMENTS[side.dtype][2] == MX_FORMAT):
        raise ValueError(f"the compressed-tensors format has no layout for {side.scope} {side.dtype}")
    (kind, bits, fmt), (strategy, dynamic) = _ELEMENTS[side.dtype], _STRATEGIES[side.scope]
    args = {"num_bits": bits, "type": kind, "symmetric": side.symmetric, "group_size": None, "strategy": strategy,
            "dynamic": dynamic and activation}
    if fmt == MX_FORMAT:
        args.update(group_size=MX_BLOCK, scale_dtype=MX_SCALE_DTYPE)
    return args


def scheme_args(quant_type: str) -> tuple[dict, dict]:
    """(weights, input_activations) QuantizationArgs of a quant type, from its scheme's qconfig."""
    from dist_quant import schemes

    scheme = schemes.get(quant_type)
    if scheme.weight is None or scheme.act is None:
        raise ValueError(f"the compressed-tensors format has no layout for {quant_type}")
    if scheme.act == schemes.UNQUANTIZED_ACT:  # the library's pack-quantized (int32 words, weight_shape)
        raise ValueError("the compressed-tensors format has no weight-only layout here (the library's "
                         "pack-quantized, which upstream vLLM serves on GPUs and vLLM Ascend does not)")
    return quantization_args(scheme.weight, activation=False), quantization_args(scheme.act, activation=True)


def group_format(weights: dict) -> str:
    """The library's CompressionFormat of a group with these weight arguments."""
    return MX_FORMAT if weights.get("scale_dtype") == MX_SCALE_DTYPE else INT_FORMAT


def unsupported(quant_types: Iterable[str]) -> Optional[str]:
    """Why linears of these quant types cannot be written in this format (asked before any unit runs), or None.
    Weight-only W8A16 (the library's ``pack-quantized``, which upstream vLLM serves on GPUs and vLLM Ascend's
    compressed-tensors path does not map) is not written: README, "Serving"."""
    from dist_quant.schemes import FLOAT

    for quant_type in sorted(set(quant_types) - {FLOAT}):
        try:
            scheme_args(quant_type)
        except ValueError as error:
            return (f"{error} ({quant_type}): write it in the ascendv1 format (without --save_format, with the "
                    "recipe's save type ascendv1_saver)")
    return None


def linear_entries(name: str, quant_type: str, quantized: QuantizedLinear,
                   spec: LinearSpec) -> list[tuple[str, torch.Tensor, str]]:
    """(key, tensor, quant type) of the linear ``name`` from what its scheme made (on the host)."""
    import torch
    from torch._subclasses.fake_tensor import is_fake

    from dist_quant.schemes import FLOAT

    q = quantized
    if quant_type == FLOAT:
        tensors = {"weight": q.codes}
    else:
        try:
            weights, _ = scheme_args(quant_type)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        if group_format(weights) == MX_FORMAT:  # E8M0 bytes [out, ceil(in / 32)], as the library compresses them
            from dist_quant.algorithms.mxfp8 import scale_bytes

            scale = torch.empty(q.scale.shape, dtype=torch.uint8) if is_fake(q.scale) else scale_bytes(q.scale)
        else:
            scale = q.scale.to(torch.float32).reshape(-1, 1)
        tensors = {"weight": q.codes, "weight_scale": scale}
        if q.input_scale is not None:
            tensors.update(input_scale=q.input_scale.to(torch.float32),
                           input_zero_point=q.input_offset.round().to(torch.int8))
    entries = [(f"{name}.{role}", tensor, quant_type) for role, tensor in tensors.items()]
    if q.bias is not None:
        entries.append((f"{name}.bias", q.bias, FLOAT))
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
    from dist_quant.schemes import FLOAT, SCHEMES

    type_of = modules_by_type(types)
    groups = {}
    for quant_type in sorted(set(type_of.values()) - {FLOAT}, key=list(SCHEMES).index):  # the registry's order
        weights, inputs = scheme_args(quant_type)
        modules = [m for m, t in type_of.items() if t == quant_type]
        if modules:
            groups[quant_type] = {"targets": _targets(modules, type_of), "weights": dict(weights),
                                  "input_activations": dict(inputs), "output_activations": None,
                                  "format": group_format(weights)}
    formats = {group["format"] for group in groups.values()} or {INT_FORMAT}
    return {"config_groups": groups, "format": formats.pop() if len(formats) == 1 else MIXED_FORMAT,
            "global_compression_ratio": None,
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
