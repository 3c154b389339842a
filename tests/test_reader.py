import json

import pytest
import torch
from safetensors.torch import save_file

from dist_quant.checkpoint.reader import CheckpointReader
from dist_quant.errors import CheckpointError
from dist_quant.models.qwen3_vl_moe_experts import detect_expert_layout, read_experts

E, H, M = 6, 16, 12  # experts, hidden, moe intermediate: 2M != H and M != H, so the layout is unambiguous
PREFIX = "model.language_model.layers.3"


def write_model(model_dir, shards, config=None):
    """shards: {file name: {key: tensor}}; more than one shard also gets an index."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config or {"model_type": "qwen3_vl_moe"}))
    for name, tensors in shards.items():
        save_file(tensors, str(model_dir / name))
    if len(shards) > 1:
        weight_map = {key: name for name, tensors in shards.items() for key in tensors}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model_dir


def linear_experts():
    """Reference per-expert nn.Linear weights [out, in]."""
    torch.manual_seed(0)
    return torch.randn(E, M, H), torch.randn(E, M, H), torch.randn(E, H, M)


def fused(layout, gate, up, down):
    if layout == "hub":  # applied as x @ W
        return torch.cat([gate.transpose(1, 2), up.transpose(1, 2)], dim=2), down.transpose(1, 2).contiguous()
    return torch.cat([gate, up], dim=1), down


@pytest.fixture
def sharded(tmp_path):
    return write_model(
        tmp_path / "model",
        {
            "model-00001-of-00002.safetensors": {"a.weight": torch.randn(4, 3), "b.weight": torch.randn(5)},
            "model-00002-of-00002.safetensors": {"c.weight": torch.randn(8, 2, dtype=torch.bfloat16)},
        },
        config={"model_type": "qwen3_vl_moe", "text_config": {"hidden_size": H}},
    )


def test_sharded_model_metadata_and_values(sharded):
    with CheckpointReader(sharded) as reader:
        assert reader.config["text_config"]["hidden_size"] == H
        assert sorted(reader.keys()) == ["a.weight", "b.weight", "c.weight"]
        assert "a.weight" in reader and "z.weight" not in reader
        assert reader.shape("c.weight") == (8, 2)
        assert reader.dtype("c.weight") == torch.bfloat16
        assert reader.file_of("c.weight") == sharded / "model-00002-of-00002.safetensors"
        assert reader.bytes_read == 0  # headers only so far
        c = reader.get("c.weight")
        assert c.dtype == torch.bfloat16 and reader.bytes_read == 8 * 2 * 2
        assert reader.get("c.weight", dtype=torch.float32).dtype == torch.float32


def test_single_file_model(tmp_path):
    tensors = {"x": torch.randn(3, 2, dtype=torch.float16), "y": torch.randn(2)}
    model = write_model(tmp_path / "m", {"model.safetensors": tensors})
    reader = CheckpointReader(model)
    assert sorted(reader.keys()) == ["x", "y"]
    assert reader.file_of("x") == model / "model.safetensors"
    assert torch.equal(reader.get("x"), tensors["x"])


def test_get_slice_reads_only_the_rows_asked_for(tmp_path):
    big = torch.randn(10, 4, 3, dtype=torch.bfloat16)
    big[0, 0, 0] = float("nan")  # outside the slice: never read, so never reported
    reader = CheckpointReader(write_model(tmp_path / "m", {"model.safetensors": {"big": big}}))
    rows = reader.get_slice("big", 2, 5, dtype=torch.float32)
    assert rows.dtype == torch.float32 and torch.equal(rows, big[2:5].float())
    assert reader.bytes_read == 3 * 4 * 3 * 2
    with pytest.raises(ValueError):
        reader.get_slice("big", 8, 11)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor_names_tensor_and_file(tmp_path, bad):
    t = torch.ones(4, 2)
    t[1, 1] = bad
    reader = CheckpointReader(write_model(tmp_path / "m", {"model.safetensors": {"w": t}}))
    with pytest.raises(CheckpointError, match=r"w in .*model\.safetensors"):
        reader.get("w")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        reader.get_slice("w", 0, 2)
    assert torch.equal(reader.get_slice("w", 2, 4), torch.ones(2, 2))


def test_unknown_key_names_key_and_model_dir(sharded):
    reader = CheckpointReader(sharded)
    for call in (reader.get, reader.shape, reader.dtype, reader.file_of):
        with pytest.raises(CheckpointError, match=rf"nope\.weight.*{sharded}"):
            call("nope.weight")


def test_missing_or_invalid_config(tmp_path):
    model = write_model(tmp_path / "m", {"model.safetensors": {"w": torch.ones(1)}})
    (model / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        CheckpointReader(model)
    (model / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        CheckpointReader(model)


def test_no_weights(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        CheckpointReader(model)


def test_index_naming_missing_shard(sharded):
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*model-00002-of-00002"):
        CheckpointReader(sharded)


def test_index_placing_key_in_wrong_shard(sharded):
    index = sharded / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    content["weight_map"]["c.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match="c.weight"):
        CheckpointReader(sharded)


def test_truncated_file_names_the_file(sharded):
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        CheckpointReader(sharded)


def test_check_shape_and_dtype(tmp_path):
    tensors = {"w": torch.randn(4, 3, dtype=torch.bfloat16), "ids": torch.arange(4)}
    reader = CheckpointReader(write_model(tmp_path / "m", {"model.safetensors": tensors}))
    reader.check("w", shape=(4, 3))
    reader.check("w", dtype_in=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"w in .*model\.safetensors.*\(4, 3\).*\(3, 4\)"):
        reader.check("w", shape=(3, 4))
    with pytest.raises(CheckpointError, match="ids.*int64"):
        reader.check("ids")
    with pytest.raises(CheckpointError, match="bfloat16"):
        reader.check("w", dtype_in=(torch.float32,))


def test_detect_expert_layout():
    assert detect_expert_layout((E, H, 2 * M), (E, M, H), E, H, M) == "hub"
    assert detect_expert_layout((E, 2 * M, H), (E, H, M), E, H, M) == "transposed"
    with pytest.raises(CheckpointError, match=r"\(6, 16, 24\).*expects"):
        detect_expert_layout((E, H, 2 * M), (E, M, H + 1), E, H, M)
    with pytest.raises(CheckpointError, match="num_experts=7"):
        detect_expert_layout((E, H, 2 * M), (E, M, H), E + 1, H, M)


@pytest.mark.parametrize("hidden, inter", [(16, 8), (16, 16)])  # 2M == hidden, M == hidden
def test_detect_expert_layout_refuses_ambiguous_shapes(hidden, inter):
    with pytest.raises(CheckpointError, match="cannot tell the expert layout"):
        detect_expert_layout((E, hidden, 2 * inter), (E, inter, hidden), E, hidden, inter)


@pytest.mark.parametrize("layout", ["hub", "transposed"])
@pytest.mark.parametrize("source_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_read_experts_returns_linear_weights_for_both_layouts(tmp_path, layout, source_dtype):
    gate, up, down = (w.to(source_dtype) for w in linear_experts())
    gate_up_fused, down_fused = fused(layout, gate, up, down)
    tensors = {
        f"{PREFIX}.mlp.experts.gate_up_proj": gate_up_fused,
        f"{PREFIX}.mlp.experts.down_proj": down_fused,
    }
    reader = CheckpointReader(write_model(tmp_path / "m", {"model.safetensors": tensors}))
    experts = read_experts(reader, PREFIX, 2, 5, num_experts=E, hidden=H, intermediate=M)
    assert len(experts) == 3
    for offset, (g, u, d) in enumerate(experts):
        e = 2 + offset
        assert g.shape == (M, H) and u.shape == (M, H) and d.shape == (H, M)
        assert all(t.is_contiguous() and t.dtype == torch.float32 for t in (g, u, d))
        assert torch.equal(g, gate[e].float()) and torch.equal(u, up[e].float()) and torch.equal(d, down[e].float())
    assert reader.bytes_read == 3 * (2 * M * H + H * M) * source_dtype.itemsize


def test_read_experts_matches_the_hub_expert_forward(tmp_path):
    """transformers' experts: expert(x) = (silu(x @ gate) * (x @ up)) @ down, gate = gate_up[e][:, :M], up = [:, M:]."""
    gate_up_fused, down_fused = fused("hub", *linear_experts())
    tensors = {f"{PREFIX}.mlp.experts.gate_up_proj": gate_up_fused, f"{PREFIX}.mlp.experts.down_proj": down_fused}
    reader = CheckpointReader(write_model(tmp_path / "m", {"model.safetensors": tensors}))
    x = torch.randn(5, H)
    (g, u, d), = read_experts(reader, PREFIX, 4, 5, num_experts=E, hidden=H, intermediate=M)
    hub = (torch.nn.functional.silu(x @ gate_up_fused[4][:, :M]) * (x @ gate_up_fused[4][:, M:])) @ down_fused[4]
    linear = torch.nn.functional.linear(torch.nn.functional.silu(x @ g.T) * (x @ u.T), d)
    torch.testing.assert_close(linear, hub)


def test_read_experts_rejects_shapes_not_matching_config(tmp_path):
    gate_up_fused, down_fused = fused("hub", *linear_experts())
    tensors = {f"{PREFIX}.mlp.experts.gate_up_proj": gate_up_fused, f"{PREFIX}.mlp.experts.down_proj": down_fused}
    reader = CheckpointReader(write_model(tmp_path / "m", {"model.safetensors": tensors}))
    with pytest.raises(CheckpointError, match="moe_intermediate_size=10"):
        read_experts(reader, PREFIX, 0, 1, num_experts=E, hidden=H, intermediate=10)
    with pytest.raises(CheckpointError, match="layers.4.mlp.experts.gate_up_proj"):
        read_experts(reader, "model.language_model.layers.4", 0, 1, num_experts=E, hidden=H, intermediate=M)
