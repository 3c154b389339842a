"""Every bad input through the real CLI: exit code 2, a message naming the file, tensor or sample at fault and what is
wrong with it, and nothing in save_path that looks like a finished checkpoint."""

import errno
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file

from dist_quant.checkpoint.reader import CheckpointReader
from dist_quant.checkpoint.unit_file import writing
from dist_quant.checkpoint.writer import STAGING_DIR
from dist_quant.cli import main
from dist_quant.errors import CheckpointError, OutputError
from dist_quant.recipe import DEFAULT_RECIPE
from helpers import (
    Q_PROJ,
    WEIGHTS,
    assert_nothing_finished,
    calib_copy,
    quant_args,
    refused,
    rewrite_tensor,
)

GATE_UP = "model.language_model.layers.1.mlp.experts.gate_up_proj"
# the fixtures model (a private copy of the tiny model) and sharded_model are in conftest.py; refused, quant_args,
# rewrite_tensor and calib_copy in helpers.py


# --- the model directory ----------------------------------------------------------------------------------------------

def test_missing_config(capsys, model, tmp_path, calib_index):
    (model / "config.json").unlink()
    err = refused(capsys, model, tmp_path / "out", calib_index)
    assert f"{model / 'config.json'} not found" in err


@pytest.mark.parametrize("damage", ["invalid JSON", "not an object", "a folder", "not UTF-8"])
def test_unreadable_config(capsys, model, tmp_path, calib_index, damage):
    config = model / "config.json"
    config.unlink()
    if damage == "a folder":
        config.mkdir()
    else:
        config.write_bytes({"invalid JSON": b"{not json", "not an object": b"[1, 2]", "not UTF-8": b"\xff{"}[damage])
    err = refused(capsys, model, tmp_path / "out", calib_index)
    assert str(config) in err and "restore the file" in err


def test_wrong_model_type(capsys, model, tmp_path, calib_index):
    config = model / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "qwen2_vl"}))
    err = refused(capsys, model, tmp_path / "out", calib_index)
    assert str(config) in err and "model_type is 'qwen2_vl'" in err and "'qwen3_vl_moe'" in err


def test_index_naming_a_missing_shard(capsys, sharded_model, tmp_path, calib_index):
    model = Path(shutil.copytree(sharded_model, tmp_path / "model"))
    (model / "model-00003-of-00008.safetensors").unlink()
    err = refused(capsys, model, tmp_path / "out", calib_index)
    assert "model.safetensors.index.json names shard model-00003-of-00008.safetensors, which is missing" in err


def test_no_weights(capsys, model, tmp_path, calib_index):
    (model / WEIGHTS).unlink()
    err = refused(capsys, model, tmp_path / "out", calib_index)
    assert f"{model} holds neither {WEIGHTS}" in err


def test_truncated_weights(capsys, model, tmp_path, calib_index):
    weights = model / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = refused(capsys, model, tmp_path / "out", calib_index)
    assert f"{weights} is truncated or corrupt" in err


@pytest.mark.parametrize("garbage", [b"\xff" * 8, b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not json at all!"])
def test_garbage_header(capsys, model, tmp_path, calib_index, garbage):
    weights = model / WEIGHTS
    content = weights.read_bytes()
    weights.write_bytes(garbage + content[len(garbage):])
    err = refused(capsys, model, tmp_path / "out", calib_index)
    assert f"{weights} is not a readable safetensors file" in err


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32])
def test_integer_weight(capsys, model, tmp_path, calib_index, dtype):
    weights = rewrite_tensor(model, Q_PROJ, lambda t: (t * 100).to(dtype))
    err = refused(capsys, model, tmp_path / "out", calib_index)
    assert f"tensor {Q_PROJ} in {weights} has dtype {dtype}" in err and "floating-point checkpoint" in err


def test_weight_of_the_wrong_shape(capsys, model, tmp_path, calib_index):
    weights = rewrite_tensor(model, Q_PROJ, lambda t: t[:-1].contiguous())
    err = refused(capsys, model, tmp_path / "out", calib_index)
    assert f"tensor {Q_PROJ} in {weights} has shape (63, 64), expected (64, 64)" in err


def test_experts_of_the_wrong_shape(capsys, model, tmp_path, calib_index):
    rewrite_tensor(model, GATE_UP, lambda t: t[:, :, :-2].contiguous())
    err = refused(capsys, model, tmp_path / "out", calib_index)
    assert f"model.language_model.layers.1.mlp.experts in {model / WEIGHTS}: expert tensors have shapes " \
           "gate_up_proj (8, 64, 94) and down_proj (8, 48, 64), but the config" in err
    assert "moe_intermediate_size=48) expects either (8, 64, 96) and (8, 48, 64)" in err


