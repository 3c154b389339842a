"""No hostile input gets through: each class of input that used to give silently wrong output, read files outside
its folder, hang, exhaust memory or end in a traceback, through the real CLI where it can be. Each is refused with
exit code 2 and one line that names the culprit (never quoting a file's bytes), and leaves nothing finished-looking.
"""

import json
import logging
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dist_quant import synthetic
from dist_quant.calib.dataset import CalibSample
from dist_quant.calib.inputs import DEFAULT_MAX_SAMPLE_TOKENS, IMAGE_TOKEN, build_model_inputs, load_tokenizer
from dist_quant.checkpoint import safetensors_stream
from dist_quant.checkpoint.reader import CheckpointReader
from dist_quant.cli import main
from dist_quant.errors import CalibrationError
from dist_quant.models import qwen3_vl_moe as qvl
from dist_quant.synthetic import make_tiny_model
from helpers import PLAIN_RECIPE, WEIGHTS, calib_copy, deadline, quant_args, read_checkpoint, refused

INDEX = "model.safetensors.index.json"
SECRET = b"SECRET-do-not-print-me-0123456789"
NORM_0 = "model.language_model.layers.0.input_layernorm.weight"
NORM_0_POST = "model.language_model.layers.0.post_attention_layernorm.weight"


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def edit_config(model: Path, change) -> Path:
    config = model / "config.json"
    raw = json.loads(config.read_text())
    change(raw)
    config.write_text(json.dumps(raw))
    return config


def add_tensors(model: Path, extra: dict) -> None:
    path = model / WEIGHTS
    save_file({**load_file(path), **extra}, str(path), metadata={"format": "pt"})


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_safetensors(path: Path, header: str | bytes, data: bytes) -> None:
    """Byte by byte, as the format says: u64 header length, the header, the data."""
    header = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def cli_eval(float_model: Path, quantized: Path, dataset: Path) -> list[str]:
    return ["eval", "--model_path", str(float_model), "--quant_path", str(quantized), "--dataset", str(dataset)]


def refused_eval(capsys, *args) -> str:
    rc = main(cli_eval(*args))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("dist-quant: error: "), err
    return one_line(err)


# --- 1. silent wrong output: a config that does not describe the weights ---------------------------------------------

@pytest.mark.parametrize("layers, message", [
    (3, "num_hidden_layers=3, but the weights hold text layers up to 3 (e.g. model.language_model.layers.3."),
    (0, "text_config.num_hidden_layers is 0, not a positive integer"),
    (-1, "text_config.num_hidden_layers is -1, not a positive integer"),
    (5, "num_hidden_layers=5, but the weights hold no tensors of text layers [4]"),
])
def test_config_that_miscounts_the_layers(capsys, model, tmp_path, calib_index, layers, message):
    config = edit_config(model, lambda c: c["text_config"].update(num_hidden_layers=layers))
    err = one_line(refused(capsys, model, tmp_path / "out", calib_index))
    assert str(config) in err and message in err


@pytest.mark.parametrize("change, message", [
    (lambda v: v.update(depth=3), "vision_config.depth=3, but the weights hold vision blocks up to 3"),
    (lambda v: v.update(deepstack_visual_indexes=[0, 1]),
     "len(vision_config.deepstack_visual_indexes)=2, but the weights hold deepstack mergers up to 2"),
])
def test_config_that_miscounts_the_vision_tower(capsys, model, tmp_path, calib_index, change, message):
    config = edit_config(model, lambda c: change(c["vision_config"]))
    err = one_line(refused(capsys, model, tmp_path / "out", calib_index))
    assert str(config) in err and message in err


@pytest.mark.parametrize("top_k", [0, 9])  # the tiny model has 8 experts
def test_top_k_outside_the_experts(capsys, model, tmp_path, calib_index, top_k):
    config = edit_config(model, lambda c: c["text_config"].update(num_experts_per_tok=top_k))
    err = one_line(refused(capsys, model, tmp_path / "out", calib_index))
    assert f"{config}: text_config.num_experts_per_tok is {top_k}" in err and "between 1 and num_experts (8)" in err


