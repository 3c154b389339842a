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


@pytest.mark.parametrize("recipe", ["bundled", "w4a8", "dynamic"])
def test_the_library_decompresses_every_quantized_linear_to_our_dequantized_weight(outputs, recipe):
    ascend, ct = outputs[recipe]
    ours, theirs = ascend_weights(ascend), decompressed(ct)
    assert theirs.keys() == ours.keys() and ours
    for module, weight in ours.items():
        assert theirs[module].dtype == torch.float32 and torch.equal(theirs[module], weight), module


def test_w8a8_weight_scales_are_the_fused_deq_scale_over_the_input_scale(outputs):
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
    assert QuantizationConfig.model_validate(qc).config_groups["W8A8"].input_activations.symmetric is False
    assert not (outputs["bundled"][1] / "quant_model_description.json").exists()


@pytest.mark.parametrize("recipe, engines", [("bundled", [VLLM]), ("dynamic", [VLLM, ASCEND]),
                                             ("w4a8", [VLLM_CPU])])
def test_check_names_the_engines_each_recipe_loads_on(outputs, recipe, engines):
    report = check_checkpoint(outputs[recipe][1])
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