def test_integer_experts(capsys, model, tmp_path, calib_index):
    weights = rewrite_tensor(model, GATE_UP, lambda t: t.to(torch.int8))
    err = refused(capsys, model, tmp_path / "out", calib_index)
    assert f"tensor {GATE_UP} in {weights} has dtype torch.int8" in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("key", [Q_PROJ, GATE_UP])
def test_non_finite_weight(capsys, model, tmp_path, calib_index, bad, key):
    def poison(t):
        t.view(-1)[7] = bad
        return t
    weights = rewrite_tensor(model, key, poison)
    err = refused(capsys, model, tmp_path / "out", calib_index)
    assert f"tensor {key} in {weights} holds NaN or Inf values" in err


# --- the calibration set ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image, cut", [("img0.png", 200), ("img1.jpg", 20)])  # verify() passes that JPEG
def test_truncated_image(capsys, tiny_model, tmp_path, calib_index, image, cut):
    index = calib_copy(calib_index, tmp_path)
    path = index.parent / image
    path.write_bytes(path.read_bytes()[:-cut])
    err = refused(capsys, tiny_model, tmp_path / "out", index)
    assert f"{index} line" in err and f"{path} cannot be read as an image" in err and "truncated" in err


def test_not_an_image(capsys, tiny_model, tmp_path, calib_index):
    index = calib_copy(calib_index, tmp_path)
    (index.parent / "img1.jpg").write_text("these are my holiday notes, not a picture\n")
    err = refused(capsys, tiny_model, tmp_path / "out", index)
    assert f"{index} line 2: calibration image {index.parent / 'img1.jpg'} cannot be read as an image" in err


def write_png_header(path: Path, width: int, height: int) -> None:
    """A PNG that claims a size but holds no pixel data: enough for PIL to read the size, cheap to write."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [100_000, 9_000])  # past PIL's decompression-bomb error, and only past our limit
def test_huge_image(capsys, tiny_model, tmp_path, calib_index, side):
    index = calib_copy(calib_index, tmp_path)
    huge = index.parent / "img0.png"
    write_png_header(huge, side, side)
    err = refused(capsys, tiny_model, tmp_path / "out", index)
    assert f"{index} line 1: calibration image {huge} is" in err and "larger than the 64 megapixels" in err


def test_bad_json_line(capsys, tiny_model, tmp_path, calib_index):
    index = calib_copy(calib_index, tmp_path)
    lines = index.read_text().splitlines()
    lines[1] = lines[1][:-3]
    index.write_text("\n".join(lines) + "\n")
    err = refused(capsys, tiny_model, tmp_path / "out", index)
    assert f"{index} line 2 is not valid JSON" in err


@pytest.mark.parametrize("escape", ["../outside.png", "ABSOLUTE"])
def test_image_path_escaping_its_folder(capsys, tiny_model, tmp_path, calib_index, escape):
    index = calib_copy(calib_index, tmp_path)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (16, 16)).save(outside)
    image = str(outside) if escape == "ABSOLUTE" else escape
    index.write_text(json.dumps({"image": image, "text": "what is this?"}) + "\n")
    err = refused(capsys, tiny_model, tmp_path / "out", index)
    assert f"{index} line 1: image path {image!r} leaves the dataset folder {index.parent}" in err


@pytest.mark.parametrize("form", ["empty folder", "empty index"])
def test_empty_calibration_set(capsys, tiny_model, tmp_path, form):
    dataset = tmp_path / "calib"
    dataset.mkdir()
    if form == "empty index":
        dataset = dataset / "index.jsonl"
        dataset.write_text("\n")
    err = refused(capsys, tiny_model, tmp_path / "out", dataset)
    assert f"calibration dataset {dataset} holds no samples" in err


# --- the save path ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", [".", "quantized", ".."])
def test_save_path_overlapping_the_model(capsys, model, calib_index, where):
    before = sorted(p.name for p in model.parent.rglob("*"))
    save = model / where
    rc = main(quant_args(model, save, calib_index, "--overwrite"))
    err = capsys.readouterr().err
    assert rc == 2 and f"save path {save} and model path {model} overlap" in err and "separate folder" in err
    assert sorted(p.name for p in model.parent.rglob("*")) == before


def test_non_empty_save_path_without_overwrite(capsys, tiny_model, tmp_path, calib_index):
    save = tmp_path / "out"
    save.mkdir()
    (save / "notes.txt").write_text("keep me")
    err = refused(capsys, tiny_model, save, calib_index)
    assert f"save path {save} is not empty" in err and "overwrite" in err
    assert sorted(p.name for p in save.iterdir()) == ["notes.txt"]


def limit_file_size(limit: int):
    """For the child: no file may grow past ``limit`` bytes, and passing it fails the write (EFBIG), not the process."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


