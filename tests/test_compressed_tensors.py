"""The compressed-tensors export (``--save_format compressed-tensors``), read back by the compressed-tensors library
itself (0.20.1, a test dependency): its QuantizationConfig parses config.json, its compressors decompress every
quantized linear, its quantizer reproduces our static activation codes; the engine rules of ``dist-quant check``
(vLLM's and vLLM Ascend's scheme selection, docs/compressed-tensors-facts.md) name the engines each recipe loads on;
Ray and --resume give the same bytes as one card."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

if sys.version_info < (3, 11):  # the library needs Python 3.11 (its wheel says so); elsewhere it is required
    pytest.skip("compressed-tensors 0.20.1 needs Python 3.11", allow_module_level=True)

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize  # noqa: E402
from compressed_tensors.utils.match import match_quantizable_tensors  # noqa: E402
from safetensors import safe_open  # noqa: E402

from dist_quant.algorithms.int4 import unpack_int4_rows
from dist_quant.check import check_checkpoint, format_report
from dist_quant.check.compressed_tensors import ASCEND, VLLM, VLLM_CPU, ascend_type, vllm_scheme
from dist_quant.cli import main
from dist_quant.recipe import DEFAULT_RECIPE
from dist_quant.synthetic import make_calibration_set, make_tiny_model

W4A8 = DEFAULT_RECIPE.parent / "qwen3_vl_moe_w4a8.yaml"
CT = ["--save_format", "compressed-tensors"]
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "DIST_QUANT_KILL_AT"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("ct") / "model", dtype="bfloat16", mlp_only_layers=(2,))


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return make_calibration_set(tmp_path_factory.mktemp("ct_calib") / "images", num_images=2)


def dynamic_recipe(folder: Path) -> Path:
    """The bundled recipe with the static linears made W8A8_DYNAMIC: symmetric activations everywhere."""
    doc = yaml.safe_load(DEFAULT_RECIPE.read_text())
    for p in doc["spec"]["process"]:
        if p["type"] == "linear_quant" and p["qconfig"]["act"]["scope"] == "per_tensor":
            p["qconfig"]["act"] = {"scope": "per_token", "dtype": "int8", "symmetric": True, "method": "minmax"}
    path = folder / "dynamic.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def quant(model, calib, save, *extra, threads=None):
    cmd = ["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu", "--dataset", str(calib),
           "--quiet", "--expert_group_size", "4", *extra]
    assert main(cmd) == 0
    return save


@pytest.fixture(scope="module")
def outputs(model, calib, tmp_path_factory):
    """{recipe: (ascendv1 checkpoint, compressed-tensors checkpoint)} of the same runs."""
    root = tmp_path_factory.mktemp("ct_out")
    recipes = {"bundled": DEFAULT_RECIPE, "w4a8": W4A8, "dynamic": dynamic_recipe(root)}
    return {name: (quant(model, calib, root / f"{name}_ascend", "--config_path", str(r)),
                   quant(model, calib, root / f"{name}_ct", "--config_path", str(r), *CT))
            for name, r in recipes.items()}


@pytest.fixture(scope="module")
def text_outputs(tiny_text_model, text_calib, tmp_path_factory):
    """(ascendv1 checkpoint, compressed-tensors checkpoint) of the text family's tiny model with its W8A8 recipe
    (per-expert keys, vLLM's own names for the model)."""
    root = tmp_path_factory.mktemp("ct_text")
    recipe = DEFAULT_RECIPE.parent / "qwen3_moe_w8a8.yaml"
    return (quant(tiny_text_model, text_calib, root / "ascend", "--config_path", str(recipe)),
            quant(tiny_text_model, text_calib, root / "ct", "--config_path", str(recipe), *CT))


def run_of(request, recipe: str) -> tuple[Path, Path]:
    """The outputs of ``recipe``: one of this module's Qwen3-VL-MoE runs, or "text" (Qwen3-MoE, its bundled one)."""
    if recipe == "text":
        return request.getfixturevalue("text_outputs")
    return request.getfixturevalue("outputs")[recipe]


def tensors_of(folder: Path, pattern: str) -> dict[str, torch.Tensor]:
    found = {}
    for part in sorted(folder.glob(pattern)):
        with safe_open(str(part), "pt") as f:
            found.update({k: f.get_tensor(k) for k in f.keys()})
    return found


def decompressed(folder: Path) -> dict[str, torch.Tensor]:
    """Every quantized linear's dense weight, by module, as the library decompresses it from the checkpoint."""
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(config)
    tensors = tensors_of(folder, "model*.safetensors")
    dense = {}
    for scheme in qc.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format or qc.format)
        names = compressor.compression_param_names(scheme)
        for module, _ in list(match_quantizable_tensors(tensors, qc.ignore, scheme.targets, [names[0]])):
            dense[module] = compressor.decompress({n: tensors[f"{module}.{n}"] for n in names}, scheme)["weight"]
    return dense


