"""`dist-quant check`: a good checkpoint passes every rule, and one mutated copy per rule trips exactly that rule.

The mutations are the mistakes users meet when vLLM Ascend loads a quantized Qwen3-VL (a missing merger or lm_head
description entry, renamed expert keys, q/k/v split over two types, a quantization_config left in config.json, a
float32 deq_scale served in float16...); the rules are vLLM Ascend's loader's, as docs/ascend-loader-rules.md reads
them from its source."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_quant.check import check_checkpoint, format_report, refuse_unservable
from dist_quant.check.folder import DECODABLE, read_folder
from dist_quant.cli import main
from dist_quant.errors import OutputError
from dist_quant.recipe import DEFAULT_RECIPE
from dist_quant.runtime.local import quantize_single_card
from dist_quant.recipe import load_recipe
from dist_quant.synthetic import make_calibration_set, make_tiny_model

DESCRIPTION = "quant_model_description.json"
W4A8 = DEFAULT_RECIPE.parent / "qwen3_vl_moe_w4a8.yaml"
LAYER0 = "model.language_model.layers.0"
BF16 = torch.bfloat16


def quantize(tmp_path_factory, name, dtype, recipe=DEFAULT_RECIPE, **model_args):
    root = tmp_path_factory.mktemp(name)
    model = make_tiny_model(root / "model", dtype=dtype, **model_args)
    save = root / "q"
    quantize_single_card(str(model), str(save), load_recipe(recipe),
                         dataset=str(make_calibration_set(root / "calib", num_images=2)), progress=False)
    return save


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A bfloat16 W8A8 checkpoint with a dense-MLP layer (its gate/up are a fused group too)."""
    return quantize(tmp_path_factory, "good", "bfloat16", mlp_only_layers=(2,))


@pytest.fixture(scope="module")
def good_fp32(tmp_path_factory):
    return quantize(tmp_path_factory, "fp32", "float32", num_layers=2)


@pytest.fixture(scope="module")
def good_w4a8(tmp_path_factory):
    return quantize(tmp_path_factory, "w4a8", "bfloat16", W4A8, num_layers=2)


def mutate(good, tmp_path, description=None, config=None, tensors=None):
    """A copy of the checkpoint ``good`` (either format) with its description, config.json or tensors changed in
    place by the functions given (tensors: one dict of every part's tensors; each key stays in its part, a new key
    goes to the first part; the index follows)."""
    folder = tmp_path / "mutated"
    shutil.copytree(good, folder)
    for name, change in ((DESCRIPTION, description), ("config.json", config)):
        if change is not None:
            content = json.loads((folder / name).read_text())
            change(content)
            (folder / name).write_text(json.dumps(content))
    if tensors is not None:
        parts = sorted(folder.glob("*.safetensors"))
        held = {part: load_file(str(part)) for part in parts}
        merged = {k: t for part in parts for k, t in held[part].items()}
        home = {k: part for part in parts for k in held[part]}
        tensors(merged)
        for part in parts:
            kept = {k: t for k, t in merged.items() if home.get(k, parts[0]) == part}
            save_file(kept, str(part))
        index_file, = folder.glob("*.safetensors.index.json")
        index = json.loads(index_file.read_text())
        index["weight_map"] = {k: home.get(k, parts[0]).name for k in merged}
        index_file.write_text(json.dumps(index))
    return folder


def rename(old, new):
    def change(d):
        d[new] = d.pop(old)
    return change


def set_types(prefix, quant_type):
    def change(d):
        for key in d:
            if key.startswith(prefix + "."):
                d[key] = quant_type
    return change


def drop(*keys):
    def change(d):
        for key in keys:
            del d[key]
    return change


def add(key, value):
    def change(d):
        d[key] = value
    return change


def changed(key, fn):
    def change(d):
        d[key] = fn(d[key])
    return change


def both(*fns):
    def change(d):
        for fn in fns:
            fn(d)
    return change