def test_vocabulary_other_than_the_embeddings(capsys, model, tmp_path, calib_index):
    edit_config(model, lambda c: c["text_config"].update(vocab_size=10**12))
    err = one_line(refused(capsys, model, tmp_path / "out", calib_index))
    assert f"tensor {qvl.EMBED_KEY} in {model / WEIGHTS} has shape (625, 64), expected ({10**12}, 64)" in err


@pytest.mark.parametrize("key, message", [
    ("model.language_model.layers.4.input_layernorm.weight", "text layers up to 4"),
    ("model.visual.blocks.4.norm1.weight", "vision blocks up to 4"),
    ("model.visual.deepstack_merger_list.3.norm.weight", "deepstack mergers up to 3"),
])
def test_tensor_beyond_what_the_config_counts(capsys, model, tmp_path, calib_index, key, message):
    """Before, a tensor no unit reads was accepted and left out of the quantized model."""
    add_tensors(model, {key: torch.ones(64)})
    err = one_line(refused(capsys, model, tmp_path / "out", calib_index))
    assert message in err and key in err and "left out of the quantized model" in err


# --- 1. silent wrong output: safetensors headers that point at the wrong bytes ---------------------------------------

def _share_bytes(header: dict, data: bytes):
    header[NORM_0]["data_offsets"] = header[NORM_0_POST]["data_offsets"]
    return json.dumps(header), data


def _negative_offset(header: dict, data: bytes):
    begin, end = header[NORM_0]["data_offsets"]
    header[NORM_0]["data_offsets"] = [-256, end - begin - 256]  # would read the end of the header as weights
    return json.dumps(header), data


def _duplicate_key(header: dict, data: bytes):
    text = json.dumps(header)  # a second entry under the same name, pointing at another tensor's bytes
    return text[:-1] + f', "{NORM_0}": ' + json.dumps(header[NORM_0_POST]) + "}", data


def _float_offsets(header: dict, data: bytes):
    header[NORM_0]["data_offsets"] = [float(n) for n in header[NORM_0]["data_offsets"]]
    return json.dumps(header), data


def _trailing_bytes(header: dict, data: bytes):
    return json.dumps(header), data + b"\0" * 64


def _bad_metadata(header: dict, data: bytes):
    header["__metadata__"] = {"format": 1}
    return json.dumps(header), data


@pytest.mark.parametrize("damage, message", [
    (_share_bytes, f"'{NORM_0_POST}' share data bytes"),
    (_negative_offset, f"entry '{NORM_0}' has data_offsets that are not two non-negative integers"),
    (_duplicate_key, f"the key '{NORM_0}' appears twice"),
    (_float_offsets, f"entry '{NORM_0}' has data_offsets that are not two non-negative integers"),
    (_trailing_bytes, "holds 64 bytes after its last tensor"),
    (_bad_metadata, "__metadata__ is not a map of strings to strings"),
], ids=["shared bytes", "negative offset", "duplicate key", "float offsets", "trailing bytes", "metadata"])
def test_header_the_safetensors_library_would_refuse(capsys, model, tmp_path, calib_index, damage, message):
    weights = model / WEIGHTS
    write_safetensors(weights, *damage(*split_safetensors(weights)))
    err = one_line(refused(capsys, model, tmp_path / "out", calib_index))
    assert f"{weights} is not a readable safetensors file (" in err and message in err


