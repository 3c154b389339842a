"""vLLM's and vLLM Ascend's loader rules for a compressed-tensors checkpoint of Qwen3-VL-MoE.

Read from vllm-project/vllm (``model_executor/layers/quantization/compressed_tensors/compressed_tensors.py``
``_get_scheme_from_parts``, ``schemes/compressed_tensors_w8a8_int8.py``, ``compressed_tensors_moe*.py``
``get_moe_method``, ``models/qwen3_vl_moe.py`` ``load_weights``), vllm-project/vllm-ascend
(``quantization/compressed_tensors_config.py`` ``_detect_quant_type``, ``methods/w4a8.py``) and the
compressed-tensors library 0.20.1 (``QuantizationArgs``, ``utils/match.py``); docs/compressed-tensors-facts.md has
the lines and the commits. Rules C1-C9 hold for every engine; V1 is vLLM's scheme selection, A1 vLLM Ascend's: a
checkpoint that fails one of those two still loads on the other engine.
"""

from __future__ import annotations

import re
from typing import Optional

from dist_quant.check import Rule, Verdict, run_rules
from dist_quant.check.folder import FLOATS, Folder
from dist_quant.check.model import Linear, Model, model_problem, tp_violations
from dist_quant.checkpoint.formats.compressed_tensors import Matcher, resolve_regexes, vllm_name

FORMAT = "compressed-tensors for vLLM"
INDEX = "model.safetensors.index.json"
# QuantizationArgs' fields (0.20.1; older versions wrote observer and observer_kwargs too); others are refused
ARG_KEYS = {"num_bits", "type", "symmetric", "group_size", "strategy", "dynamic", "block_structure", "actorder",
            "scale_dtype", "zp_dtype", "observer", "observer_kwargs"}
ARG_DEFAULTS = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "dynamic": False}
INPUT_STRATEGIES = ("token", "tensor", "group", "tensor_group", "attn_head")  # QuantizationScheme
TENSOR_FORMATS = ("int-quantized", "naive-quantized", "mxfp8-quantized")  # the formats whose tensors this check knows
MX_GROUP = 32  # inputs per E8M0 scale of an MXFP8 group
VLLM, VLLM_CPU, ASCEND = "vLLM (GPU)", "vLLM (CPU: its W4A8 MoE method runs only there)", "vLLM Ascend"

_SRC_CT = "vllm compressed_tensors.py"
RULES = {r.id: r for r in (
    Rule("C1", "config.json has a compressed-tensors quantization_config (quant_method, status compressed, a "
               "format per group)", "vllm weight_utils.get_quant_config; " + _SRC_CT),
    Rule("C2", "no quant_model_description.json (vLLM Ascend would load it as ascendv1) and no compression_config",
         "vllm-ascend quantization/utils.py maybe_auto_detect_quantization"),
    Rule("C3", "each group's weights and input_activations are QuantizationArgs (no unknown key), with valid "
               "strategies", "compressed-tensors QuantizationArgs (extra forbid)"),
    Rule("C4", "every linear vLLM builds matches a group's targets or the ignore list; every re: entry compiles "
               "and finishes matching (Python's re, as vLLM)",
         f"{_SRC_CT} find_matched_target"),
    Rule("C5", "q/k/v, a dense gate/up and a layer's experts share one group",
         f"{_SRC_CT} _match_fused_layer; compressed_tensors_moe get_moe_method"),
    Rule("C6", "each quantized linear has exactly its scheme's tensors: int8 weight [out, in], weight_scale "
               "[out, 1], static input_scale [1] (+ int8 input_zero_point if asymmetric); MXFP8: F8_E4M3 weight "
               "[out, in], U8 weight_scale [out, in // 32]",
         "vllm compressed_tensors_w8a8_int8.py, compressed_tensors_w8a8_mxfp8.py create_weights"),
    Rule("C7", "experts are per expert, 2-D, E < num_experts (quantized fused 3-D keys map to no parameter)",
         "vllm's MoE models' load_weights (FusedMoE expert mapping)"),
    Rule("C8", "every other parameter has its tensor with the model's shape, and no tensor is unknown",
         "vllm AutoWeightsLoader"),
    Rule("C9", "every top-level *.safetensors is readable, no key is in two files, and model.safetensors.index.json "
               "lists every tensor in the file that holds it",
         "vllm default_loader filter_duplicate_safetensors_files"),
    Rule("C10", "the tensor-parallel size divides every split dimension (an MXFP8 row-parallel input into whole "
                "32-blocks per rank)", "vllm Column/RowParallelLinear, FusedMoE, GroupQuantScaleParameter"),
    Rule("V1", "every group is a scheme vLLM has for its layers (experts: W8A8 channel weights with dynamic "
               "per-token input, MXFP8; W4A8 int experts on CPU only)", f"{_SRC_CT} _get_scheme_from_parts; "
                                                                "compressed_tensors_moe get_moe_method", VLLM),
    Rule("A1", "every group is a vLLM Ascend type: symmetric weights and inputs, channel weights (W8A8 static "
               "linears, W8A8_DYNAMIC, W4A8_DYNAMIC experts)", "vllm-ascend compressed_tensors_config.py "
                                                             "_detect_quant_type", ASCEND),
)}