Q, K, O = (f"{LAYER0}.self_attn.{p}_proj" for p in ("q", "k", "o"))
EXPERT3_UP = f"{LAYER0}.mlp.experts.3.up_proj"
MUTATIONS = {  # rule: (what a user would have done, the mutation, check options)
    "R1": ("lost the description", lambda ckpt, tmp: _unlink(mutate(ckpt, tmp), DESCRIPTION), {}),
    "R2": ("a quantization_config left in text_config", lambda ckpt, tmp: mutate(
        ckpt, tmp, config=lambda c: c["text_config"].update(quantization_config={"quant_method": "fp8"})), {}),
    "R3": ("a feature field in the description", lambda ckpt, tmp: mutate(
        ckpt, tmp, description=add("kv_cache_type", "C8")), {}),
    "R4": ("another model_type", lambda ckpt, tmp: mutate(ckpt, tmp, config=add("model_type", "qwen3_vl")), {}),
    "R5": ("the float model's index copied along", lambda ckpt, tmp: _touch(
        mutate(ckpt, tmp), "model.safetensors.index.json", '{"weight_map": {}}'), {}),
    "R6": ("a text-only key name", lambda ckpt, tmp: mutate(
        ckpt, tmp, description=add("model.layers.0.extra.weight", "FLOAT"),
        tensors=add("model.layers.0.extra.weight", torch.zeros(2, dtype=BF16))), {}),
    "R7": ("the float vision merger missing from the description (vllm-ascend #7538)", lambda ckpt, tmp: mutate(
        ckpt, tmp, description=drop("model.visual.merger.linear_fc1.weight")), {}),
    "R8": ("a router described with a type vLLM Ascend has no linear method for", lambda ckpt, tmp: mutate(
        ckpt, tmp, description=set_types(f"{LAYER0}.mlp.gate", "W4A8_DYNAMIC")), {}),
    "R9": ("lm_head.weight missing from the description (vllm-ascend #8367)", lambda ckpt, tmp: mutate(
        ckpt, tmp, description=drop("lm_head.weight")), {}),
    "R10": ("q/k/v split over two types", lambda ckpt, tmp: mutate(
        ckpt, tmp, description=set_types(K, "W8A8_DYNAMIC")), {}),
    "R11": ("one expert described differently from expert 0", lambda ckpt, tmp: mutate(
        ckpt, tmp, description=set_types(EXPERT3_UP, "W4A8_DYNAMIC")), {}),
    "R12": ("a bfloat16 checkpoint served in float16: deq_scale float32 where int64 is created",
            lambda ckpt, tmp: mutate(ckpt, tmp), {"serve_dtype": "float16"}),
    "R13": ("k_proj calibrated apart from q_proj", lambda ckpt, tmp: mutate(
        ckpt, tmp, tensors=changed(f"{K}.input_scale", lambda t: t * 2)), {}),
    "R17": ("a tensor-parallel size that does not divide the heads", lambda ckpt, tmp: mutate(ckpt, tmp),
            {"tp": 3}),
    "R18": ("an expert key renamed (per-expert names, vllm-ascend #4035/#4797)", lambda ckpt, tmp: mutate(
        ckpt, tmp, description=rename(f"{EXPERT3_UP}.weight_scale", f"{LAYER0}.mlp.experts.300.up_proj.weight_scale"),
        tensors=rename(f"{EXPERT3_UP}.weight_scale", f"{LAYER0}.mlp.experts.300.up_proj.weight_scale")), {}),
    "R20": ("a tensor its method has no parameter for", lambda ckpt, tmp: mutate(
        ckpt, tmp, description=add(f"{Q}.scale_bias", "W8A8"),
        tensors=add(f"{Q}.scale_bias", torch.ones(64, 1))), {}),
    "R21": ("a tensor lost", lambda ckpt, tmp: mutate(
        ckpt, tmp, description=drop(f"{O}.quant_bias"), tensors=drop(f"{O}.quant_bias")), {}),
    "R22": ("quant_bias widened to int64", lambda ckpt, tmp: mutate(
        ckpt, tmp, tensors=changed(f"{O}.quant_bias", lambda t: t.to(torch.int64))), {}),
    "R23": ("deq_scale as a column", lambda ckpt, tmp: mutate(
        ckpt, tmp, tensors=changed(f"{O}.deq_scale", lambda t: t[:, None].contiguous())), {}),
    "R24": ("a description entry lost", lambda ckpt, tmp: mutate(
        ckpt, tmp, description=drop(f"{Q}.input_scale")), {}),
}


def _unlink(folder, name):
    (folder / name).unlink()
    return folder


def _touch(folder, name, text):
    (folder / name).write_text(text)
    return folder