def test_header_length_never_echoes_the_first_bytes(tmp_path):
    """The first 8 bytes read as a length are the file's bytes: a message that prints the number prints them."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / WEIGHTS).write_bytes(SECRET)
    with pytest.raises(Exception) as error:
        CheckpointReader(tmp_path)
    message = str(error.value)
    assert str(struct.unpack("<Q", SECRET[:8])[0]) not in message and "SECRET" not in message
    assert f"{tmp_path / WEIGHTS} is not a readable safetensors file" in message


# --- 1. silent wrong output: eval of a quantized checkpoint of another model -----------------------------------------

@pytest.fixture(scope="module")
def quantized(tiny_model, calib_index, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("quantized") / "q"
    assert main(quant_args(tiny_model, save, calib_index)) == 0
    return save


@pytest.mark.parametrize("other, message", [
    (dict(num_layers=2), "text_config.num_hidden_layers is 4 in the quantized checkpoint, 2 in the float model"),
    (dict(hidden_size=32, num_heads=2, num_kv_heads=1, moe_intermediate_size=24, intermediate_size=64),
     "text_config.hidden_size is 64 in the quantized checkpoint, 32 in the float model"),
], ids=["layers", "widths"])
def test_eval_against_another_model(capsys, quantized, tmp_path, calib_index, other, message):
    float_model = make_tiny_model(tmp_path / "other", **{"mlp_only_layers": (), **other})
    err = refused_eval(capsys, float_model, quantized, calib_index)
    assert f"{quantized} is not a quantization of {float_model}: " in err and message in err


def test_eval_names_a_missing_tensor(capsys, tiny_model, quantized, tmp_path, calib_index):
    copy = Path(shutil.copytree(quantized, tmp_path / "q"))
    index_path = copy / "quant_model_weights.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = "model.language_model.layers.1.mlp.experts.3.down_proj.weight_scale"
    part = copy / index["weight_map"].pop(key)
    tensors = load_file(part)
    del tensors[key]
    save_file(tensors, str(part))
    index_path.write_text(json.dumps(index))
    err = refused_eval(capsys, tiny_model, copy, calib_index)
    assert f"{copy} has no tensor {key}, which its W8A8_DYNAMIC linear" in err


# --- 2. paths that escape their folder -------------------------------------------------------------------------------

SHARD = "model-00003-of-00008.safetensors"


@pytest.mark.parametrize("escape", ["relative", "absolute", "symlink"])
def test_shard_outside_the_model_folder(capsys, sharded_model, tmp_path, calib_index, escape):
    model = Path(shutil.copytree(sharded_model, tmp_path / "model"))
    outside = tmp_path / "outside.safetensors"
    shutil.move(model / SHARD, outside)
    index_path = model / INDEX
    index = json.loads(index_path.read_text())
    name = {"relative": "../outside.safetensors", "absolute": str(outside), "symlink": SHARD}[escape]
    index["weight_map"] = {k: (name if v == SHARD else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    if escape == "symlink":
        (model / SHARD).symlink_to(outside)
    err = one_line(refused(capsys, model, tmp_path / "out", calib_index))
    if escape == "symlink":
        assert f"{model / SHARD} is a symlink to {outside}, outside the model folder {model}" in err
    else:
        assert f"{index_path} names {name!r}, a path outside the model folder {model}" in err


@pytest.mark.parametrize("where", ["an index entry naming a system file", "a non-UTF-8 index"])
def test_errors_never_quote_the_files(capsys, sharded_model, tmp_path, calib_index, where):
    model = Path(shutil.copytree(sharded_model, tmp_path / "model"))
    index_path = model / INDEX
    if where == "a non-UTF-8 index":  # a UnicodeDecodeError's repr holds the whole input
        index_path.write_bytes(b'{"weight_map": "\xff' + SECRET + b'"}')
    else:
        secret = tmp_path / "id_rsa"
        secret.write_bytes(SECRET * 4)
        index = json.loads(index_path.read_text())
        index["weight_map"] = {k: str(secret) for k in index["weight_map"]}
        index_path.write_text(json.dumps(index))
    err = one_line(refused(capsys, model, tmp_path / "out", calib_index))
    assert str(index_path) in err and "SECRET" not in err and "\\x" not in err
    assert str(struct.unpack("<Q", SECRET[:8])[0]) not in err


def test_config_symlinked_out_of_the_model_folder(capsys, model, tmp_path, calib_index):
    config = model / "config.json"
    outside = tmp_path / "elsewhere.json"
    shutil.move(config, outside)
    config.symlink_to(outside)
    err = one_line(refused(capsys, model, tmp_path / "out", calib_index))
    assert f"{config} is a symlink to {outside}, outside the model folder {model}" in err


def test_a_hugging_face_cache_snapshot_is_still_read(tiny_model, tmp_path):
    """Its files are symlinks to ../../blobs/<hash>: outside the snapshot folder, inside the cached repository."""
    repo = tmp_path / "hub" / "models--Qwen--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for path in tiny_model.iterdir():
        shutil.copy(path, blobs / f"hash-{path.name}")
        (snapshot / path.name).symlink_to(Path("../../blobs") / f"hash-{path.name}")
    reader, config = qvl.load_checked(snapshot)
    assert config.text_config.num_hidden_layers == 4 and reader.get(NORM_0).shape == (64,)
    reader.close()


@pytest.mark.parametrize("form", ["index entry", "image folder"])
def test_calibration_symlink_out_of_the_dataset(capsys, tiny_model, tmp_path, calib_index, form):
    index = calib_copy(calib_index, tmp_path)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (16, 16)).save(outside)
    (index.parent / "link.png").symlink_to(outside)
    if form == "index entry":
        index.write_text(json.dumps({"image": "link.png", "text": "what is this?"}) + "\n")
        dataset, where = index, f"{index} line 1"
    else:
        index.unlink()
        dataset, where = index.parent, f"image folder {index.parent}"
    err = one_line(refused(capsys, tiny_model, tmp_path / "out", dataset, "--config_path", str(default_text_recipe(
        tmp_path))))
    assert f"{where}: 'link.png' is a symlink to {outside}, outside the dataset folder {index.parent}" in err


def default_text_recipe(tmp_path: Path) -> Path:
    """The plain recipe with a default text, which an image folder without an index needs."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(PLAIN_RECIPE.read_text().replace("spec:\n", "spec:\n  default_text: Describe the image.\n", 1))
    return recipe


