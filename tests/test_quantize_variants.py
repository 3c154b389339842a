"""The quantizer on other shapes, dtypes and layouts of the source checkpoint, and the CLI's errors."""

import json

import pytest
import torch

from dist_quant.cli import main
from dist_quant.synthetic import make_tiny_model, make_tiny_text_model
from helpers import FAMILY_TYPES, LAYERS, read_checkpoint


def quantize(model, calib_index, save, *extra):
    return main(["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu",
                 "--dataset", str(calib_index), "--quiet", *extra])


VISION_ARGS = ("vision_depth", "vision_heads", "deepstack")


def family_model_of(family, folder, calib_index, text_calib, **shape):
    """A tiny model of the family with ``shape`` (the text family takes no vision arguments) and its calibration
    set."""
    if family == "qwen3_vl_moe":
        return make_tiny_model(folder, **shape), calib_index
    return make_tiny_text_model(folder, **{k: v for k, v in shape.items() if k not in VISION_ARGS}), text_calib


@pytest.mark.parametrize("family", FAMILY_TYPES)
@pytest.mark.parametrize("shape", [
    dict(num_layers=2, num_experts=4, top_k=1, vision_depth=2, deepstack=(0,)),
    dict(num_layers=5, num_experts=12, top_k=3, num_heads=8, num_kv_heads=4, head_dim=8, vision_depth=6,
         vision_heads=4, deepstack=(1, 3, 5)),
])
def test_other_shapes_need_no_code_change(tmp_path, calib_index, text_calib, shape, family):
    model, dataset = family_model_of(family, tmp_path / "model", calib_index, text_calib, **shape)
    assert quantize(model, dataset, tmp_path / "out") == 0
    tensors, description, _ = read_checkpoint(tmp_path / "out")
    layers, experts = shape["num_layers"], shape["num_experts"]
    assert len([k for k in tensors if k.endswith("experts.0.gate_proj.weight")]) == layers
    assert f"{LAYERS[family]}.{layers - 1}.mlp.experts.{experts - 1}.down_proj.weight_scale" in tensors
    assert len([k for k in tensors if ".mlp.experts." in k and k.endswith(".weight")]) == layers * experts * 3
    if family == "qwen3_moe":
        assert not [k for k in tensors if "visual" in k]
        return
    assert f"model.visual.blocks.{shape['vision_depth'] - 1}.attn.qkv.deq_scale" in tensors
    assert len([k for k in tensors if k.startswith("model.visual.deepstack_merger_list.")
                and k.endswith("linear_fc2.weight")]) == len(shape["deepstack"])


def test_transposed_and_sharded_sources_give_the_same_checkpoint(tmp_path, calib_index):
    reference = make_tiny_model(tmp_path / "hub", seed=3)
    other = make_tiny_model(tmp_path / "t", seed=3, layout="transposed", shard_size="300KB")
    assert (other / "model.safetensors.index.json").exists()
    assert quantize(reference, calib_index, tmp_path / "q1") == 0
    assert quantize(other, calib_index, tmp_path / "q2") == 0
    (a, da, _), (b, db, _) = read_checkpoint(tmp_path / "q1"), read_checkpoint(tmp_path / "q2")
    assert da == db and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILY_TYPES)
@pytest.mark.parametrize("dtype, deq_dtype", [("bfloat16", torch.float32), ("float16", torch.int64),
                                              ("float32", torch.int64)])
def test_half_precision_sources(tmp_path, calib_index, text_calib, dtype, deq_dtype, family):
    """The source dtype (config.json's, where each family keeps it) decides the float tensors' dtype and deq_scale's."""
    model, dataset = family_model_of(family, tmp_path / "model", calib_index, text_calib, dtype=dtype)
    assert quantize(model, dataset, tmp_path / "out") == 0
    tensors, _, _ = read_checkpoint(tmp_path / "out")
    float_dtype = getattr(torch, dtype)
    layers = LAYERS[family]
    assert tensors["lm_head.weight"].dtype == float_dtype
    assert tensors[f"{layers}.0.mlp.gate.weight"].dtype == float_dtype
    assert tensors[f"{layers}.0.self_attn.q_proj.deq_scale"].dtype == deq_dtype
    assert int(tensors[f"{layers}.1.mlp.experts.3.up_proj.weight"].min()) >= -127
    if family == "qwen3_vl_moe":
        assert tensors["model.visual.blocks.0.mlp.linear_fc2.weight"].dtype == float_dtype
        assert tensors["model.visual.blocks.0.attn.qkv.bias"].dtype == torch.float32


def test_npu_without_torch_npu_is_a_clear_error(tmp_path, tiny_model, calib_index, capsys):
    rc = main(["quant", "--model_path", str(tiny_model), "--save_path", str(tmp_path / "out"), "--device", "npu",
               "--dataset", str(calib_index)])
    assert rc == 2
    assert "torch_npu" in capsys.readouterr().err
    assert not (tmp_path / "out" / "quant_model_description.json").exists()


def test_wrong_model_type_is_refused(tmp_path, tiny_model, calib_index, capsys):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "qwen2_vl"
    (model / "config.json").write_text(json.dumps(config))
    assert quantize(model, calib_index, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "qwen2_vl" in err and "qwen3_vl_moe" in err
    assert not (tmp_path / "out" / "quant_model_description.json").exists()


def test_missing_dataset_is_a_clear_error(tmp_path, tiny_model, capsys):
    assert quantize(tiny_model, tmp_path / "nowhere.jsonl", tmp_path / "out") == 2
    assert "nowhere.jsonl" in capsys.readouterr().err
