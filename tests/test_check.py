"""`dist-quant check`: a good checkpoint passes every rule, and one mutated copy per rule trips exactly that rule,
for each model family (Qwen3-VL-MoE and the text-only Qwen3-MoE, each quantized by dist-quant from a tiny model).

The mutations are the mistakes users meet when vLLM Ascend loads a quantized Qwen3-VL or Qwen3-MoE (a missing merger,
router or lm_head description entry, renamed expert keys, q/k/v split over two types, a quantization_config left in
config.json, a float32 deq_scale served in float16...); the rules are vLLM Ascend's loader's, as
docs/ascend-loader-rules.md reads them from its source."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dist_quant.check import check_checkpoint, format_report, refuse_unservable
from dist_quant.check.ascend import PACKED_MODULES, RULES
from dist_quant.check.folder import DECODABLE, read_folder
from dist_quant.cli import main
from dist_quant.errors import OutputError
from dist_quant.models.family import FAMILIES as FAMILY_MODULES
from dist_quant.models.family import sizes_for
from helpers import (
    DESCRIPTION,
    FAMILIES,
    Family,
    add,
    changed,
    drop,
    mutate,
    quantized,
    rename,
    set_types,
)

BF16 = torch.bfloat16
# the families' tiny models, recipes and what their mutations touch (FAMILIES), each checkpoint quantized once per
# session (quantized), the fixture good (conftest.py) and mutate are in helpers.py


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def family_good(tmp_path_factory, family):
    return quantized(tmp_path_factory, family, "good")


@pytest.fixture(scope="module")
def family_fp32(tmp_path_factory, family):
    return quantized(tmp_path_factory, family, "fp32")


@pytest.fixture(scope="module")
def family_w4a8(tmp_path_factory, family):
    return quantized(tmp_path_factory, family, "w4a8")


def mutations(f: Family) -> dict:
    """rule: (what a user would have done, the mutation, check options), on a checkpoint of the family ``f``."""
    q_proj, k_proj, o_proj = (f"{f.layer0}.self_attn.{p}_proj" for p in ("q", "k", "o"))
    expert3_up = f"{f.layer0}.mlp.experts.3.up_proj"
    return {
        "R1": ("lost the description", lambda ckpt, tmp: _unlink(mutate(ckpt, tmp), DESCRIPTION), {}),
        "R2": ("a quantization_config left where vLLM reads one", lambda ckpt, tmp: mutate(
            ckpt, tmp, config=f.hijack), {}),
        "R3": ("a feature field in the description", lambda ckpt, tmp: mutate(
            ckpt, tmp, description=add("kv_cache_type", "C8")), {}),
        "R4": ("another model_type", lambda ckpt, tmp: mutate(
            ckpt, tmp, config=add("model_type", f.other_model_type)), {}),
        "R5": ("the float model's index copied along", lambda ckpt, tmp: _touch(
            mutate(ckpt, tmp), "model.safetensors.index.json", '{"weight_map": {}}'), {}),
        "R6": ("a key of another layout (another family's, or saved from the inner decoder)", lambda ckpt, tmp: mutate(
            ckpt, tmp, description=add(f.foreign_key, "FLOAT"), tensors=add(f.foreign_key, torch.zeros(2, dtype=BF16))),
            {}),
        "R7": ("a float layer missing from the description (vllm-ascend #7538)", lambda ckpt, tmp: mutate(
            ckpt, tmp, description=drop(f"{f.float_linear}.weight")), {}),
        "R8": ("a router described with a type vLLM Ascend has no linear method for", lambda ckpt, tmp: mutate(
            ckpt, tmp, description=set_types(f"{f.layer0}.mlp.gate", "W4A8_DYNAMIC")), {}),
        "R9": ("lm_head.weight missing from the description (vllm-ascend #8367)", lambda ckpt, tmp: mutate(
            ckpt, tmp, description=drop("lm_head.weight")), {}),
        "R10": ("q/k/v split over two types", lambda ckpt, tmp: mutate(
            ckpt, tmp, description=set_types(k_proj, "W8A8_DYNAMIC")), {}),
        "R11": ("one expert described differently from expert 0", lambda ckpt, tmp: mutate(
            ckpt, tmp, description=set_types(expert3_up, "W4A8_DYNAMIC")), {}),
        "R12": ("a bfloat16 checkpoint served in float16: deq_scale float32 where int64 is created",
                lambda ckpt, tmp: mutate(ckpt, tmp), {"serve_dtype": "float16"}),
        "R13": ("k_proj calibrated apart from q_proj", lambda ckpt, tmp: mutate(
            ckpt, tmp, tensors=changed(f"{k_proj}.input_scale", lambda t: t * 2)), {}),
        "R17": ("a tensor-parallel size that does not divide the heads", lambda ckpt, tmp: mutate(ckpt, tmp),
                {"tp": 3}),
        "R18": ("an expert key renamed (per-expert names, vllm-ascend #4035/#4797)", lambda ckpt, tmp: mutate(
            ckpt, tmp,
            description=rename(f"{expert3_up}.weight_scale", f"{f.layer0}.mlp.experts.300.up_proj.weight_scale"),
            tensors=rename(f"{expert3_up}.weight_scale", f"{f.layer0}.mlp.experts.300.up_proj.weight_scale")), {}),
        "R20": ("a tensor its method has no parameter for", lambda ckpt, tmp: mutate(
            ckpt, tmp, description=add(f"{q_proj}.scale_bias", "W8A8"),
            tensors=add(f"{q_proj}.scale_bias", torch.ones(64, 1))), {}),
        "R21": ("a tensor lost", lambda ckpt, tmp: mutate(
            ckpt, tmp, description=drop(f"{o_proj}.quant_bias"), tensors=drop(f"{o_proj}.quant_bias")), {}),
        "R22": ("quant_bias widened to int64", lambda ckpt, tmp: mutate(
            ckpt, tmp, tensors=changed(f"{o_proj}.quant_bias", lambda t: t.to(torch.int64))), {}),
        "R23": ("deq_scale as a column", lambda ckpt, tmp: mutate(
            ckpt, tmp, tensors=changed(f"{o_proj}.deq_scale", lambda t: t[:, None].contiguous())), {}),
        "R24": ("a description entry lost", lambda ckpt, tmp: mutate(
            ckpt, tmp, description=drop(f"{q_proj}.input_scale")), {}),
        "R25": ("o_proj redone in MXFP8 (its tensors as the method takes them) without the description's "
                "group_size 32", lambda ckpt, tmp: mutate(ckpt, tmp, *as_mxfp8(o_proj)), {}),
    }


def as_mxfp8(linear: str):
    """(description, tensors) mutations making ``linear`` a W8A8_MXFP8 one: a float8 weight and one uint8 scale per
    32 inputs (vLLM Ascend's w8a8_mxfp8.py parameters), its other tensors and their entries gone."""
    def tensors(t):
        out, inputs = t[f"{linear}.weight"].shape
        for key in [k for k in t if k.startswith(linear + ".")]:
            del t[key]
        t[f"{linear}.weight"] = torch.zeros(out, inputs).to(torch.float8_e4m3fn)
        t[f"{linear}.weight_scale"] = torch.full((out, -(-inputs // 32)), 127, dtype=torch.uint8)

    def description(d):
        for key in [k for k in d if k.startswith(linear + ".")]:
            del d[key]
        d[f"{linear}.weight"] = d[f"{linear}.weight_scale"] = "W8A8_MXFP8"
    return description, None, tensors


MUTATIONS = mutations(FAMILIES["qwen3_vl_moe"])


def violations(report, rule):
    return next(v.violations for v in report.verdicts if v.rule.id == rule)


def _unlink(folder, name):
    (folder / name).unlink()
    return folder


def _touch(folder, name, text):
    (folder / name).write_text(text)
    return folder


def test_good_checkpoints_pass_every_rule(family_good, family_fp32, family_w4a8):
    for ckpt in (family_good, family_fp32, family_w4a8):
        report = check_checkpoint(ckpt)
        assert report.ok, format_report(report)
        assert report.engines and not [v for v in report.verdicts if v.status == "n/a"]
    assert check_checkpoint(family_good).serve_dtype == "bfloat16"
    assert check_checkpoint(family_fp32).serve_dtype == "float16"
    assert check_checkpoint(family_good, tp=2).ok and check_checkpoint(family_w4a8, tp=2).ok


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_rule_has_a_mutation(model_type):
    assert set(mutations(FAMILIES[model_type])) == set(RULES)


@pytest.mark.parametrize("rule", sorted(RULES, key=lambda r: int(r[1:])))
def test_a_mutation_trips_exactly_its_rule(family, family_good, tmp_path, rule):
    what, make, options = mutations(family)[rule]
    report = check_checkpoint(make(family_good, tmp_path), **options)
    assert report.failed() == [rule], f"{what}:\n{format_report(report)}"
    assert report.ok == (rule == "R24") and bool(report.engines) == (rule == "R24")  # R24 only warns


def test_a_model_type_is_one_vllm_ascend_packs_and_dist_quant_has_a_family_for(good, tmp_path):
    """R4's two halves apart: a model_type vLLM Ascend fuses the experts of but dist-quant has no family for, and one
    that is in neither (dense Qwen3: vLLM Ascend keeps the model's own packed modules, which have no experts)."""
    def r4(model_type, name):
        report = check_checkpoint(mutate(good, tmp_path / name, config=add("model_type", model_type)))
        assert report.failed() == ["R4"], format_report(report)
        return violations(report, "R4")
    only_ascend = r4("glm4_moe", "glm")
    assert len(only_ascend) == 1 and only_ascend[0].startswith("config.json: model_type is 'glm4_moe'; dist-quant "
                                                               "supports 'qwen3_vl_moe' (Qwen3-VL-MoE), 'qwen3_moe'")
    neither = r4("qwen3", "dense")
    assert neither[0] == ("model_type is 'qwen3': vLLM Ascend has no packed modules for it, so it would look its "
                          "experts up as one layer (KeyError at load)") and "dist-quant supports" in neither[1]


def test_every_family_fuses_the_modules_vllm_ascend_packs():
    """The fused groups the rules use (each family's FUSED_GROUPS, written by hand) are the shards vLLM Ascend's
    packed-module table (a copy of its source: dist_quant/check/vllm_ascend_packed_modules.json) looks up for the
    family's model_type: every group is one packed module's shards under their parent module, and every packed
    module is a group."""
    def packed_as(group, packed):
        """The packed module whose shards, under one parent module, are the group's members (None: none is)."""
        for name, shards in packed.items():
            parent = group[0][:len(group[0]) - len(shards[0])]  # "self_attn.", "mlp."
            if parent.endswith(".") and list(group) == [parent + shard for shard in shards]:
                return name
        return None

    for model_type in FAMILY_MODULES:
        packed = PACKED_MODULES[model_type]
        names = [packed_as(group, packed) for group in sizes_for(model_type).FUSED_GROUPS]
        assert None not in names and sorted(names) == sorted(packed), (model_type, names)


def test_the_package_ships_the_packed_module_table():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert "check/*.json" in config["tool"]["setuptools"]["package-data"]["dist_quant"]


def test_a_checkpoint_in_vllm_s_names_passes(good, tmp_path):
    """vLLM maps the checkpoint's and the description's keys by the model's hf_to_vllm_mapper, so keys already in
    vLLM's names load too (Qwen3-VL-MoE's: model.visual. -> visual., model.language_model. ->
    language_model.model., lm_head. -> language_model.lm_head.)."""
    served = (("model.visual.", "visual."), ("model.language_model.", "language_model.model."),
              ("lm_head.", "language_model.lm_head."))

    def renamed(d):
        for key in list(d):
            hf, vllm = next(((hf, vllm) for hf, vllm in served if key.startswith(hf)), ("", ""))
            if hf:
                d[vllm + key[len(hf):]] = d.pop(key)
    folder = mutate(good, tmp_path, description=renamed, tensors=renamed)
    assert "language_model.lm_head.weight" in json.loads((folder / DESCRIPTION).read_text())
    report = check_checkpoint(folder)
    assert report.ok and not report.failed(), format_report(report)


def test_the_serving_dtype_of_a_model_type_without_a_family_is_the_one_config_json_states(good, tmp_path):
    def config(dtype, where):
        def change(c):
            c["model_type"] = "qwen3"
            for section in (c, c["text_config"]):
                for key in ("dtype", "torch_dtype"):
                    section.pop(key, None)
            (c if where == "top" else c["text_config"])["torch_dtype"] = dtype
        return change
    for i, (dtype, where, served) in enumerate((("float32", "top", "float16"), ("bfloat16", "text", "bfloat16"),
                                               ("float16", "text", "float16"))):
        assert check_checkpoint(mutate(good, tmp_path / str(i), config=config(dtype, where))).serve_dtype == served


def test_a_float32_deq_scale_in_a_float32_model_fails_float16_serving(family_fp32, tmp_path):
    """The defect dist-quant had before 2026-12-03: float32 deq_scale for a float32 source, which vLLM's --dtype auto
    serves in float16, where the parameter is int64."""
    def floats(tensors):
        for key in [k for k in tensors if k.endswith(".deq_scale")]:
            tensors[key] = tensors[key].to(torch.int32).view(torch.float32)
    report = check_checkpoint(mutate(family_fp32, tmp_path, tensors=floats))
    assert report.failed() == ["R12"] and "deq_scale is F32, the parameter I64" in violations(report, "R12")[0]
    assert check_checkpoint(family_fp32, serve_dtype="bfloat16").failed() == ["R12"]  # bf16 serving: float32


def test_w4a8_rules(family, family_w4a8, tmp_path):
    report = check_checkpoint(mutate(family_w4a8, tmp_path, description=add("group_size", 64)))
    assert report.failed() == ["R3"]
    assert "group_size" in violations(report, "R3")[0]
    report = check_checkpoint(mutate(family_w4a8, tmp_path / "v", description=add("version", "0.1.0")))
    assert report.failed() == ["R3"]  # vLLM Ascend reads int4 codes packed only for version 1.0.0
    assert violations(report, "R3") == ["version is '0.1.0': W4A8 needs \"1.0.0\" (the packed layout)"]
    assert check_checkpoint(family_w4a8, tp=32).failed() == ["R17"]  # and heads; also 16 scale_bias chunks
    down = f"{family.layer0}.mlp.experts.0.down_proj"
    squeezed = mutate(family_w4a8, tmp_path / "b", tensors=changed(f"{down}.scale_bias", lambda t: t[:, :1].clone()))
    assert check_checkpoint(squeezed).failed() == ["R23"]


def test_the_cli_prints_the_table_and_exits_1_on_a_violation(good, tmp_path, capsys):
    assert main(["check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "| R7: every layer vLLM builds has its .weight entry" in out and "all 21 rules pass" in out
    bad = MUTATIONS["R7"][1](good, tmp_path)
    assert main(["check", str(bad), "--serve_dtype", "bfloat16", "--tp", "2"]) == 1
    out = capsys.readouterr().out
    assert "| FAIL | model.visual.merger.linear_fc1.weight (a linear layer) (1) |" in out
    assert "1 of 21 rules fail (R7)" in out
    assert main(["check", str(tmp_path / "nowhere")]) == 2


def test_quant_checks_its_output_before_publishing(family, family_good, tmp_path):
    log = (family_good / "quant_run.log").read_text()
    assert "check: ascendv1 (msModelSlim) for vLLM Ascend: loads on vLLM Ascend" in log
    with pytest.raises(OutputError, match="not published"):
        refuse_unservable(mutations(family)["R9"][1](family_good, tmp_path))


def test_msmodelslim_extras_pass_and_foreign_fields_only_warn(family_good, tmp_path):
    """msModelSlim's W8A8 may carry weight_scale/weight_offset (vLLM Ascend creates them, unused); an unknown
    description field is ignored by the loader: a warning, not a failure."""
    def scales(tensors):
        for key in [k for k in tensors if k.endswith(".deq_scale")]:
            base = key[:-len(".deq_scale")]
            tensors[f"{base}.weight_scale"] = torch.ones(tensors[key].shape[0], 1)
            tensors[f"{base}.weight_offset"] = torch.zeros(tensors[key].shape[0], 1)

    def entries(description):
        for key in [k for k in description if k.endswith(".deq_scale")]:
            base = key[:-len(".deq_scale")]
            description[f"{base}.weight_scale"] = description[f"{base}.weight_offset"] = "W8A8"
        description["made_by"] = "someone"
    report = check_checkpoint(mutate(family_good, tmp_path, description=entries, tensors=scales))
    assert report.failed() == ["R24"] and report.ok and report.verdicts[-1].status == "warn"


def _same_value(ours, theirs) -> bool:
    """Equal as numbers, a NaN matching a NaN and a zero's sign counted (-0.0 and 0.0 are different bits)."""
    if isinstance(theirs, float) and math.isnan(theirs):
        return isinstance(ours, float) and math.isnan(ours)
    return ours == theirs and type(ours) is type(theirs) and math.copysign(1, ours) == math.copysign(1, theirs)


def test_scalar_values_are_decoded_from_the_bytes_as_torch_decodes_them(tmp_path):
    """The check reads the few scalars its rules look at (W8A8's input_scale and input_offset) from the file's bytes
    without torch: every bfloat16 and float16 bit pattern, random float32/float64 bits and each integer dtype's
    extremes decode to the values torch itself reads from the same file."""
    gen = torch.Generator().manual_seed(0)
    every16 = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    tensors = {"BF16": every16.view(torch.bfloat16), "F16": every16.clone().view(torch.float16),
               "F32": torch.randint(-2**31, 2**31, (4096,), generator=gen, dtype=torch.int64).to(torch.int32)
               .view(torch.float32),
               "F64": torch.randint(-2**63, 2**63 - 1, (4096,), generator=gen, dtype=torch.int64).view(torch.float64),
               "BOOL": torch.tensor([True, False, True]), "U8": torch.arange(256).to(torch.uint8),
               "I8": torch.arange(-128, 128).to(torch.int8)}
    for name, dtype in (("I16", torch.int16), ("I32", torch.int32), ("I64", torch.int64)):
        info = torch.iinfo(dtype)
        tensors[name] = torch.tensor([info.min, -1, 0, 1, info.max], dtype=dtype)
    tensors = {k: t.reshape(-1, 1) if k == "F32" else t for k, t in tensors.items()}  # any shape: values flatten
    save_file(tensors, str(tmp_path / "t.safetensors"))
    folder = read_folder(tmp_path)
    assert set(tensors) == set(DECODABLE)
    for key, tensor in tensors.items():
        assert folder.tensors[key].dtype == key
        ours, theirs = folder.values(key), tensor.flatten().tolist()
        assert len(ours) == len(theirs) and all(_same_value(a, b) for a, b in zip(ours, theirs)), key


def test_a_serving_dtype_is_named(good):
    assert check_checkpoint(good, serve_dtype="float16").serve_dtype == "float16"
    with pytest.raises(ValueError, match="serving dtype must be one of"):
        check_checkpoint(good, serve_dtype=torch.float16)  # a torch dtype would silently match no rule