FIFO_PLACES = ["config.json", WEIGHTS, "tokenizer.json", "chat_template.jinja", "preprocessor_config.json",
               "calibration index", "calibration image", "image in a folder", "recipe", INDEX, SHARD]


@pytest.mark.parametrize("place", FIFO_PLACES)
def test_fifo_where_a_file_is_expected(capsys, model, sharded_model, tmp_path, calib_index, place):
    """Opening a FIFO for reading blocks until a writer comes: before, each of these hung forever."""
    if place in (INDEX, SHARD):
        model = Path(shutil.copytree(sharded_model, tmp_path / "sharded"))
    index = calib_copy(calib_index, tmp_path)
    dataset, extra = index, []
    elsewhere = {"calibration index": tmp_path / "fifo.jsonl", "calibration image": index.parent / "img1.jpg",
                 "image in a folder": index.parent / "img1.jpg", "recipe": tmp_path / "recipe.yaml"}
    fifo = elsewhere.get(place, model / place)
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    if place == "calibration index":
        dataset = fifo
    elif place == "image in a folder":
        index.unlink()
        dataset, extra = index.parent, ["--config_path", str(default_text_recipe(tmp_path))]
    elif place == "recipe":
        extra = ["--config_path", str(fifo)]
    with deadline(60):
        err = one_line(refused(capsys, model, tmp_path / "out", dataset, *extra))
    assert str(fifo) in err and ("FIFO" in err or "neither a file nor a folder" in err), err


def test_fifo_swapped_in_after_the_check(model, monkeypatch):
    """The safetensors library opens files by name: given the name, it would open a FIFO renamed over the weights
    once they were checked, and hang there; it is given the checked descriptor instead."""
    weights, fifo = model / WEIGHTS, model / "fifo"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # so that opening the FIFO fails this test instead of hanging
    read_header = safetensors_stream._read_header

    def swap_then_read(path, file):
        os.replace(fifo, path)
        return read_header(path, file)

    monkeypatch.setattr(safetensors_stream, "_read_header", swap_then_read)
    try:
        assert NORM_0 in safetensors_stream.tensor_slices(weights)
    finally:
        os.close(writer)
    assert weights.is_fifo()


# --- 3. resource bombs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("section, field, value", [
    ("text_config", "num_hidden_layers", 10**12),
    ("vision_config", "depth", 10**9),
    ("text_config", "num_experts", 10**9),
])
def test_config_sized_to_exhaust_the_machine(capsys, model, tmp_path, calib_index, section, field, value):
    config = edit_config(model, lambda c: c[section].update({field: value}))
    with deadline(60):
        err = one_line(refused(capsys, model, tmp_path / "out", calib_index))
    assert f"{config}: {section}.{field} is {value}, more than the" in err