def ascend_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Each quantized linear's dequantized weight from the ascendv1 checkpoint of the same run (FORMAT.md's roles)."""
    description = json.loads((folder / "quant_model_description.json").read_text())
    tensors = tensors_of(folder, "quant_model_weights*.safetensors")
    weights = {}
    for key, quant_type in description.items():
        if not key.endswith(".weight") or quant_type == "FLOAT":
            continue
        module = key[:-len(".weight")]
        codes = tensors[key]
        if quant_type == "W8A8":
            deq = tensors[f"{module}.deq_scale"]
            deq = deq.to(torch.int32).view(torch.float32) if deq.dtype == torch.int64 else deq
            scale = (deq / tensors[f"{module}.input_scale"])[:, None]
        else:
            scale = tensors[f"{module}.weight_scale"]
            codes = unpack_int4_rows(codes) if quant_type == "W4A8_DYNAMIC" else codes
        weights[module] = codes.to(torch.float32) * scale
    return weights


@pytest.mark.parametrize("recipe", ["bundled", "w4a8", "dynamic", "text"])
def test_the_library_decompresses_every_quantized_linear_to_our_dequantized_weight(request, recipe):
    """Exactly, but for static W8A8: ascendv1 stores its scale only fused into deq_scale (input_scale times it, one
    float32 rounding), which the reference here divides back out; compressed-tensors has the scheme's own."""
    ascend, ct = run_of(request, recipe)
    ours, theirs = ascend_weights(ascend), decompressed(ct)
    assert theirs.keys() == ours.keys() and ours
    description = json.loads((ascend / "quant_model_description.json").read_text())
    for module, weight in ours.items():
        assert theirs[module].dtype == torch.float32, module
        if description[f"{module}.weight"] == "W8A8":
            assert torch.allclose(theirs[module], weight, rtol=2 ** -22, atol=0), module
        else:
            assert torch.equal(theirs[module], weight), module


def test_w8a8_weight_scale_times_the_input_scale_is_the_fused_deq_scale(outputs):
    ascend, ct = outputs["bundled"]
    a, c = tensors_of(ascend, "quant_model_weights*.safetensors"), tensors_of(ct, "model*.safetensors")
    module = "model.language_model.layers.0.self_attn.o_proj"
    product = c[f"{module}.weight_scale"][:, 0] * c[f"{module}.input_scale"]
    assert torch.allclose(product, a[f"{module}.deq_scale"], rtol=2 ** -23, atol=0)  # one float32 rounding
    assert torch.equal(c[f"{module}.input_zero_point"], a[f"{module}.input_offset"].to(torch.int8))


