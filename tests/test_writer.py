"""The writer's output is checked against docs/FORMAT.md directly, not through the writer's own constants."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dist_quant.checkpoint.formats.ascendv1 import model_quant_type
from dist_quant.checkpoint.unit_file import UnitSink
from dist_quant.checkpoint.writer import CheckpointWriter
from dist_quant.errors import OutputError, RecipeError

DESCRIPTION = "quant_model_description.json"
INDEX = "quant_model_weights.safetensors.index.json"
TOP_LEVEL_FIELDS = {"version", "model_quant_type", "metadata", "group_size", "optional"}


@pytest.fixture
def source(tmp_path):
    """A float model directory as downloaded from the Hub (weights, index, tokenizer, template, code)."""
    model = tmp_path / "source"
    model.mkdir()
    config = {
        "model_type": "qwen3_vl_moe",
        "quantization_config": {"quant_method": "fp8"},
        "compression_config": {"quant_method": "compressed-tensors"},
        "text_config": {"hidden_size": 8, "quantization_config": {"quant_method": "fp8"},
                        "compression_config": {}},
        "vision_config": {"depth": 2},
    }
    (model / "config.json").write_text(json.dumps(config))
    save_file({"w": torch.ones(2)}, str(model / "model-00001-of-00001.safetensors"))
    float_index = {"weight_map": {"w": "model-00001-of-00001.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(float_index))
    (model / "other.index.json").write_text("{}")
    (model / "tokenizer.json").write_text('{"tok": 1}')
    (model / "generation_config.json").write_text("{}")
    (model / "chat_template.jinja").write_text("{{ messages }}")
    (model / "merges.txt").write_text("a b")
    (model / "modeling_extra.py").write_text("# code")
    (model / "README.md").write_text("# not copied")
    return model


def int8_weight(out_features, in_features):
    return torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8)


def tensors_of_a_layer(layers="model.language_model.layers"):
    """A mix of the three quant types, with the dtypes FORMAT.md prescribes (a Qwen3-VL-MoE layer, or a Qwen3-MoE one
    with ``layers`` "model.layers")."""
    layer = f"{layers}.0"
    return [
        (f"{layer}.self_attn.q_proj.weight", int8_weight(32, 16), "W8A8"),
        (f"{layer}.self_attn.q_proj.input_scale", torch.tensor([0.1]), "W8A8"),
        (f"{layer}.self_attn.q_proj.input_offset", torch.tensor([3.0]), "W8A8"),
        (f"{layer}.self_attn.q_proj.deq_scale", torch.rand(32), "W8A8"),
        (f"{layer}.self_attn.q_proj.quant_bias", torch.zeros(32, dtype=torch.int32), "W8A8"),
        (f"{layer}.mlp.experts.0.gate_proj.weight", int8_weight(24, 16), "W8A8_DYNAMIC"),
        (f"{layer}.mlp.experts.0.gate_proj.weight_scale", torch.rand(24, 1), "W8A8_DYNAMIC"),
        (f"{layer}.mlp.experts.0.gate_proj.weight_offset", torch.zeros(24, 1), "W8A8_DYNAMIC"),
        (f"{layer}.mlp.gate.weight", torch.randn(4, 16, dtype=torch.bfloat16), "FLOAT"),
        ("lm_head.weight", torch.randn(64, 16, dtype=torch.bfloat16), "FLOAT"),
    ]


def write(save_path, source, entries, units=1, **options):
    """What the driver does: lay out the parts for the units (consecutive runs of ``entries``), then each unit writes
    its tensors into their places through a UnitSink, as a worker does, and is added."""
    writer = CheckpointWriter(save_path, model_path=source, **options)
    size = -(-len(entries) // units)
    chunks = {f"u{i}": entries[first:first + size] for i, first in enumerate(range(0, len(entries), size))}
    writer.set_layout([(unit, [(k, t.dtype, tuple(t.shape)) for k, t, _ in chunk]) for unit, chunk in chunks.items()])
    writer.create_parts()
    sink = UnitSink(writer.staging)
    for unit, chunk in reversed(list(chunks.items())):  # in any order, as actors finish
        for key, tensor, quant_type in chunk:
            sink.add(key, tensor, quant_type)
        writer.add_unit(sink.finish(unit, writer.places(unit)))
    sink.close()
    return writer


def load_parts(save_path, weight_files):
    tensors = {}
    for name in weight_files:
        part = load_file(str(save_path / name))
        assert not tensors.keys() & part.keys()
        tensors.update(part)
    return tensors


def check_format(save_path, entries):
    """Every FORMAT.md rule on weights, index and description that does not depend on the part size."""
    index = json.loads((save_path / INDEX).read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"] == {"total_size": sum(t.numel() * t.element_size() for _, t, _ in entries)}
    weight_files = sorted(set(index["weight_map"].values()))
    assert weight_files == sorted(p.name for p in save_path.glob("*.safetensors"))
    for name in weight_files:
        with safe_open(str(save_path / name), framework="pt") as part:
            assert all(index["weight_map"][key] == name for key in part.keys())
    tensors = load_parts(save_path, weight_files)
    assert tensors.keys() == index["weight_map"].keys() == {key for key, _, _ in entries}
    for key, tensor, _ in entries:
        assert tensors[key].dtype == tensor.dtype and torch.equal(tensors[key], tensor)

    description = json.loads((save_path / DESCRIPTION).read_text())
    described = {key: value for key, value in description.items() if key not in TOP_LEVEL_FIELDS}
    assert described == {key: quant_type for key, _, quant_type in entries}
    assert description["version"] == "1.0.0"
    assert description["group_size"] == 0
    assert "kv_cache_type" not in description and "fa_quant_type" not in description
    assert not (save_path / ".dist_quant_staging").exists()
    return weight_files, description


TEXT_CONFIG = {  # a Qwen3-MoE config.json: one level, where vLLM reads a quantization_config too
    "model_type": "qwen3_moe", "hidden_size": 8, "quantization_config": {"quant_method": "fp8"},
    "compression_config": {"quant_method": "compressed-tensors"},
}


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_moe"])
def test_publish_writes_exactly_the_format_file_set(tmp_path, source, family):
    if family == "qwen3_moe":
        (source / "config.json").write_text(json.dumps(TEXT_CONFIG))
    recipe = tmp_path / f"{family}_w8a8.yaml"
    recipe.write_text("process: []\n")
    entries = tensors_of_a_layer("model.language_model.layers" if family == "qwen3_vl_moe" else "model.layers")
    save_path = tmp_path / "out"
    summary = write(save_path, source, entries).publish(source, recipe_path=recipe)

    weight_files, description = check_format(save_path, entries)
    assert weight_files == ["quant_model_weights-00001-of-00001.safetensors"]
    assert description["model_quant_type"] == "W8A8"
    assert description["metadata"] == {}
    assert description["optional"] == {}
    copied = {"tokenizer.json", "generation_config.json", "chat_template.jinja", "merges.txt", "modeling_extra.py"}
    expected = {*weight_files, INDEX, DESCRIPTION, "config.json", recipe.name, *copied}
    listing = "quant_model_files.json"  # what --overwrite may later delete: exactly these files
    assert {p.name for p in save_path.iterdir()} == expected | {listing}  # no float weights or index, no README
    assert set(json.loads((save_path / listing).read_text())["files"]) == expected | {listing}
    assert (save_path / "tokenizer.json").read_text() == '{"tok": 1}'

    config = json.loads((save_path / "config.json").read_text())
    assert config == ({"model_type": "qwen3_vl_moe", "text_config": {"hidden_size": 8}, "vision_config": {"depth": 2}}
                      if family == "qwen3_vl_moe" else {"model_type": "qwen3_moe", "hidden_size": 8})

    assert summary["tensors"] == len(entries)
    assert summary["bytes"] == sum(t.numel() * t.element_size() for _, t, _ in entries)
    assert summary["counts"] == {"W8A8": 5, "W8A8_DYNAMIC": 3, "FLOAT": 2}
    assert set(summary["files"]) == expected | {listing}


@pytest.mark.parametrize("units", [1, 3])  # one unit for all parts; units across parts
def test_small_part_size_splits_into_numbered_parts(tmp_path, source, units):
    entries = tensors_of_a_layer()
    part_bytes = 1024
    save_path = tmp_path / "out"
    write(save_path, source, entries, units, part_file_size_gb=part_bytes / 1024**3).publish(source)

    weight_files, _ = check_format(save_path, entries)
    count = len(weight_files)
    assert count > 2
    assert weight_files == [f"quant_model_weights-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    index = json.loads((save_path / INDEX).read_text())
    for name in weight_files:
        keys = [key for key, part in index["weight_map"].items() if part == name]
        sizes = [t.numel() * t.element_size() for key, t, _ in entries if key in keys]
        assert len(keys) == 1 or sum(sizes) <= part_bytes  # a part only exceeds the size for one big tensor


def test_part_size_zero_writes_a_single_file(tmp_path, source):
    entries = tensors_of_a_layer()
    save_path = tmp_path / "out"
    write(save_path, source, entries, part_file_size_gb=0).publish(source)
    weight_files, _ = check_format(save_path, entries)
    assert weight_files == ["quant_model_weights.safetensors"]


def test_optional_quarot(tmp_path, source):
    entries = tensors_of_a_layer()
    save_path = tmp_path / "out"
    writer = write(save_path, source, entries)
    rotation = torch.linalg.qr(torch.randn(16, 16)).Q
    writer.add_optional("optional/quarot.safetensors", {"global_rotation": rotation})
    optional = {"quarot": {"rotation_map": {"global_rotation": "optional/quarot.safetensors"}}}
    writer.set_optional_description(optional)
    summary = writer.publish(source)

    _, description = check_format(save_path, entries)
    assert description["optional"] == optional
    stored = load_file(str(save_path / "optional" / "quarot.safetensors"))
    assert stored.keys() == {"global_rotation"}
    assert stored["global_rotation"].dtype == torch.float32 and torch.equal(stored["global_rotation"], rotation)
    assert "optional/quarot.safetensors" in summary["files"]


def test_float_only_model_type(tmp_path, source):
    entries = [("lm_head.weight", torch.randn(4, 4, dtype=torch.bfloat16), "FLOAT")]
    save_path = tmp_path / "out"
    write(save_path, source, entries).publish(source)
    assert check_format(save_path, entries)[1]["model_quant_type"] == "FLOAT"


def test_model_quant_type_priority():
    assert model_quant_type(["FLOAT", "W8A8_DYNAMIC", "W8A8"]) == "W8A8"
    assert model_quant_type(["W8A8_DYNAMIC", "FLOAT", "W8A8_DYNAMIC"]) == "W8A8_DYNAMIC"
    assert model_quant_type(["FLOAT"]) == "FLOAT"
    with pytest.raises(RecipeError):
        model_quant_type(["W4A8"])
    with pytest.raises(ValueError):
        model_quant_type([])


def test_sink_rejects_duplicates_and_unknown_types(tmp_path):
    sink = UnitSink(tmp_path)
    sink.add("a.weight", torch.ones(2), "FLOAT")
    with pytest.raises(ValueError, match="a.weight"):
        sink.add("a.weight", torch.ones(2), "FLOAT")
    with pytest.raises(ValueError, match="W4A8"):
        sink.add("b.weight", torch.ones(2), "W4A8")


def test_a_unit_that_writes_other_tensors_than_its_layout_is_refused(tmp_path, source):
    writer = CheckpointWriter(tmp_path / "out", model_path=source)
    writer.set_layout([("u0", [("a.weight", torch.float32, (2,))])])
    writer.create_parts()
    sink = UnitSink(writer.staging)
    sink.add("a.weight", torch.ones(3), "FLOAT")
    with pytest.raises(OutputError, match="first difference"):
        sink.finish("u0", writer.places("u0"))
    writer.abort()


def test_add_copies_shared_and_non_contiguous_tensors(tmp_path, source):
    scale = torch.tensor([0.5])
    weight = torch.arange(12.0).reshape(3, 4)
    entries = [
        ("q_proj.input_scale", scale, "W8A8"),
        ("k_proj.input_scale", scale, "W8A8"),  # one tensor object under two keys
        ("t.weight", weight.T, "FLOAT"),
    ]
    save_path = tmp_path / "out"
    writer = write(save_path, source, entries)
    scale.fill_(9.0)  # changing the caller's tensor afterwards must not change what is written
    writer.publish(source)
    tensors = load_parts(save_path, ["quant_model_weights-00001-of-00001.safetensors"])
    assert tensors["q_proj.input_scale"].item() == tensors["k_proj.input_scale"].item() == 0.5
    assert torch.equal(tensors["t.weight"], weight.T)


def test_refuses_non_empty_save_path_unless_overwrite(tmp_path, source):
    save_path = tmp_path / "out"
    old = write(save_path, source, [("old.weight", torch.ones(2), "FLOAT")])
    old.publish(source)
    with pytest.raises(OutputError, match="not empty"):
        CheckpointWriter(save_path, model_path=source)

    entries = tensors_of_a_layer()
    writer = write(save_path, source, entries, overwrite=True)
    assert (save_path / "quant_model_description.json").exists()  # the old checkpoint stays until publish
    writer.publish(source)
    check_format(save_path, entries)


def test_overwrite_refuses_a_folder_with_other_files(tmp_path, source):
    save_path = tmp_path / "out"
    write(save_path, source, tensors_of_a_layer()).publish(source)
    (save_path / "old_dir").mkdir()
    with pytest.raises(OutputError, match="old_dir"):
        CheckpointWriter(save_path, model_path=source, overwrite=True)
    assert (save_path / "old_dir").exists() and (save_path / "quant_model_description.json").exists()


def test_republish_over_a_finished_checkpoint(tmp_path, source):
    save_path = tmp_path / "out"
    write(save_path, source, tensors_of_a_layer(), part_file_size_gb=1024 / 1024**3).publish(source)
    entries = [("lm_head.weight", torch.randn(4, 4, dtype=torch.bfloat16), "FLOAT")]
    write(save_path, source, entries, overwrite=True).publish(source)
    assert check_format(save_path, entries)[0] == ["quant_model_weights-00001-of-00001.safetensors"]


def test_empty_save_path_and_stale_staging_are_accepted(tmp_path, source):
    save_path = tmp_path / "out"
    (save_path / ".dist_quant_staging").mkdir(parents=True)
    (save_path / ".dist_quant_staging" / "part-00001.safetensors").write_text("left by a crash")
    entries = tensors_of_a_layer()
    write(save_path, source, entries).publish(source)
    check_format(save_path, entries)


@pytest.mark.parametrize("relative", [".", "quantized", "a/b"])
def test_refuses_save_path_inside_model_path(tmp_path, source, relative):
    with pytest.raises(OutputError, match="overlap"):
        CheckpointWriter(source / relative, model_path=source, overwrite=True)
    assert not (source / ".dist_quant_staging").exists()


def test_refuses_model_path_inside_save_path(tmp_path, source):
    with pytest.raises(OutputError, match="overlap"):
        CheckpointWriter(tmp_path, model_path=source, overwrite=True)


def test_refuses_save_path_reaching_model_path_through_a_symlink(tmp_path, source):
    link = tmp_path / "link"
    os.symlink(source, link)
    with pytest.raises(OutputError, match="overlap"):
        CheckpointWriter(link / "out", model_path=source)
    with pytest.raises(OutputError, match="overlap"):
        CheckpointWriter(source / "out", model_path=link)


def test_refuses_a_file_as_save_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        CheckpointWriter(tmp_path / "file")


def test_nothing_finished_looking_before_publish_or_after_abort(tmp_path, source):
    save_path = tmp_path / "out"
    writer = write(save_path, source, tensors_of_a_layer(), 3, part_file_size_gb=1024 / 1024**3)
    assert sorted(p.name for p in save_path.iterdir()) == [".dist_quant.lock", ".dist_quant_staging"]  # no more
    assert len(list((save_path / ".dist_quant_staging").glob("*.safetensors"))) > 2  # the parts, being filled
    writer.abort()
    assert not save_path.exists()  # created by the writer, so removed with it: no debris


def test_publish_without_tensors_is_refused(tmp_path, source):
    writer = CheckpointWriter(tmp_path / "out", model_path=source)
    with pytest.raises(OutputError, match="no tensors"):
        writer.publish(source)
    writer.abort()


def reference_parts(entries, part_bytes):
    """The part files as docs/FORMAT.md describes them (the bytes earlier releases copied together at the end),
    written independently of the writer: consecutive runs of the tensors in order, a new part when the next tensor
    would pass part_bytes; each a safetensors file whose JSON header lists the tensors in that order, data in the
    same order."""
    runs, size = [[]], 0
    for key, tensor, _ in entries:
        nbytes = tensor.numel() * tensor.element_size()
        if runs[-1] and size + nbytes > part_bytes:
            runs, size = runs + [[]], 0
        runs[-1].append((key, tensor))
        size += nbytes
    files = []
    for run in runs:
        header, data, offset = {}, b"", 0
        dtypes = {torch.int8: "I8", torch.float32: "F32", torch.int32: "I32", torch.bfloat16: "BF16"}
        for key, tensor in run:
            raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            header[key] = {"dtype": dtypes[tensor.dtype], "shape": list(tensor.shape),
                           "data_offsets": [offset, offset + len(raw)]}
            data, offset = data + raw, offset + len(raw)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        files.append(len(text).to_bytes(8, "little") + text + data)
    return files


@pytest.mark.parametrize("units", [1, 2, 5])
def test_parts_are_written_once_into_place_byte_for_byte_as_the_format_says(tmp_path, source, units):
    """Units write straight into the part files, in any order: the parts are exactly the reference bytes, the
    index lists the keys in order, parts are readable by everyone, and nothing but the parts was written."""
    layers = [tensors_of_a_layer() for _ in range(3)]
    entries = [(f"layers.{n}.{key}", tensor, kind) for n, layer in enumerate(layers) for key, tensor, kind in layer]
    save_path = tmp_path / "out"
    writer = write(save_path, source, entries, units, part_file_size_gb=1500 / 1024**3)
    staged = sorted(p.name for p in writer.staging.iterdir())
    assert staged == [f"quant_model_weights-{k:05d}-of-{len(staged) - 1:05d}.safetensors"
                      for k in range(1, len(staged))] + ["run"]
    writer.publish(source)
    weight_files, _ = check_format(save_path, entries)
    expected = reference_parts(entries, 1500)
    assert len(weight_files) == len(expected) > 2
    for name, content in zip(weight_files, expected):
        assert (save_path / name).read_bytes() == content
        assert (save_path / name).stat().st_mode & 0o777 == 0o644
    index = json.loads((save_path / INDEX).read_text())
    assert list(index["weight_map"]) == [key for key, _, _ in entries]  # insertion order across parts