def _args(raw) -> Optional[dict]:
    """A QuantizationArgs dict with the library's defaults filled in (strategy from group_size), None if absent."""
    if not isinstance(raw, dict):
        return None
    args = {**ARG_DEFAULTS, **raw}
    if args.get("strategy") is None:
        size = args.get("group_size")
        args["strategy"] = "tensor" if size is None else ("channel" if size == -1 else "group")
    return args


def is_mx(args: dict) -> bool:
    """MXFP8 arguments, as vLLM's ``_is_mxfp8`` (asked of the weights only, for linears and experts) and the
    library's MXFP8 compressor tell them: float 8-bit, group strategy, groups of 32, symmetric, uint8 (E8M0)
    scales; without ``scale_dtype`` no vLLM scheme matches."""
    return (args.get("type") == "float" and args.get("num_bits") == 8 and args.get("strategy") == "group"
            and args.get("group_size") == MX_GROUP and bool(args.get("symmetric"))
            and args.get("scale_dtype") in ("torch.uint8", "uint8"))


def vllm_scheme(weights: dict, inputs: Optional[dict], expert: bool) -> Optional[str]:
    """The vLLM scheme for a linear (or an expert) of this group's arguments, None if vLLM has none."""
    if is_mx(weights):  # chosen by the weights alone: the activations are MX-quantized at run time whatever they say
        return "CompressedTensorsW8A8Mxfp8MoEMethod" if expert else "CompressedTensorsW8A8Mxfp8"
    if inputs is None or weights.get("type") != "int" or inputs.get("type") != "int" or not weights.get("symmetric"):
        return None
    w_bits, a_bits = weights.get("num_bits"), inputs.get("num_bits")
    static_tensor = inputs.get("strategy") == "tensor" and not inputs.get("dynamic")
    dynamic_token = inputs.get("strategy") == "token" and inputs.get("dynamic")
    if expert:
        if w_bits == a_bits == 8 and weights.get("strategy") == "channel" and dynamic_token:
            return "CompressedTensorsW8A8Int8MoEMethod"
        if w_bits == 4 and a_bits == 8 and dynamic_token and weights.get("strategy") in ("channel", "group"):
            return "CompressedTensorsW4A8Int8MoEMethod"
        return None
    if w_bits == a_bits == 8 and weights.get("strategy") in ("tensor", "channel") and (static_tensor or dynamic_token):
        return "CompressedTensorsW8A8Int8"
    if w_bits == 4 and a_bits == 8 and dynamic_token and weights.get("strategy") in ("channel", "group"):
        return "CompressedTensorsW4A8Int"
    return None