def test_good_checkpoints_pass_every_rule(good, good_fp32, good_w4a8):
    for ckpt in (good, good_fp32, good_w4a8):
        report = check_checkpoint(ckpt)
        assert report.ok, format_report(report)
        assert report.engines and not [v for v in report.verdicts if v.status == "n/a"]
    assert check_checkpoint(good).serve_dtype == "bfloat16" and check_checkpoint(good_fp32).serve_dtype == "float16"
    assert check_checkpoint(good, tp=2).ok and check_checkpoint(good_w4a8, tp=2).ok


def test_every_rule_has_a_mutation():
    from dist_quant.check.ascend import RULES

    assert set(MUTATIONS) == set(RULES)


@pytest.mark.parametrize("rule", sorted(MUTATIONS, key=lambda r: int(r[1:])))
def test_a_mutation_trips_exactly_its_rule(good, tmp_path, rule):
    what, make, options = MUTATIONS[rule]
    report = check_checkpoint(make(good, tmp_path), **options)
    assert report.failed() == [rule], f"{what}:\n{format_report(report)}"
    assert report.ok == (rule == "R24") and bool(report.engines) == (rule == "R24")  # R24 only warns


def test_a_float32_deq_scale_in_a_float32_model_fails_float16_serving(good_fp32, tmp_path):
    """The defect dist-quant had before 2026-12-03: float32 deq_scale for a float32 source, which vLLM's --dtype auto
    serves in float16, where the parameter is int64."""
    def floats(tensors):
        for key in [k for k in tensors if k.endswith(".deq_scale")]:
            tensors[key] = tensors[key].to(torch.int32).view(torch.float32)
    report = check_checkpoint(mutate(good_fp32, tmp_path, tensors=floats))
    assert report.failed() == ["R12"] and "deq_scale is F32, the parameter I64" in report.verdicts[11].violations[0]
    assert check_checkpoint(good_fp32, serve_dtype="bfloat16").failed() == ["R12"]  # bf16 serving: float32


def test_w4a8_rules(good_w4a8, tmp_path):
    report = check_checkpoint(mutate(good_w4a8, tmp_path, description=add("group_size", 64)))
    assert report.failed() == ["R3"]
    assert "group_size" in report.verdicts[2].violations[0]
    report = check_checkpoint(mutate(good_w4a8, tmp_path / "v", description=add("version", "0.1.0")))
    assert report.failed() == ["R3"]  # vLLM Ascend reads int4 codes packed only for version 1.0.0
    assert report.verdicts[2].violations == ["version is '0.1.0': W4A8 needs \"1.0.0\" (the packed layout)"]
    assert check_checkpoint(good_w4a8, tp=32).failed() == ["R17"]  # and heads; also 16 scale_bias chunks
    down = f"{LAYER0}.mlp.experts.0.down_proj"
    squeezed = mutate(good_w4a8, tmp_path / "b", tensors=changed(f"{down}.scale_bias", lambda t: t[:, :1].clone()))
    assert check_checkpoint(squeezed).failed() == ["R23"]


def test_the_cli_prints_the_table_and_exits_1_on_a_violation(good, tmp_path, capsys):
    assert main(["check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "| R7: every layer vLLM builds has its .weight entry" in out and "all 20 rules pass" in out
    bad = MUTATIONS["R7"][1](good, tmp_path)
    assert main(["check", str(bad), "--serve_dtype", "bfloat16", "--tp", "2"]) == 1
    out = capsys.readouterr().out
    assert "| FAIL | model.visual.merger.linear_fc1.weight (a linear layer) (1) |" in out
    assert "1 of 20 rules fail (R7)" in out
    assert main(["check", str(tmp_path / "nowhere")]) == 2


def test_quant_checks_its_output_before_publishing(good, tmp_path):
    assert "check: ascendv1 (msModelSlim) for vLLM Ascend: loads on vLLM Ascend" in (good / "quant_run.log").read_text()
    with pytest.raises(OutputError, match="not published"):
        refuse_unservable(MUTATIONS["R9"][1](good, tmp_path))


def test_msmodelslim_extras_pass_and_foreign_fields_only_warn(good, tmp_path):
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
    report = check_checkpoint(mutate(good, tmp_path, description=entries, tensors=scales))
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