def test_plan_of_a_config_sized_to_exhaust_the_machine(capsys, model):
    """`dist-quant plan` reads config.json alone, so the limits apply without weights to compare with."""
    config = edit_config(model, lambda c: c["text_config"].update(num_hidden_layers=10**12))
    with deadline(60):
        rc = main(["plan", "--model_path", str(model)])
    err = one_line(capsys.readouterr().err)
    assert rc == 2 and f"{config}: text_config.num_hidden_layers is {10**12}, more than the 1024" in err


@pytest.mark.parametrize("place", ["config.json", "calibration index", "recipe"])
def test_text_file_too_large_to_read(capsys, monkeypatch, model, tmp_path, calib_index, place):
    """A config, index or recipe is read whole: past MAX_TEXT_BYTES it is refused before it is read."""
    monkeypatch.setattr(safetensors_stream, "MAX_TEXT_BYTES", 4096)
    big = {"config.json": model / "config.json", "calibration index": calib_copy(calib_index, tmp_path),
           "recipe": tmp_path / "recipe.yaml"}[place]
    if place == "recipe":
        shutil.copy(PLAIN_RECIPE, big)
    with big.open("a") as file:
        file.write(" " * 5000)
    extra = ["--config_path", str(big)] if place == "recipe" else []
    err = one_line(refused(capsys, model, tmp_path / "out", big if place == "calibration index" else calib_index,
                           *extra))
    assert str(big) in err and "bytes, more than the 4096 a text file read here may hold" in err


def long_sample(calib_index: Path, words: int) -> CalibSample:
    return CalibSample(calib_index.parent / "img0.png", "Describe the picture in great detail. " * words)


def test_a_long_prompt_is_cut_to_the_cap(tiny_model, calib_index, caplog):
    """A 1 MB prompt used to build a 68.7 GB attention mask; the cut keeps every image token."""
    sample = long_sample(calib_index, 3000)  # ~18k tokens of the tiny tokenizer
    with caplog.at_level(logging.WARNING, logger="dist_quant"):
        (default,) = build_model_inputs(tiny_model, [sample])
        (small,) = build_model_inputs(tiny_model, [sample], max_tokens=64)
    assert default.input_ids.shape[1] == DEFAULT_MAX_SAMPLE_TOKENS and small.input_ids.shape[1] <= 64
    image_tokens = int(small.image_grid_thw.prod()) // 4
    pad = load_tokenizer(tiny_model, False).convert_tokens_to_ids(IMAGE_TOKEN)
    assert int((small.input_ids == pad).sum()) == int((default.input_ids == pad).sum()) == image_tokens
    cuts = [r.getMessage() for r in caplog.records if "is cut from" in r.getMessage()]
    assert len(cuts) == 2 and all(f"calibration sample {sample.image}: its text is cut from " in m for m in cuts)
    assert f"to {DEFAULT_MAX_SAMPLE_TOKENS} tokens" in cuts[0] and "--max_sample_tokens" in cuts[0]


def test_an_image_longer_than_the_cap_is_refused(tiny_model, calib_index):
    sample = long_sample(calib_index, 1)
    with pytest.raises(CalibrationError, match=rf"calibration sample {sample.image} needs \d+ tokens without any text "
                                               r"\(\d+ for its image\), more than the 8 tokens .*downscale the image"):
        build_model_inputs(tiny_model, [sample], max_tokens=8)


# --- 4. tracebacks instead of one line -------------------------------------------------------------------------------

NESTED = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("place", ["config.json", INDEX, "preprocessor_config.json", "calibration index"])
def test_deeply_nested_json(capsys, model, sharded_model, tmp_path, calib_index, place):
    dataset = calib_index
    if place == INDEX:
        model = Path(shutil.copytree(sharded_model, tmp_path / "sharded"))
    if place == "calibration index":
        dataset = tmp_path / "index.json"
        dataset.write_text(NESTED)
    else:
        (model / place).write_text('{"model_type": "qwen3_vl_moe", "x": ' + NESTED + "}")
    err = one_line(refused(capsys, model, tmp_path / "out", dataset))
    assert str(dataset if place == "calibration index" else model / place) in err and "nested too deeply" in err


def test_deeply_nested_recipe(capsys, tiny_model, tmp_path, calib_index):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("spec: " + NESTED)
    err = one_line(refused(capsys, tiny_model, tmp_path / "out", calib_index, "--config_path", str(recipe)))
    assert f"recipe {recipe}" in err and "nested too deeply" in err