def test_static_activations_quantize_as_the_library_quantizes_them(outputs):
    """Our x_q = clamp(round(x / s + o), -128, 127) (vLLM Ascend's, FORMAT.md) is the library's asymmetric
    per-tensor quantizer with input_scale = s and input_zero_point = o."""
    ascend, ct = outputs["bundled"]
    a, c = tensors_of(ascend, "quant_model_weights*.safetensors"), tensors_of(ct, "model*.safetensors")
    config = json.loads((ct / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs.model_validate(config["config_groups"]["W8A8"]["input_activations"])
    module = "model.visual.blocks.1.attn.qkv"
    s, o = a[f"{module}.input_scale"], a[f"{module}.input_offset"]
    x = torch.randn(64, 32) * 3
    ours = torch.clamp(torch.round(x / s + o), -128, 127)
    theirs = ct_quantize(x, c[f"{module}.input_scale"], c[f"{module}.input_zero_point"], args)
    assert torch.equal(theirs.to(torch.float32), ours)


def test_config_json_is_the_library_layout_with_floats_ignored(outputs, model):
    config = json.loads((outputs["bundled"][1] / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert set(qc["config_groups"]) == {"W8A8", "W8A8_DYNAMIC"} and all(
        g["format"] == "int-quantized" for g in qc["config_groups"].values())
    assert "lm_head" in qc["ignore"] and "model.language_model.layers.0.mlp.gate" in qc["ignore"]
    assert "model.visual.merger.linear_fc2" in qc["ignore"]
    source = json.loads((model / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == source
    groups = QuantizationConfig.model_validate(qc).config_groups  # read back by the library itself
    assert groups["W8A8"].input_activations.symmetric is False
    assert groups["W8A8"].input_activations.dynamic is False  # static: calibrated scales in the checkpoint
    assert groups["W8A8_DYNAMIC"].input_activations.dynamic is True  # per token, on the card
    assert groups["W8A8_DYNAMIC"].input_activations.strategy == "token"
    assert not (outputs["bundled"][1] / "quant_model_description.json").exists()


@pytest.mark.parametrize("recipe, engines", [("bundled", [VLLM]), ("dynamic", [VLLM, ASCEND]),
                                             ("w4a8", [VLLM_CPU]), ("text", [VLLM])])
def test_check_names_the_engines_each_recipe_loads_on(request, recipe, engines):
    report = check_checkpoint(run_of(request, recipe)[1])
    assert report.ok and report.engines == engines, format_report(report)


def test_vllm_and_vllm_ascend_scheme_rules():
    """The selection rules as their sources state them (docs/compressed-tensors-facts.md §4, §5): vLLM's
    _get_scheme_from_parts / get_moe_method, vLLM Ascend's _detect_quant_type."""
    ch8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
    ch4 = {**ch8, "num_bits": 4}
    static_asym = {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "tensor", "dynamic": False}
    static_sym = {**static_asym, "symmetric": True}
    token = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    assert vllm_scheme(ch8, static_asym, expert=False) == "CompressedTensorsW8A8Int8"  # input_symmetric=False
    assert vllm_scheme(ch8, static_asym, expert=True) is None  # "Found static input scales" for MoE
    assert vllm_scheme(ch8, token, expert=True) == "CompressedTensorsW8A8Int8MoEMethod"
    assert vllm_scheme(ch4, token, expert=True) == "CompressedTensorsW4A8Int8MoEMethod"  # CPU only
    assert ascend_type(ch8, static_asym, expert=False) is None  # is_symmetric False: NotImplementedError
    assert ascend_type(ch8, static_sym, expert=False) == "W8A8" and ascend_type(ch8, static_sym, expert=True) is None
    assert ascend_type(ch8, token, expert=True) == "W8A8_DYNAMIC"
    assert ascend_type(ch4, token, expert=True) == "W4A8_DYNAMIC" and ascend_type(ch4, token, expert=False) is None
    assert ascend_type({**ch8, "strategy": "tensor"}, token, expert=False) is None  # channel weights only


def test_a_broken_compressed_tensors_checkpoint_fails_check(outputs, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(outputs["bundled"][1], bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["ignore"].remove("model.visual.merger.linear_fc2")
    (bad / "config.json").write_text(json.dumps(config))
    report = check_checkpoint(bad)
    assert report.failed() == ["C4", "A1"] and not report.ok  # "Unable to find matching target"
    assert main(["check", str(bad)]) == 1


def test_ray_and_resume_write_the_same_bytes(outputs, model, calib, cluster, tmp_path):
    clean = outputs["bundled"][1]
    parts = sorted(p.name for p in clean.glob("model*.safetensors"))
    ray = quant(model, calib, tmp_path / "ray", *CT, "--workers", "2", "--ray_address", cluster.address)
    killed = tmp_path / "killed"
    cmd = ["quant", "--model_path", str(model), "--save_path", str(killed), "--device", "cpu", "--dataset",
           str(calib), "--quiet", "--expert_group_size", "4", *CT]
    child = subprocess.run([sys.executable, "-m", "dist_quant.cli", *cmd], env={**CLEAN_ENV, "DIST_QUANT_KILL_AT":
                           "experts:5"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert child.returncode == -9 and not (killed / "config.json").exists()
    assert main([*cmd, "--resume"]) == 0
    for folder in (ray, killed):
        assert sorted(p.name for p in folder.glob("model*.safetensors")) == parts
        for name in [*parts, "model.safetensors.index.json", "config.json"]:
            assert (folder / name).read_bytes() == (clean / name).read_bytes(), (folder, name)


def test_a_recipe_can_ask_for_the_format_and_eval_says_what_it_reads(outputs, model, tmp_path):
    from dist_quant.errors import CheckpointError
    from dist_quant.evaluate import evaluate
    from dist_quant.recipe import load_recipe

    doc = yaml.safe_load(DEFAULT_RECIPE.read_text())
    doc["spec"]["save"] = [{"type": "compressed_tensors", "part_file_size": 4}]
    path = tmp_path / "ct.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert load_recipe(path).saver == "compressed_tensors"
    with pytest.raises(CheckpointError, match="compressed-tensors checkpoint"):
        evaluate(str(model), str(outputs["bundled"][1]), [])


def test_overwrite_never_takes_a_float_model_folder_for_a_checkpoint(model, calib, tmp_path):
    """Every Hugging Face model has a config.json, the format's marker: only one with a compressed-tensors
    quantization_config is a checkpoint --overwrite may replace."""
    import shutil

    victim = tmp_path / "someone_elses_model"
    shutil.copytree(model, victim)
    before = sorted(p.name for p in victim.iterdir())
    cmd = ["quant", "--model_path", str(model), "--save_path", str(victim), "--device", "cpu", "--dataset",
           str(calib), "--quiet", "--overwrite", *CT]
    assert main(cmd) == 2
    assert sorted(p.name for p in victim.iterdir()) == before


def edited(outputs, tmp_path, change):
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(outputs["bundled"][1], folder)
    config = json.loads((folder / "config.json").read_text())
    change(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))
    return check_checkpoint(folder)


def test_targets_and_ignore_are_matched_as_vllm_matches_them(outputs, tmp_path):
    def linear_class(qc):  # llm-compressor's style: "Linear" for the experts' group, the rest ignored
        qc["config_groups"]["W8A8_DYNAMIC"]["targets"] = ["Linear"]
        del qc["config_groups"]["W8A8"]
    assert "C4" not in edited(outputs, tmp_path / "a", linear_class).failed()

    def hf_anchored(qc):  # vLLM matches regexes against its own names (language_model.model.layers...)
        qc["config_groups"]["W8A8_DYNAMIC"]["targets"] = [
            r"re:^model\.language_model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj$"]
    assert "C4" in edited(outputs, tmp_path / "b", hf_anchored).failed()

    def prefix_ignore(qc):  # ignore entries are names, not prefixes
        qc["ignore"] = [i for i in qc["ignore"] if not i.startswith("model.visual.merger")] + ["model.visual.merger"]
    assert edited(outputs, tmp_path / "c", prefix_ignore).failed()[:1] == ["C4"]


def test_odd_configs_give_verdicts_not_tracebacks(outputs, tmp_path):
    def old_library(qc):
        qc["config_groups"]["W8A8"]["weights"].update(observer="minmax", observer_kwargs={})
    assert edited(outputs, tmp_path / "a", old_library).ok
    assert "C3" in edited(outputs, tmp_path / "b", lambda qc: qc["config_groups"]["W8A8"]["weights"].update(
        bits=8)).failed()
    assert not edited(outputs, tmp_path / "c", lambda qc: qc.update(ignore=None)).ok
    assert not edited(outputs, tmp_path / "d", lambda qc: qc["config_groups"]["W8A8"].update(
        input_activations="int8")).ok
    assert check_checkpoint(outputs["bundled"][1], tp=3).failed()[:1] == ["C10"]


# --- one mutated checkpoint per rule, each tripping exactly its rule (as tests/test_check.py does for ascendv1) ------

def _ct_mutations():
    from helpers import add, changed, drop, mutate

    layer0 = "model.language_model.layers.0"
    k_proj, o_proj = f"{layer0}.self_attn.k_proj", f"{layer0}.self_attn.o_proj"
    expert3 = f"{layer0}.mlp.experts.3.up_proj"

    def qc(change):
        return lambda c: change(c["quantization_config"])

    def group(change):  # the dynamic recipe's one group (W8A8_DYNAMIC: linears and experts)
        return qc(lambda q: change(q["config_groups"]["W8A8_DYNAMIC"]))

    def k_in_its_own_group(q):  # same arguments, another group: only the fused-group rule can tell
        body = q["config_groups"]["W8A8_DYNAMIC"]
        body["targets"].remove(k_proj)
        q["config_groups"]["W8A8_DYNAMIC_K"] = {**body, "targets": [k_proj]}

    def index_misses(folder, key):
        path = folder / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        del index["weight_map"][key]
        path.write_text(json.dumps(index))
        return folder

    return {  # rule: (what a user would have done, the mutation, check options)
        "C1": ("a config saved before compression", lambda ckpt, tmp: mutate(
            ckpt, tmp, config=qc(lambda q: q.update(quantization_status="frozen"))), {}),
        "C2": ("an ascendv1 description copied along", lambda ckpt, tmp: _touch(
            mutate(ckpt, tmp), "quant_model_description.json", "{}"), {}),
        "C3": ("an argument of another library's spelling", lambda ckpt, tmp: mutate(
            ckpt, tmp, config=group(lambda g: g["weights"].update(bits=8))), {}),
        "C4": ("the merger's second linear no longer ignored", lambda ckpt, tmp: mutate(
            ckpt, tmp, config=qc(lambda q: q["ignore"].remove("model.visual.merger.linear_fc2"))), {}),
        "C5": ("k_proj in a group of its own", lambda ckpt, tmp: mutate(
            ckpt, tmp, config=qc(k_in_its_own_group)), {}),
        "C6": ("a linear's weight_scale lost", lambda ckpt, tmp: mutate(
            ckpt, tmp, tensors=drop(f"{o_proj}.weight_scale")), {}),
        "C7": ("an expert key renamed past num_experts", lambda ckpt, tmp: mutate(
            ckpt, tmp, tensors=lambda t: t.update({f"{layer0}.mlp.experts.300.up_proj.weight_scale":
                                                   t.pop(f"{expert3}.weight_scale")})), {}),
        "C8": ("the final norm lost", lambda ckpt, tmp: mutate(
            ckpt, tmp, tensors=drop("model.language_model.norm.weight")), {}),
        "C9": ("an index that misses a tensor", lambda ckpt, tmp: index_misses(
            mutate(ckpt, tmp), f"{o_proj}.weight"), {}),
        "C10": ("a tensor-parallel size that does not divide the heads", lambda ckpt, tmp: mutate(ckpt, tmp),
                {"tp": 3}),
        "V1": ("float activations with int weights (vLLM has no such scheme)", lambda ckpt, tmp: mutate(
            ckpt, tmp, config=group(lambda g: g["input_activations"].update(type="float"))), {}),
        "A1": ("asymmetric dynamic activations (vLLM Ascend has symmetric ones only)", lambda ckpt, tmp: mutate(
            ckpt, tmp, config=group(lambda g: g["input_activations"].update(symmetric=False))), {}),
    }, changed, add


def _touch(folder, name, text):
    (folder / name).write_text(text)
    return folder


CT_MUTATIONS = _ct_mutations()[0]


def test_every_compressed_tensors_rule_has_a_mutation():
    from dist_quant.check.compressed_tensors import RULES

    assert set(CT_MUTATIONS) == set(RULES)


@pytest.mark.parametrize("rule", list(CT_MUTATIONS))
def test_a_mutation_trips_exactly_its_compressed_tensors_rule(outputs, tmp_path, rule):
    base = outputs["dynamic"][1]  # every rule passes: it loads on vLLM and vLLM Ascend
    assert check_checkpoint(base).failed() == []
    what, make, options = CT_MUTATIONS[rule]
    report = check_checkpoint(make(base, tmp_path), **options)
    assert report.failed() == [rule], f"{what}:\n{format_report(report)}"
    engine_rule = rule in ("V1", "A1")
    assert report.ok == engine_rule and report.engines == ([ASCEND] if rule == "V1" else [VLLM] if rule == "A1"
                                                           else [])


@pytest.fixture(scope="module")
def w4a8_16_heads(calib, tmp_path_factory):
    """A W4A8 compressed-tensors checkpoint whose heads split 16 ways, and whose int4 experts' 48 gate rows do not
    split 16 ways into an even count per rank (3): only the int4 packing condition of C10 fails at tp 16."""
    root = tmp_path_factory.mktemp("ct16")
    model = make_tiny_model(root / "model", dtype="bfloat16", num_heads=16, num_kv_heads=16, vision_hidden=64,
                            vision_heads=16, num_layers=2)
    return quant(model, calib, root / "ct", "--config_path", str(W4A8), *CT)


def test_int4_experts_need_an_even_row_count_per_rank(w4a8_16_heads):
    assert "C10" not in check_checkpoint(w4a8_16_heads, tp=2).failed()
    report = check_checkpoint(w4a8_16_heads, tp=16)
    assert "C10" in report.failed(), format_report(report)
    bad = next(v.violations for v in report.verdicts if v.rule.id == "C10")
    assert bad == [f"model.language_model.layers.{i}.mlp.experts.0.gate_proj: 48/16 rows per rank, packed two per "
                   "byte" for i in (0, 1)]  # expert 0 stands for its layer's experts


# --- regexes from the checkpoint: bounded, and each bad one named ---------------------------------------------------

def test_a_catastrophic_regex_is_named_and_does_not_hang(outputs, tmp_path):
    import time

    def hang(qc):  # Python's re backtracks 2^n on it (n: a layer name's length): vLLM would hang at load
        qc["ignore"].append("re:(.*)*Q$")
    start = time.monotonic()
    report = edited(outputs, tmp_path, hang)
    assert time.monotonic() - start < 30
    assert report.failed() == ["C4", "A1"]  # A1: the bundled recipe's static asymmetric linears, as before
    c4 = next(v.violations for v in report.verdicts if v.rule.id == "C4")
    assert c4 == ["'re:(.*)*Q$' in config.json quantization_config.ignore did not finish matching the layer names in "
                  "1 s with Python's re: it backtracks catastrophically and vLLM would hang at load; write it without "
                  "nested repeats"]


def test_an_invalid_regex_is_named_and_the_others_still_apply(outputs, tmp_path):
    def broken(qc):
        qc["config_groups"]["W8A8_DYNAMIC"]["targets"].insert(0, "re:(unclosed")
    report = edited(outputs, tmp_path, broken)
    assert report.failed() == ["C4", "A1"]  # the experts' regexes still match them: nothing else is unmatched
    c4 = next(v.violations for v in report.verdicts if v.rule.id == "C4")
    assert len(c4) == 1 and c4[0].startswith("'re:(unclosed' in config.json quantization_config.config_groups."
                                             "W8A8_DYNAMIC.targets is not a regular expression (missing ),")


def test_the_export_itself_ignores_every_float_linear_and_keeps_static_inputs_static():
    """The export's own output, before any check or publish (the checker once caught these mutants only by
    accident, inside a fixture): every FLOAT linear, the merger's among them, is in ``ignore``, and the library reads
    W8A8's inputs as static, W8A8_DYNAMIC's as dynamic per token."""
    from dist_quant.checkpoint.formats import compressed_tensors as ct

    types = {"model.visual.merger.linear_fc1.weight": "FLOAT", "model.visual.merger.linear_fc2.weight": "FLOAT",
             "model.visual.merger.linear_fc2.bias": "FLOAT", "model.language_model.layers.0.mlp.gate.weight": "FLOAT",
             "model.language_model.layers.0.self_attn.q_proj.weight": "W8A8",
             "model.language_model.layers.0.self_attn.q_proj.input_scale": "W8A8",
             "model.language_model.layers.0.mlp.experts.0.up_proj.weight": "W8A8_DYNAMIC",
             "lm_head.weight": "FLOAT"}
    qc = ct.quantization_config(types)
    floats = {k.rsplit(".", 1)[0] for k, t in types.items() if t == "FLOAT"}
    assert floats <= set(qc["ignore"]) and "model.language_model.layers.0.self_attn.q_proj" not in qc["ignore"]
    groups = QuantizationConfig.model_validate(qc).config_groups
    assert groups["W8A8"].input_activations.dynamic is False
    assert groups["W8A8_DYNAMIC"].input_activations.dynamic is True


@pytest.mark.parametrize("model_type, key, vllm_module", [
    ("qwen3_vl_moe", "model.language_model.layers.0.mlp.experts.0.up_proj.weight",
     "language_model.model.layers.0.mlp.experts.0.up_proj"),  # vLLM's Qwen3-VL-MoE renames the text model
    ("qwen3_moe", "model.layers.0.mlp.experts.0.up_proj.weight", "model.layers.0.mlp.experts.0.up_proj"),
])
def test_published_types_match_regexes_against_the_familys_vllm_names(tmp_path, model_type, key, vllm_module):
    """A ``re:`` target is matched against the name vLLM's model class of config.json's family gives the module
    (written out here by hand): the same regex against the checkpoint's own name would match for one family only."""
    from dist_quant.checkpoint.formats import compressed_tensors as ct
    from dist_quant.errors import CheckpointError

    def publish(config_model_type, target):
        qc = {"config_groups": {"W8A8_DYNAMIC": {"targets": [target]}}, "quant_method": "compressed-tensors"}
        (tmp_path / "config.json").write_text(json.dumps({"model_type": config_model_type, "quantization_config": qc}))
        (tmp_path / ct.INDEX_FILE).write_text(json.dumps({"weight_map": {key: "model.safetensors"}}))

    publish(model_type, "re:" + vllm_module.replace(".", r"\.") + "$")
    assert ct.published_types(tmp_path) == {key: "W8A8_DYNAMIC"}
    publish(model_type, "re:" + key.removesuffix(".weight").replace(".", r"\.") + "$")
    assert ct.published_types(tmp_path) == {key: "W8A8_DYNAMIC" if key.startswith(vllm_module) else "FLOAT"}
    publish("llama", "re:.*")
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        ct.published_types(tmp_path)


# --- MXFP8: the library's mxfp8-quantized format (upstream vLLM's CompressedTensorsW8A8Mxfp8) ----------------------

MXFP8 = DEFAULT_RECIPE.parent / "qwen3_vl_moe_w8a8_mxfp8.yaml"
MX_LINEAR = "model.language_model.layers.0.self_attn.o_proj"


@pytest.fixture(scope="module")
def mx_outputs(calib, tmp_path_factory):
    """(ascendv1, compressed-tensors) checkpoints of the bundled MXFP8 recipe (QuaRot, smoothing, MXFP8 experts) on
    a tiny model whose expert widths MXFP8 experts take (intermediate 128: an even number of 32-blocks)."""
    root = tmp_path_factory.mktemp("ct_mx")
    model = make_tiny_model(root / "model", dtype="bfloat16", moe_intermediate_size=128, mlp_only_layers=(2,))
    return (quant(model, calib, root / "ascend", "--config_path", str(MXFP8)),
            quant(model, calib, root / "ct", "--config_path", str(MXFP8), *CT))


def mx_decoded(folder: Path) -> dict[str, torch.Tensor]:
    """Each MXFP8 linear's weight from the ascendv1 checkpoint, decoded here: float8_e4m3fn elements times
    2^(byte - 127) per 32 inputs (float64: exact)."""
    description = json.loads((folder / "quant_model_description.json").read_text())
    tensors = tensors_of(folder, "quant_model_weights*.safetensors")
    weights = {}
    for key, quant_type in description.items():
        if key.endswith(".weight") and quant_type == "W8A8_MXFP8":
            module = key[:-len(".weight")]
            factor = torch.exp2(tensors[f"{module}.weight_scale"].to(torch.float64) - 127)
            weights[module] = tensors[key].to(torch.float64) * factor.repeat_interleave(32, dim=1)
    return weights


def test_the_library_decompresses_every_mxfp8_linear_to_the_ascendv1_weights(mx_outputs):
    """The same elements and scales as the ascendv1 checkpoint of the same run, experts included, read back by the
    library's own MXFP8 compressor (E8M0 bytes to bf16 powers of two, times the float8 elements)."""
    ascend, ct = mx_outputs
    ours, theirs = mx_decoded(ascend), decompressed(ct)
    assert theirs.keys() == ours.keys() and f"{MX_LINEAR}" in ours
    assert any(".mlp.experts." in m for m in ours)
    for module, weight in ours.items():
        assert torch.equal(theirs[module].to(torch.float64), weight), module
    raw = tensors_of(ct, "model*.safetensors")
    assert raw[f"{MX_LINEAR}.weight"].dtype == torch.float8_e4m3fn
    assert raw[f"{MX_LINEAR}.weight_scale"].dtype == torch.uint8


def test_mxfp8_groups_are_the_librarys_own_mxfp8_preset_and_format(mx_outputs):
    """The group's arguments are the library's MXFP8 preset as it serializes it (weights and dynamic activations), the
    library's own format inference gives the group's format; config.json's top-level format is the group's."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import MXFP8 as LIBRARY_MXFP8

    qc = json.loads((mx_outputs[1] / "config.json").read_text())["quantization_config"]
    assert set(qc["config_groups"]) == {"W8A8_MXFP8"} and qc["format"] == "mxfp8-quantized"
    body = qc["config_groups"]["W8A8_MXFP8"]
    scheme = QuantizationScheme.model_validate(body)
    for side in ("weights", "input_activations"):  # as the library writes the preset into config.json
        assert body[side] == getattr(scheme, side).model_dump() == LIBRARY_MXFP8[side].model_dump(), side
    assert infer_module_format(torch.nn.Linear, scheme).value == body["format"] == "mxfp8-quantized"


def test_a_checkpoint_of_mxfp8_and_int8_groups_is_mixed_precision():
    from compressed_tensors.compressors.format import infer_module_format

    from dist_quant.checkpoint.formats import compressed_tensors as ct

    qc = ct.quantization_config({"model.language_model.layers.0.self_attn.q_proj.weight": "W8A8_MXFP8",
                                 "model.language_model.layers.0.mlp.experts.0.up_proj.weight": "W8A8_DYNAMIC"})
    assert qc["format"] == "mixed-precision"
    for name, scheme in QuantizationConfig.model_validate(qc).config_groups.items():
        assert infer_module_format(torch.nn.Linear, scheme).value == qc["config_groups"][name]["format"], name


def test_check_accepts_mxfp8_for_vllm_on_gpus_only(mx_outputs):
    report = check_checkpoint(mx_outputs[1])
    assert report.ok and report.engines == [VLLM], format_report(report)  # vLLM Ascend's CT path has no MXFP8


@pytest.mark.parametrize("rule, what, change, options", [
    ("C6", "float32 scales in an MXFP8 group (the library's compressor writes E8M0 bytes)",
     lambda t: t.update({f"{MX_LINEAR}.weight_scale": t[f"{MX_LINEAR}.weight_scale"].to(torch.float32)}), {}),
    ("C6", "int8 codes in an MXFP8 group",
     lambda t: t.update({f"{MX_LINEAR}.weight": t[f"{MX_LINEAR}.weight"].view(torch.int8)}), {}),
    ("C10", "a tensor-parallel size that leaves part of a 32-block per rank (the dense MLP's down_proj: 96 / 2)",
     None, {"tp": 2}),
])
def test_an_mxfp8_mutation_trips_its_rule(mx_outputs, tmp_path, rule, what, change, options):
    from helpers import mutate

    report = check_checkpoint(mutate(mx_outputs[1], tmp_path, tensors=change), **options)
    assert report.failed() == [rule, "A1"], f"{what}:\n{format_report(report)}"  # A1: vLLM Ascend, as unmutated
    if rule == "C10":
        assert next(v.violations for v in report.verdicts if v.rule.id == "C10") == [
            "model.language_model.layers.2.mlp.down_proj [64, 96]: 48 inputs per rank, not whole MXFP8 groups of 32"]


def test_vllm_picks_its_mxfp8_scheme_by_the_weights_alone():
    """vLLM's ``_is_mxfp8`` looks at the weights (uint8 scale_dtype included) and at nothing else."""
    mx = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group", "dynamic": False,
          "scale_dtype": "torch.uint8"}
    for inputs in ({**mx, "dynamic": True}, None):
        assert vllm_scheme(mx, inputs, expert=False) == "CompressedTensorsW8A8Mxfp8"
        assert vllm_scheme(mx, inputs, expert=True) == "CompressedTensorsW8A8Mxfp8MoEMethod"
        assert ascend_type(mx, inputs, expert=False) is None  # vLLM Ascend's compressed-tensors path has no MXFP8
    without = {k: v for k, v in mx.items() if k != "scale_dtype"}  # float scales: the library's float-quantized
    assert vllm_scheme(without, {**without, "dynamic": True}, expert=False) is None
