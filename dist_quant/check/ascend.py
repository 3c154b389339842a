"""vLLM Ascend's loader rules for msModelSlim's ascendv1 checkpoint of a dist-quant model family
(``--quantization ascend``).

Read from vllm-project/vllm-ascend main @ 182b75ea (``vllm_ascend/quantization/modelslim_config.py``,
``methods/w8a8_static.py``, ``methods/w8a8_dynamic.py``, ``methods/w4a8.py``, ``methods/w8a8_mxfp8.py``,
``method_adapters.py``) and vllm-project/vllm (the families' model classes, ``model_loader/weight_utils.py``,
``default_loader.py``, ``fused_moe/routed_experts.py``); the decisive lines, the commits, and what each violation does
at load are in docs/ascend-loader-rules.md (R1-R25, with a section per family) and docs/w4a8-loader-facts.md. What the
model holds comes from config.json through the family its model_type names (its torch-free sizes module: closed-form
shapes, key prefixes, tensor-parallel limits), never from the checkpoint's own tensors, and the parameters each method
creates are written here from the loader's code, not from dist-quant's writer: this check also works on checkpoints
msModelSlim wrote. vLLM Ascend's own table of the modules it fuses per model_type is data beside this module
(``vllm_ascend_packed_modules.json``, copied from its source).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterable, Optional

from dist_quant.check import Rule, Verdict, run_rules
from dist_quant.check.folder import FLOATS, Folder
from dist_quant.check.model import (
    W4A8_SCALE_BIAS_CHUNKS,
    Linear,
    Model,
    hf_name,
    model_problem,
    served_prefixes,
    tp_violations,
)
from dist_quant.errors import show
from dist_quant.models.family import sizes_for

FORMAT = "ascendv1 (msModelSlim) for vLLM Ascend"
ENGINES = ["vLLM Ascend (--quantization ascend)"]
DESCRIPTION = "quant_model_description.json"
FIELDS = ("version", "model_quant_type", "metadata", "group_size", "optional")
FEATURE_FIELDS = ("fa_quant_type", "indexer_quant_type", "kv_cache_type", "hc_head_fn", "ascend_quant_method")
HIJACKING = ("quantization_config", "compression_config")
# model_type -> {packed module: the shards looked up for it}: where vLLM Ascend finds which layers it loads as one
# (get_quant_method; without an entry it keeps the model class's mapping, which has no "experts")
PACKED_MODULES = json.loads((Path(__file__).parent / "vllm_ascend_packed_modules.json").read_text())[
    "packed_modules_model_mapping"]
FLOAT = "FLOAT"
# (quant type, layer kind) pairs vLLM Ascend registers a method for (methods/registry.py); FLOAT needs none
LINEAR_METHODS = ("W8A8", "W8A8_DYNAMIC", "W8A16", "W8A8_MXFP8")
MOE_METHODS = ("W8A8_DYNAMIC", "W4A8_DYNAMIC", "W4A16", "W8A8_MXFP8")
MX_TYPES = ("W8A8_MXFP8",)  # microscaling types: one uint8 (E8M0) scale per MX_BLOCK inputs
MX_BLOCK = 32  # the group_size msModelSlim writes for MX types and the card's MX kernels take
# the dtype W8A8's deq_scale parameter is created in, by serving dtype (none for float32)
DEQ_SCALE_DTYPES = {"bfloat16": "F32", "float16": "I64"}
SCALAR_DTYPES = (*FLOATS, "I8")  # W8A8's input_offset parameter is int8; its tensor may be a float one too

_SRC_MS = "vllm-ascend modelslim_config.py"
RULES = {r.id: r for r in (
    Rule("R1", f"{DESCRIPTION} is at the top level and holds a JSON object",
         f"{_SRC_MS} maybe_update_config"),
    Rule("R2", "config.json has no quantization_config (top level or text_config) and no compression_config",
         "vllm weight_utils.get_quant_config"),
    Rule("R3", "no description field switches a feature on (kv_cache_type, fa_quant_type...); W4A8 needs version "
               "1.0.0 and group_size 0", f"{_SRC_MS} _add_kvcache_quant_metadata; w4a8.py"),
    Rule("R4", "config.json model_type is one vLLM Ascend's packed-module table knows (it keys which layers load as "
               "one: q/k/v, gate/up, the experts) and dist-quant has a family for", f"{_SRC_MS} get_quant_method"),
    Rule("R5", "tensors only in top-level *.safetensors: no model.safetensors.index.json, no consolidated*, "
               "no key in two files", "vllm default_loader._prepare_weights"),
    Rule("R6", "keys are under the family's top-level modules, by their checkpoint names (or vLLM's)",
         "vllm AutoWeightsLoader; the model class's hf_to_vllm_mapper"),
    Rule("R7", "every layer vLLM builds has its .weight entry (experts: expert 0's)",
         f"{_SRC_MS} get_linear_quant_type"),
    Rule("R8", "each described type has a vLLM Ascend method for its layer kind (none but FLOAT for the linears vLLM "
               "builds without a quant config: Qwen3.5's router and shared_expert_gate)",
         "vllm-ascend methods/registry.py get_scheme_class; vllm ReplicatedLinear(quant_config=None)"),
    Rule("R9", "embed_tokens.weight and lm_head.weight are described, FLOAT", f"{_SRC_MS} get_quant_method"),
    Rule("R10", "q/k/v (and a dense gate/up) of a layer share one type", f"{_SRC_MS} is_layer_skipped_ascend"),
    Rule("R11", "every expert is described as expert 0 is (only expert 0 is read)",
         f"{_SRC_MS} packed_modules_model_mapping"),
    Rule("R12", "W8A8 deq_scale: float32 for bfloat16 serving, int64 for float16, none else; input_offset "
                "integral in [-128, 127]; input_scale finite and > 0",
         "vllm-ascend w8a8_static.py get_perchannel_param"),
    Rule("R13", "q/k/v of a layer have bitwise equal input_scale and input_offset",
         "vllm QKVParallelLinear.weight_loader"),
    Rule("R17", "the tensor-parallel size divides every split dimension",
         "vllm Column/RowParallelLinear, FusedMoE; w4a8.py"),
    Rule("R18", "experts are per expert, experts.E.{gate,up,down}_proj, E < num_experts, every suffix "
                "its method takes", "vllm routed_experts.build_expert_params_mapping"),
    Rule("R20", "every tensor is taken by a parameter", "vllm AutoWeightsLoader._load_module"),
    Rule("R21", "every parameter of every layer gets a tensor", "vllm default_loader.load_weights"),
    Rule("R22", "dtypes are those of the parameters (int8 weights, int32 quant_bias, float scales)",
         "param.copy_ (casts silently)"),
    Rule("R23", "shapes are those of the parameters", "vllm linear weight_loader asserts"),
    Rule("R25", "an MX type (W8A8_MXFP8) has the description's group_size 32; each such linear's input per rank is a "
                "whole number of 32-blocks where vLLM splits it, an expert's also an even number (the MoE method "
                "pairs scale columns without padding)",
         "vllm-ascend w8a8_mxfp8.py create_weights, process_weights_after_loading"),
    Rule("R24", "the description and the tensors agree key for key, no unknown field (the loader ignores the "
                "rest: a warning)", "docs/FORMAT.md", warning=True),
)}


@dataclass(frozen=True)
class Param:
    dtypes: tuple[str, ...]  # safetensors dtype names
    shape: tuple[int, ...]
    required: bool = True


def method_params(quant_type: str, linear: Linear, serve_dtype: str) -> Optional[dict[str, Param]]:
    """The parameters vLLM Ascend's method for ``quant_type`` creates for ``linear``, by checkpoint key suffix, with
    the dtypes a checkpoint tensor may have (the loader casts float scales to the serving dtype by design) and the
    unsharded shapes; None for a type whose parameters this check does not know."""
    out, inp = linear.out, linear.inp
    bias = {"bias": Param(FLOATS, (out,))} if linear.bias and not linear.expert else {}
    if quant_type == FLOAT:
        return {"weight": Param(FLOATS, (out, inp)), **bias}
    if quant_type == "W8A8" and not linear.expert:  # w8a8_static.py: the bias is created, apply uses quant_bias
        deq = (DEQ_SCALE_DTYPES.get(serve_dtype, "I64"),)  # float32 serving: none is created (R12 says so)
        return {"weight": Param(("I8",), (out, inp)), "input_scale": Param(FLOATS, (1,)),
                "input_offset": Param(SCALAR_DTYPES, (1,)), "quant_bias": Param(("I32",), (out,)),
                "deq_scale": Param(deq, (out,)), **{k: Param(p.dtypes, p.shape, False) for k, p in bias.items()},
                # created, never used on the modelslim path; msModelSlim's saver may write them
                "weight_scale": Param(FLOATS, (out, 1), False), "weight_offset": Param(FLOATS, (out, 1), False)}
    if quant_type == "W8A16" and not linear.expert:  # w8a16.py get_weight, get_perchannel_param
        return {"weight": Param(("I8",), (out, inp)), "weight_scale": Param(FLOATS, (out, 1)),
                "weight_offset": Param(FLOATS, (out, 1)), **bias}
    if quant_type == "W8A8_DYNAMIC":  # w8a8_dynamic.py get_weight, get_perchannel_param; experts: no bias param
        return {"weight": Param(("I8",), (out, inp)), "weight_scale": Param(FLOATS, (out, 1)),
                "weight_offset": Param(FLOATS, (out, 1)), **bias}
    if quant_type == "W8A8_MXFP8":  # w8a8_mxfp8.py: cdiv(in, 32) scale columns for a linear, in // 32 for experts
        blocks = inp // MX_BLOCK if linear.expert else -(-inp // MX_BLOCK)
        return {"weight": Param(("F8_E4M3",), (out, inp)), "weight_scale": Param(("U8",), (out, blocks)), **bias}
    if quant_type == "W4A8_DYNAMIC" and linear.expert:  # w4a8.py, modelslim layout, per channel
        chunks = W4A8_SCALE_BIAS_CHUNKS if linear.proj == "down_proj" else 1
        f32 = ("F32",)
        return {"weight": Param(("I8",), (out // 2, inp)), "weight_scale": Param(f32, (out, 1)),
                "weight_offset": Param(f32, (out, 1)), "scale_bias": Param(f32, (out, chunks))}
    return None


class Checker:
    """The rules on one folder; each ``rule_*`` method returns its violations (or None: not applicable)."""

    def __init__(self, folder: Folder, serve_dtype: str, tp: int):
        self.folder, self.serve_dtype, self.tp = folder, serve_dtype, tp
        self.raw_description = folder.json(DESCRIPTION)
        self.description = self.raw_description if isinstance(self.raw_description, dict) else None
        self.family: Optional[ModuleType] = None  # config.json's family, when dist-quant has one (R4)
        self.model: Optional[Model] = None
        self.model_error = ""
        if folder.config is not None:
            try:
                self.family = sizes_for(folder.config.get("model_type"))
                self.model = Model(folder.config, tensor_count=len(folder.tensors))
            except Exception as error:  # no family, or a config it refuses: reported (R4), not raised
                self.model_error = model_problem(error)
        # the family's key prefixes and vLLM's names for them (vLLM maps the description's keys the same way, so
        # either form works; the checks below speak the checkpoint's)
        self.prefixes = served_prefixes(self.family) if self.family is not None else ()
        self.entries: dict[str, str] = {}  # tensor entries of the description, checkpoint keys
        self.fields: dict[str, object] = {}  # the other top-level keys
        self.bad_prefix: list[str] = []
        for key, value in (self.description or {}).items():
            if key in FIELDS or key in FEATURE_FIELDS or not (isinstance(value, str) and "." in key):
                self.fields[key] = value
            else:
                self.entries[hf_name(key, self.prefixes)] = value
        self.tensors = {hf_name(k, self.prefixes): info for k, info in folder.tensors.items()}
        self.raw_tensor_key = {hf_name(k, self.prefixes): k for k in folder.tensors}
        self.suffixes: dict[str, list[str]] = {}  # module -> the suffixes of its tensors
        for key in self.tensors:
            module, _, suffix = key.rpartition(".")
            self.suffixes.setdefault(module, []).append(suffix)
        self.group_ok: dict[str, bool] = {}  # linear -> its fused group shares one type (R10)
        self.types: dict[str, Optional[str]] = {}  # linear -> the type its layer is loaded with

    # --- the type vLLM loads each linear with --------------------------------------------------------------------

    def resolve_types(self) -> None:
        model = self.model
        for name, linear in model.linears.items():
            if not linear.expert:
                self.types[name] = self.entries.get(f"{name}.weight")
        for group in model.groups:
            kinds = {self.entries.get(f"{m}.weight") for m in group}
            for m in group:
                self.group_ok[m] = len(kinds) == 1
                if len(kinds) != 1:
                    self.types[m] = None
        for layer in model.moe_layers:
            zero = [self.entries.get(f"{m}.weight") for m in model.expert0(layer)]
            layer_type = zero[0] if len(set(zero)) == 1 else None
            for expert in range(model.num_experts):
                for proj in model.family.EXPERT_PROJS:
                    self.types[model.family.expert_key(layer, expert, proj)] = layer_type

    def known_params(self, name: str) -> Optional[dict[str, Param]]:
        quant_type = self.types.get(name)
        if quant_type is None:
            return None
        linear = self.model.linears[name]
        if quant_type != FLOAT and quant_type not in (MOE_METHODS if linear.expert else LINEAR_METHODS):
            return None  # R8 reports it
        return method_params(quant_type, linear, self.serve_dtype)

    # --- rules ---------------------------------------------------------------------------------------------------

    def rule_R1(self):
        if self.raw_description is None:
            why = self.folder.problems.get(DESCRIPTION)
            return [f"{DESCRIPTION} is unreadable ({why})" if why else f"{DESCRIPTION} is missing"]
        return [] if self.description is not None else [f"{DESCRIPTION} does not hold a JSON object"]

    def rule_R2(self):
        config = self.folder.config
        if config is None:
            why = self.folder.problems.get("config.json")
            return [f"config.json is unreadable ({why})" if why else "config.json is missing or not a JSON object"]
        found = [k for k in HIJACKING if k in config]
        text = config.get("text_config")
        found += [f"text_config.{k}" for k in HIJACKING if isinstance(text, dict) and k in text]
        return [f"config.json has {k}" for k in found]

    def rule_R3(self):
        if self.description is None:
            return None
        bad = [f"{k}: {self.fields[k]!r} switches on a feature" for k in self.fields if k in FEATURE_FIELDS]
        if "W4A8_DYNAMIC" in self.entries.values():
            if self.fields.get("version") != "1.0.0":
                bad.append(f"version is {self.fields.get('version')!r}: W4A8 needs \"1.0.0\" (the packed layout)")
            if self.fields.get("group_size", 0) != 0:
                bad.append(f"group_size is {self.fields.get('group_size')!r}: main refuses per-group W4A8 (0)")
        return bad

    def rule_R4(self):
        if self.folder.config is None:
            return None
        model_type = self.folder.config.get("model_type")
        bad = []
        if not (isinstance(model_type, str) and model_type in PACKED_MODULES):
            bad.append(f"model_type is {show(model_type)}: vLLM Ascend has no packed modules for it, so it would "
                       "look its experts up as one layer (KeyError at load)")
        return bad + ([self.model_error] if self.model is None else [])

    def rule_R5(self):
        files = self.folder.files
        bad = [f"{n} exists: vLLM loads only the files it lists" for n in files if n == "model.safetensors.index.json"]
        bad += [f"{n}: vLLM then loads the Mistral format" for n in files
                if re.match(r"consolidated.*\.safetensors", n)]
        bad += [f"{k} is in {', '.join(v)}" for k, v in self.folder.duplicates.items()]
        bad += [f"{n} is unreadable ({why})" for n, why in self.folder.unreadable.items()]
        if not self.folder.tensors:
            bad.append("no top-level *.safetensors file holds a tensor")
        return bad

    def rule_R6(self):
        if self.family is None:
            return None  # R4 says why
        keys = list(self.tensors) + list(self.entries)
        allowed = tuple(hf for hf, _ in self.prefixes)
        self.bad_prefix = [k for k in dict.fromkeys(keys) if not k.startswith(allowed)]
        return [f"{self.raw_tensor_key.get(k, k)}: not under {' / '.join(allowed)}" for k in self.bad_prefix]

    def rule_R7(self):
        if self.model is None or self.description is None:
            return None
        return [f"{n}.weight (a {kind} layer)" for n, kind in self.model.lookups()
                if f"{n}.weight" not in self.entries and f"{n}.weight" not in self.model.embeddings]

    def rule_R8(self):
        if self.model is None or self.description is None:
            return None
        bad = []
        for name, kind in self.model.lookups():
            quant_type = self.entries.get(f"{name}.weight")
            unquantized = name.endswith(tuple(self.model.family.UNQUANTIZED_LINEARS))
            kind = "unquantized" if unquantized else kind
            methods = MOE_METHODS if kind == "moe" else () if unquantized else LINEAR_METHODS
            if quant_type is not None and quant_type != FLOAT and quant_type not in methods:
                bad.append(f"{name}.weight: {quant_type} (no {kind} method)")
        return bad

    def rule_R9(self):
        if self.model is None or self.description is None:
            return None
        return [f"{k}: {self.entries.get(k, 'no entry')}" for k in self.model.embeddings
                if self.entries.get(k) != FLOAT]

    def rule_R10(self):
        if self.model is None or self.description is None:
            return None
        bad = []
        for group in self.model.groups:
            kinds = {m: self.entries.get(f"{m}.weight") for m in group}
            if len(set(kinds.values())) > 1 and None not in kinds.values():
                bad.append(", ".join(f"{m.rsplit('.', 1)[-1]} {t}" for m, t in kinds.items()) + f" in {group[0]}")
        return bad

    def rule_R11(self):
        if self.model is None or self.description is None or not self.model.moe_layers:
            return None
        bad = []
        for key, quant_type in self.entries.items():
            match = re.match(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)\.", key)
            if match and match.group(2) != "0":
                zero = self.entries.get(f"{match.group(1)}.0.{match.group(3)}.weight")
                if zero is not None and quant_type != zero:
                    bad.append(f"{key}: {quant_type}, expert 0: {zero}")
        return bad

    def rule_R12(self):
        if self.model is None:
            return None
        w8a8 = [n for n, t in self.types.items() if t == "W8A8" and not self.model.linears[n].expert]
        if not w8a8:
            return None
        if self.serve_dtype not in DEQ_SCALE_DTYPES:
            return [f"{w8a8[0]}: static W8A8 creates no deq_scale when serving in {self.serve_dtype} (bfloat16 or "
                    "float16 only)"]
        want = DEQ_SCALE_DTYPES[self.serve_dtype]
        bad = []
        for name in w8a8:
            info = self.tensors.get(f"{name}.deq_scale")
            if info is not None and info.dtype != want:
                bad.append(f"{name}.deq_scale is {info.dtype}, the parameter {want} (silently wrong values)")
            bad += self._scalar_violations(name)
        return bad

    def _scalar_violations(self, name: str) -> list[str]:
        """A static W8A8 linear's input_offset must be an int8 value (the parameter is int8: a float one is cast
        silently), its input_scale finite and positive (it divides the activations); NaN and inf are violations."""
        bad = []
        for role in ("input_scale", "input_offset"):
            scalar = self._scalar(f"{name}.{role}")
            if scalar is None:
                continue
            value = float(scalar[0])
            if role == "input_offset" and not (math.isfinite(value) and value == round(value) and
                                               -128 <= value <= 127):
                bad.append(f"{name}.input_offset is {value}: the parameter is int8")
            if role == "input_scale" and not (math.isfinite(value) and value > 0):
                bad.append(f"{name}.input_scale is {value}: it divides the activations, so it must be finite and > 0")
        return bad

    def rule_R13(self):
        if self.model is None:
            return None
        bad, seen = [], False
        for group in self.model.groups:
            if not all(self.types.get(m) == "W8A8" for m in group):
                continue
            seen = True
            for role in ("input_scale", "input_offset"):
                scalars = [self._scalar(f"{m}.{role}") for m in group]
                if None in scalars:
                    continue
                (first, dtype), *_ = scalars
                if not all(d == dtype and v == first for v, d in scalars):  # a NaN equals nothing, as in torch.equal
                    bad.append(f"{group[0]}.{role}: {[[v] for v, _ in scalars]}")
        return bad if seen else None

    def rule_R17(self):
        if self.model is None:
            return None
        return tp_violations(self.model, self.tp, lambda name: self.types.get(name) == "W4A8_DYNAMIC")

    def rule_R25(self):
        if self.description is None:
            return None
        mx = [name for name, t in self.types.items() if t in MX_TYPES]
        bad = []
        if not mx:
            return bad
        if self.fields.get("group_size") != MX_BLOCK:
            bad.append(f"group_size is {self.fields.get('group_size')!r}: the MX methods read it as the scale's block "
                       f"({MX_BLOCK}), which sizes the weight_scale parameter")
        for name in mx:
            lin = self.model.linears.get(name) if self.model is not None else None
            if lin is None or lin.expert and not name.split(".experts.")[1].startswith("0."):
                continue  # every expert has expert 0's shapes
            split = lin.split == "row" and self.tp > 1
            if split and lin.inp % self.tp:
                continue  # R17
            per_rank = lin.inp // self.tp if split else lin.inp
            if (lin.expert or split) and per_rank % MX_BLOCK or lin.expert and per_rank // MX_BLOCK % 2:
                bad.append(f"{name} [{lin.out}, {lin.inp}]: {per_rank} inputs per rank")
        return bad

    def rule_R18(self):
        if self.model is None or not self.model.moe_layers:
            return None
        model, bad = self.model, []
        for key in self.tensors:
            match = re.match(r".*\.mlp\.experts\.(\d+)\.", key)
            if match and int(match.group(1)) >= model.num_experts:
                bad.append(f"{key}: expert {match.group(1)} of {model.num_experts}")
            if key in model.fused_expert_keys and self.types.get(self._expert_of_fused(key)) != FLOAT:
                bad.append(f"{key}: a fused 3-D expert tensor, loaded only for float experts")
        for name, lin in model.linears.items():
            params = self.known_params(name) if lin.expert else None
            if params is None:
                continue
            have = set(self.suffixes.get(name, ()))
            bad += [f"{name}.{s} is missing" for s in params if params[s].required and s not in have]
            bad += [f"{name}.{s}: no {self.types[name]} parameter takes it" for s in sorted(have - set(params))]
        return bad

    def rule_R20(self):
        if self.model is None:
            return None
        bad = []
        known = set(self.model.floats)
        for key in self.tensors:
            if key in known or key in self.bad_prefix or ".mlp.experts." in key:
                continue
            name, _, suffix = key.rpartition(".")
            if name in self.model.linears:
                params = self.known_params(name)
                if params is None or suffix in params:
                    continue
                bad.append(f"{key}: no {self.types[name]} parameter takes it")
            else:
                bad.append(f"{key}: the model has no such parameter")
        return bad

    def rule_R21(self):
        if self.model is None:
            return None
        bad = [f"{k} is missing" for k in self.model.floats if k not in self.tensors]
        for name, lin in self.model.linears.items():
            params = None if lin.expert else self.known_params(name)
            for suffix, param in (params or {}).items():
                if param.required and f"{name}.{suffix}" not in self.tensors:
                    bad.append(f"{name}.{suffix} is missing")
        return bad

    def _expected(self) -> Iterable[tuple[str, Param]]:
        """(HF key, parameter) of every present tensor whose parameter is known."""
        for key, shape in self.model.floats.items():
            if key in self.tensors:
                yield key, Param(FLOATS, shape)
        for name in self.model.linears:
            for suffix, param in (self.known_params(name) or {}).items():
                if f"{name}.{suffix}" in self.tensors:
                    yield f"{name}.{suffix}", param

    def rule_R22(self):
        if self.model is None:
            return None
        return [f"{key} is {self.tensors[key].dtype}, the parameter {'/'.join(param.dtypes)}"
                for key, param in self._expected()
                if not key.endswith(".deq_scale") and self.tensors[key].dtype not in param.dtypes]

    def rule_R23(self):
        if self.model is None:
            return None
        return [f"{key} is {list(self.tensors[key].shape)}, the parameter {list(param.shape)}"
                for key, param in self._expected() if self.tensors[key].shape != param.shape]

    def rule_R24(self):
        if self.description is None:
            return None
        looked_up = set()
        if self.model is not None:
            looked_up = {f"{n}.weight" for n, _ in self.model.lookups()} | set(self.model.embeddings)
        bad = [f"{k}: a tensor without a description entry" for k in self.tensors
               if k not in self.entries and k not in looked_up and k not in self.bad_prefix]
        bad += [f"{k}: an entry without a tensor" for k in self.entries
                if k not in self.tensors and k not in self.bad_prefix]
        return bad + [f"{k}: an unknown field" for k in self.fields if k not in FIELDS and k not in FEATURE_FIELDS]

    # --- helpers -------------------------------------------------------------------------------------------------

    def _scalar(self, key: str) -> Optional[tuple[float | int, str]]:
        """(value, dtype) of a static W8A8 scalar parameter's tensor (HF key); None when it is missing, mis-shaped or
        of a dtype its parameter does not take: R21, R23 and R22 report those."""
        info = self.tensors.get(key)
        if info is None or info.shape != (1,) or info.dtype not in SCALAR_DTYPES:
            return None
        return self.folder.values(self.raw_tensor_key[key])[0], info.dtype

    def _expert_of_fused(self, key: str) -> str:
        layer = int(re.search(r"\.layers\.(\d+)\.", key).group(1))
        return self.model.expert0(layer)[0]

    def run(self) -> list[Verdict]:
        if self.model is not None:
            self.resolve_types()
        return run_rules(self, RULES)


def check(folder: Folder, serve_dtype: str, tp: int) -> tuple[list[Verdict], list[str]]:
    """(verdicts, the engines that load the checkpoint)."""
    verdicts = Checker(folder, serve_dtype, tp).run()
    return verdicts, ENGINES if not any(v.violations for v in verdicts if not v.rule.warning) else []