def test_yaml_errors_never_quote_the_recipe(capsys, tiny_model, tmp_path, calib_index):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"spec: [{SECRET.decode()}\n")
    err = one_line(refused(capsys, tiny_model, tmp_path / "out", calib_index, "--config_path", str(recipe)))
    assert f"recipe {recipe} is not valid YAML: " in err and "line 2 column 1" in err and "SECRET" not in err


@pytest.mark.parametrize("place, content", [
    ("chat_template.jinja", b"\xff\xfe{{ messages }}"),
    ("tokenizer.json", b"{\"version\": \"1.0\", \"model\": 42}"),
    ("preprocessor_config.json", b"\xff{}"),
    ("preprocessor_config.json", b"{\"patch_size\": \"big\"}"),
])
def test_corrupt_model_file(capsys, model, tmp_path, calib_index, place, content):
    (model / place).write_bytes(content)
    err = one_line(refused(capsys, model, tmp_path / "out", calib_index))
    assert str(model) in err and "restore" in err and "\\x" not in err


def test_eval_of_a_corrupt_description(capsys, tiny_model, quantized, tmp_path, calib_index):
    copy = Path(shutil.copytree(quantized, tmp_path / "q"))
    (copy / "quant_model_description.json").write_bytes(b"\xff" + SECRET)
    err = refused_eval(capsys, tiny_model, copy, calib_index)
    assert f"{copy / 'quant_model_description.json'} is missing or unreadable (not UTF-8 text" in err
    assert "SECRET" not in err


# --- 5. the expert layout when 2 * moe_intermediate_size == hidden_size ----------------------------------------------

@pytest.fixture(scope="module")
def square_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny model with 2I == hidden (gate_up is (E, 64, 64) in both layouts) as transformers 4.57 writes it, and
    the same weights as 5.x writes them (both expert tensors transposed, transformers_version 5.0.0)."""
    root = tmp_path_factory.mktemp("square")
    with pytest.MonkeyPatch.context() as patch:  # make_tiny_model refuses these sizes for its own tests' sake
        patch.setattr(synthetic, "check_unambiguous_expert_shapes", lambda hidden, inter: None)
        hub = make_tiny_model(root / "hub", num_layers=2, moe_intermediate_size=32, vision_depth=2,
                              deepstack=(0, 1))
    assert json.loads((hub / "config.json").read_text())["transformers_version"].startswith("4.")
    transposed = Path(shutil.copytree(hub, root / "transposed"))
    tensors = load_file(transposed / WEIGHTS)
    for key in tensors:
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors[key] = tensors[key].transpose(1, 2).contiguous()
    save_file(tensors, str(transposed / WEIGHTS), metadata={"format": "pt"})
    edit_config(transposed, lambda c: c.update(transformers_version="5.0.0"))
    return {"hub": hub, "transposed": transposed}


def test_the_expert_layout_comes_from_transformers_version(square_models, tmp_path, calib_index):
    outputs = []
    for layout, source in square_models.items():
        save = tmp_path / layout
        assert main(quant_args(source, save, calib_index)) == 0
        outputs.append(read_checkpoint(save)[0])
    hub, transposed = outputs
    assert hub.keys() == transposed.keys()
    assert all(torch.equal(hub[k], transposed[k]) for k in hub)  # the same model, whichever transformers wrote it


@pytest.mark.parametrize("version, message", [
    (None, "config.json has no transformers_version to tell which transformers wrote it"),
    ("a newer one", "config.json has no transformers_version to tell which transformers wrote it"),
    ("4.57.1", "config.json says transformers 4.57.1 wrote these weights, which stores experts in the hub layout"),
])
def test_the_expert_layout_needs_a_consistent_version(capsys, square_models, tmp_path, calib_index, version, message):
    model = Path(shutil.copytree(square_models["transposed"], tmp_path / "model"))
    edit_config(model, lambda c: c.pop("transformers_version") if version is None else
                c.update(transformers_version=version))
    err = one_line(refused(capsys, model, tmp_path / "out", calib_index))
    assert f"model.language_model.layers.0.mlp.experts in {model / WEIGHTS}: " in err and message in err