# the 1.2 MB part file is created at its full size before any unit runs: a file size limit stops the run there
@pytest.mark.parametrize("limit, file", [(768 * 1024, "quant_model_weights-00001-of-00001.safetensors")])
def test_full_disk(tiny_model, tmp_path, calib_index, limit, file):
    save = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "dist_quant.cli", *quant_args(tiny_model, save, calib_index)],
                            capture_output=True, text=True, preexec_fn=limit_file_size(limit), timeout=120)
    assert result.returncode == 2, result.stderr
    err = result.stderr.splitlines()[-1]
    assert err.startswith(f"dist-quant: error: cannot write {save / STAGING_DIR}/") and file in err, err
    assert "File too large" in err and "free space" in err and "save_path" in err
    assert_nothing_finished(save)


# --- the recipe -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["spec"]["process"].append({"type": "gptq"}),
     "spec.process[4].type: unknown processor 'gptq'; allowed: ['quarot', 'iter_smooth', 'linear_quant', 'group']"),
    (lambda d: d["spec"]["process"][2].update(exclude=["*experts[*"]),
     "spec.process[2].exclude: bad glob '*experts[*': unbalanced brackets"),
    (lambda d: d["spec"]["process"][1].update(alpha=1.5), "spec.process[1].alpha: 1.5 must be a number in (0.0, 1.0]"),
    (lambda d: d["spec"]["process"][1].update(alpha=-0.1), "spec.process[1].alpha: -0.1 must be a number in"),
    (lambda d: d["spec"]["process"][2]["qconfig"]["act"].update(symmetric="False"),
     "spec.process[2].qconfig.act.symmetric: 'False' must be True or False (unquoted)"),
    (lambda d: d["spec"]["save"][0].update(part_file_size=True),
     "spec.save[0].part_file_size: True must be a number of GB >= 0"),
])
def test_invalid_recipe(capsys, tiny_model, tmp_path, calib_index, mutate, message):
    doc = yaml.safe_load(DEFAULT_RECIPE.read_text())
    mutate(doc)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    err = refused(capsys, tiny_model, tmp_path / "out", calib_index, "--config_path", str(recipe))
    assert f"recipe {recipe}: {message}" in err


@pytest.mark.parametrize("content, message", [
    (b"spec: [unclosed", "is not valid YAML"),
    (b"spec: {dataset: caf\xe9}", "is not UTF-8 text"),
    (None, "cannot read recipe"),
])
def test_unreadable_recipe(capsys, tiny_model, tmp_path, calib_index, content, message):
    recipe = tmp_path / "recipe.yaml"
    if content is not None:
        recipe.write_bytes(content)
    err = refused(capsys, tiny_model, tmp_path / "out", calib_index, "--config_path", str(recipe))
    assert str(recipe) in err and message in err


# --- below the CLI: the checks the cases above rely on ----------------------------------------------------------------

def test_reader_checks_the_shape_it_is_given(tiny_model):
    """What materialize needs to report a wrongly shaped weight with its file (test_weight_of_the_wrong_shape)."""
    with CheckpointReader(tiny_model) as reader:
        assert reader.get(Q_PROJ, shape=(64, 64)).shape == (64, 64)
        with pytest.raises(CheckpointError, match=rf"tensor {re.escape(Q_PROJ)} in {re.escape(str(tiny_model))}/"
                                                  r"model\.safetensors has shape \(64, 64\), expected \(64, 63\)"):
            reader.get(Q_PROJ, shape=(64, 63))
        assert reader.bytes_read == 64 * 64 * 4


def test_reader_casts_only_float_weights(tmp_path):
    """Integer tensors come back as stored (a quantized checkpoint's int8 weights), never cast to a float dtype."""
    (tmp_path / "config.json").write_text("{}")
    save_file({"codes": torch.ones(2, 3, dtype=torch.int8)}, str(tmp_path / WEIGHTS))
    with CheckpointReader(tmp_path) as reader:
        assert reader.get("codes").dtype == torch.int8
        with pytest.raises(CheckpointError, match="tensor codes in .* has dtype torch.int8"):
            reader.get("codes", dtype=torch.float32)
        with pytest.raises(CheckpointError, match="has dtype torch.int8"):
            reader.get_slice("codes", 0, 1, dtype=torch.bfloat16)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
@pytest.mark.parametrize("raised_as", ["OSError", "SafetensorError"])
def test_out_of_space_names_the_file(tmp_path, code, raised_as):
    target = tmp_path / "part.safetensors"
    reason = os.strerror(code)
    error = OSError(code, reason) if raised_as == "OSError" else \
        SafetensorError(f"Error while serializing: I/O error: {reason} (os error {code})")
    with pytest.raises(OutputError, match=rf"cannot write {re.escape(str(target))}: {reason} .*free space"):
        with writing(target):
            raise error


def test_other_write_errors_pass_through(tmp_path):
    with pytest.raises(PermissionError):
        with writing(tmp_path / "part.safetensors"):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(SafetensorError):
        with writing(tmp_path / "part.safetensors"):
            raise SafetensorError("Error while serializing: tensors share memory")