def ascend_type(weights: dict, inputs: Optional[dict], expert: bool) -> Optional[str]:
    """vLLM Ascend's quant type for a layer of this group's arguments, None if it has none."""
    if inputs is None or not (weights.get("symmetric") and inputs.get("symmetric")):
        return None
    if weights.get("strategy") not in ("channel",) + (("group",) if weights.get("num_bits") == 4 else ()):
        return None
    w_bits, a_bits = weights.get("num_bits"), inputs.get("num_bits")
    if w_bits == a_bits == 8 and inputs.get("strategy") == "tensor" and not inputs.get("dynamic"):
        return None if expert else "W8A8"
    if w_bits == a_bits == 8 and inputs.get("strategy") == "token" and inputs.get("dynamic"):
        return "W8A8_DYNAMIC"
    if w_bits == 4 and a_bits == 8 and inputs.get("strategy") == "token" and inputs.get("dynamic"):
        return "W4A8_DYNAMIC" if expert else None
    return None


def scheme_tensors(linear: Linear, weights: dict, inputs: Optional[dict]) -> dict[str, tuple[tuple, tuple]]:
    """{suffix: (safetensors dtype names, shape)} an int-quantized linear of these arguments is stored with."""
    out, inp = linear.out, linear.inp
    if is_mx(weights):
        tensors = {"weight": (("F8_E4M3",), (out, inp)), "weight_scale": (("U8",), (out, inp // MX_GROUP))}
        return {**tensors, "bias": (FLOATS, (out,))} if linear.bias else tensors
    tensors = {"weight": (("I8",), (out, inp)), "weight_scale": (FLOATS, (out, 1))}
    if not weights.get("symmetric"):
        tensors["weight_zero_point"] = (("I8",), (out, 1))
    if inputs is not None and not inputs.get("dynamic"):
        tensors["input_scale"] = (FLOATS, (1,))
        if not inputs.get("symmetric"):
            tensors["input_zero_point"] = (("I8",), (1,))
    if linear.bias:
        tensors["bias"] = (FLOATS, (out,))
    return tensors


class Checker:
    def __init__(self, folder: Folder, tp: int = 1):
        self.folder, self.tp = folder, tp
        self.qc = folder.config.get("quantization_config", {})
        groups = self.qc.get("config_groups")
        self.groups = {g: b for g, b in groups.items() if isinstance(b, dict)} if isinstance(groups, dict) else {}
        self.model: Optional[Model] = None
        self.model_error = ""
        try:
            self.model = Model(folder.config, tensor_count=len(folder.tensors))
        except Exception as error:  # noqa: BLE001 (a config the family refuses: C8 says so)
            self.model_error = model_problem(error)
        prefixes = self.model.family.SERVED_PREFIXES if self.model is not None else ()  # vLLM's names for the keys
        ignore = self.qc.get("ignore")
        ignored = Matcher(ignore if isinstance(ignore, list) else [], "quantization_config.ignore", prefixes)
        matchers = {g: Matcher(b.get("targets") if isinstance(b.get("targets"), list) else [],
                               f"quantization_config.config_groups.{g}.targets", prefixes)
                    for g, b in self.groups.items()}
        self.suffixes: dict[str, list[str]] = {}  # module -> the suffixes of its tensors (C6 and C7)
        for key in folder.tensors:
            module, _, suffix = key.rpartition(".")
            self.suffixes.setdefault(module, []).append(suffix)
        self.group_of: dict[str, Optional[str]] = {}  # layer -> its group (None: ignored or unmatched)
        self.unmatched: list[str] = []
        if self.model is not None:
            layers = [n for n, _ in self.model.lookups()]  # each linear vLLM builds (experts per expert: see below)
            layers += [n for n, lin in self.model.linears.items() if lin.expert]
            resolve_regexes([ignored, *matchers.values()], [vllm_name(n, prefixes) for n in dict.fromkeys(layers)])
            for name in layers:
                self.group_of[name] = next((g for g, match in matchers.items() if match(name)), None)
            self.unmatched = [n for n, g in self.group_of.items() if g is None and not ignored(n)]
        self.regex_problems = [p for m in (ignored, *matchers.values()) for p in m.problems]

    def args(self, group: str) -> tuple[dict, Optional[dict]]:
        body = self.groups[group]
        return _args(body.get("weights")) or {}, _args(body.get("input_activations"))

    def rule_C1(self):
        qc, bad = self.qc, []
        if qc.get("quantization_status") != "compressed":
            bad.append(f"quantization_status is {qc.get('quantization_status')!r}, not 'compressed'")
        if not self.groups:
            bad.append("config_groups is empty or missing")
        for name, body in self.groups.items():
            if not isinstance(body, dict) or not body.get("format"):
                bad.append(f"group {name} has no format of its own (vLLM Ascend then drops its input activations)")
        return bad

    def rule_C2(self):
        bad = [n for n in self.folder.files if n == "quant_model_description.json"]
        text = self.folder.config.get("text_config")
        bad += [f"config.json has {k}" for k in ("compression_config",) if k in self.folder.config]
        bad += [f"text_config.{k}" for k in ("quantization_config", "compression_config")
                if isinstance(text, dict) and k in text]
        return bad

    def rule_C3(self):
        bad = []
        for name, body in self.groups.items():
            for side in ("weights", "input_activations"):
                args = body.get(side) if isinstance(body, dict) else None
                if args is None:
                    continue
                if not isinstance(args, dict) or not set(args) <= ARG_KEYS:
                    bad.append(f"{name}.{side}: {sorted(args) if isinstance(args, dict) else args!r}")
                elif side == "input_activations" and args.get("strategy") not in INPUT_STRATEGIES:
                    bad.append(f"{name}.{side}.strategy {args.get('strategy')!r}")
                elif args.get("strategy") == "token" and not args.get("dynamic"):
                    bad.append(f"{name}.{side}: strategy token needs dynamic true")
        return bad

    def rule_C4(self):
        if self.model is None:
            return self.regex_problems or None
        return self.regex_problems + [f"{n}: no target, not ignored" for n in self.unmatched]

    def rule_C5(self):
        if self.model is None:
            return None
        bad = []
        for group in self.model.groups:
            if len({self.group_of[m] for m in group}) > 1:
                bad.append(f"{group[0]}: " + ", ".join(f"{m.rsplit('.', 1)[-1]} {self.group_of[m]}" for m in group))
        zero = {layer: self.group_of[self.model.expert0(layer)[0]] for layer in self.model.moe_layers}
        prefix = {self.model.family.layer_prefix(layer) + ".": layer for layer in self.model.moe_layers}
        for name, lin in self.model.linears.items():
            if lin.expert:
                layer = prefix[name[:name.index(".mlp.experts.")] + "."]
                if self.group_of[name] != zero[layer]:
                    bad.append(f"{name}: {self.group_of[name]}, expert 0: {zero[layer]}")
        return bad

    def _expected(self, name: str) -> Optional[dict]:
        group = self.group_of.get(name)
        linear = self.model.linears[name]
        if group is None:
            tensors = {"weight": (FLOATS, (linear.out, linear.inp))}
            return {**tensors, "bias": (FLOATS, (linear.out,))} if linear.bias else tensors
        if self.groups[group].get("format") not in TENSOR_FORMATS:
            return None  # a format whose tensors this check does not know
        return scheme_tensors(linear, *self.args(group))

    def _tensor_violations(self, experts: bool) -> list[str]:
        under, bad = self.suffixes, []
        for name, linear in self.model.linears.items():
            if linear.expert != experts:
                continue
            expected = self._expected(name)
            if expected is None:
                continue
            have = set(under.get(name, []))
            bad += [f"{name}.{s} is missing" for s in expected if s not in have]
            bad += [f"{name}.{s}: its scheme has no such tensor" for s in sorted(have - set(expected))]
            for suffix in have & set(expected):
                info, (dtypes, shape) = self.folder.tensors[f"{name}.{suffix}"], expected[suffix]
                if info.dtype not in dtypes or info.shape != shape:
                    bad.append(f"{name}.{suffix} is {info.dtype} {list(info.shape)}, expected "
                               f"{'/'.join(dtypes)} {list(shape)}")
        return bad

    def rule_C6(self):
        return None if self.model is None else self._tensor_violations(experts=False)

    def rule_C7(self):
        if self.model is None or not self.model.moe_layers:
            return None
        bad = self._tensor_violations(experts=True)
        for key in self.folder.tensors:
            match = re.match(r".*\.mlp\.experts\.(\d+)\.", key)
            if match and int(match.group(1)) >= self.model.num_experts:
                bad.append(f"{key}: expert {match.group(1)} of {self.model.num_experts}")
            if key.rpartition(".")[0] in self.model.fused_expert_keys or key in self.model.fused_expert_keys:
                bad.append(f"{key}: a fused 3-D expert tensor")
        return bad

    def rule_C8(self):
        if self.model is None:
            return [self.model_error]
        bad = [f"{k} is missing" for k in self.model.floats if k not in self.folder.tensors]
        bad += [f"{k} is {list(self.folder.tensors[k].shape)}, the model {list(s)}"
                for k, s in self.model.floats.items() if k in self.folder.tensors and self.folder.tensors[k].shape != s]
        known = set(self.model.floats) | set(self.model.linears) | self.model.fused_expert_keys
        bad += [f"{k}: the model has no such parameter" for k in self.folder.tensors
                if k not in known and k.rpartition(".")[0] not in known and ".mlp.experts." not in k]
        return bad

    def rule_C9(self):
        bad = [f"{n} is unreadable ({why})" for n, why in self.folder.unreadable.items()]
        bad += [f"{k} is in {', '.join(v)}" for k, v in self.folder.duplicates.items()]
        index = self.folder.json(INDEX)
        if index is None:
            return bad + ([f"{INDEX} is unreadable ({self.folder.problems[INDEX]})"] if INDEX in self.folder.problems
                          else [])
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            return bad + [f"{INDEX} has no weight_map object"]
        bad += [f"{k} is in {info.file}, the index says {weight_map.get(k)}" for k, info in self.folder.tensors.items()
                if weight_map.get(k) != info.file]
        return bad + [f"{k}: listed, in no file" for k in weight_map if k not in self.folder.tensors]

    def _engine_violations(self, accept) -> Optional[list[str]]:
        if self.model is None:
            return None
        bad, seen = [], set()
        for name, group in self.group_of.items():
            expert = name in self.model.linears and self.model.linears[name].expert
            if group is None or (group, expert) in seen:
                continue
            seen.add((group, expert))
            if accept(*self.args(group), expert) is None:
                kind = "experts" if expert else "linears"
                bad.append(f"group {group} on {kind} (e.g. {name}): no method for these arguments")
        return bad

    def rule_V1(self):
        return self._engine_violations(vllm_scheme)

    def rule_A1(self):
        return self._engine_violations(ascend_type)

    def rule_C10(self):
        if self.model is None:
            return None
        four_bit = {g for g in self.groups if self.args(g)[0].get("num_bits") == 4}
        mx = {g for g in self.groups if is_mx(self.args(g)[0])}
        bad = tp_violations(self.model, self.tp, lambda name: self.group_of.get(name) in four_bit)
        for name, lin in self.model.linears.items():  # an MX scale splits with its inputs, one per 32 of them
            per_rank, rest = divmod(lin.inp, self.tp)
            first = not lin.expert or name.split(".experts.")[1].startswith("0.")  # expert 0 stands for the others
            if first and lin.split == "row" and self.group_of.get(name) in mx and not rest and per_rank % MX_GROUP:
                bad.append(f"{name} [{lin.out}, {lin.inp}]: {per_rank} inputs per rank, not whole MXFP8 groups of "
                           f"{MX_GROUP}")
        return bad

    def cpu_only(self) -> bool:
        experts = {g for n, g in self.group_of.items() if g is not None and n in self.model.linears
                   and self.model.linears[n].expert}
        return any(vllm_scheme(*self.args(g), True) == "CompressedTensorsW4A8Int8MoEMethod" for g in experts)

def check(folder: Folder, serve_dtype: str, tp: int) -> tuple[list[Verdict], list[str]]:
    """(verdicts, the engines that load the checkpoint). The serving dtype is not a rule here: vLLM's
    compressed-tensors parameters are float32 whatever the serving dtype."""
    checker = Checker(folder, tp)
    verdicts = run_rules(checker, RULES)
    failed = {v.rule.id for v in verdicts if v.violations}
    if any(not RULES[r].engine for r in failed):
        return verdicts, []
    found = []
    if "V1" not in failed:
        found.append(VLLM_CPU if checker.cpu_only() else VLLM)
    if "A1" not in failed:
        found.append(ASCEND)
    return verdicts, found
