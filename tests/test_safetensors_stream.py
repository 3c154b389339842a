"""safetensors_stream is checked against the safetensors library itself: its files as sources, its loader as judge."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dist_quant.checkpoint import safetensors_stream
from dist_quant.checkpoint.safetensors_stream import HeaderError, read_header, tensor_slices, write_concatenated


def mixed_tensors():
    """Every dtype the checkpoint holds, plus 0-d and empty tensors."""
    return {
        "weight": torch.randint(-128, 128, (5, 7), dtype=torch.int8),
        "quant_bias": torch.randint(-(2**31), 2**31 - 1, (5,), dtype=torch.int32),
        "deq_scale_fp16": torch.randint(0, 2**32, (5,), dtype=torch.int64),
        "input_scale": torch.rand(1),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "router": torch.randn(3, 4, dtype=torch.bfloat16),
        "half": torch.randn(2, 3, dtype=torch.float16),
    }


@pytest.fixture
def sources(tmp_path):
    """The mixed tensors split over two files written by safetensors (which orders data by dtype alignment, not key)."""
    tensors = mixed_tensors()
    keys = list(tensors)
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_file({key: tensors[key] for key in keys[::2]}, str(first), metadata={"made_by": "test"})
    save_file({key: tensors[key] for key in keys[1::2]}, str(second))
    return tensors, first, second


def test_read_header_matches_safetensors(sources):
    tensors, first, _ = sources
    header, data_start = read_header(first)
    assert header.pop("__metadata__") == {"made_by": "test"}
    raw = first.read_bytes()
    assert data_start == 8 + struct.unpack("<Q", raw[:8])[0]
    with safe_open(str(first), framework="pt") as stored:
        assert list(header) == list(stored.offset_keys())
        for key, info in header.items():
            tensor = stored.get_tensor(key)
            assert info["shape"] == list(tensor.shape)
            begin, end = info["data_offsets"]
            assert raw[data_start + begin : data_start + end] == tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    assert set(header) == set(list(tensors)[::2])


def test_tensor_slices_skip_metadata_and_point_into_the_file(sources):
    _, first, _ = sources
    header, data_start = read_header(first)
    slices = tensor_slices(first)
    assert list(slices) == [key for key in header if key != "__metadata__"]
    for key, piece in slices.items():
        assert piece.key == key and piece.source == first
        assert (piece.dtype, list(piece.shape)) == (header[key]["dtype"], header[key]["shape"])
        assert [piece.begin - data_start, piece.end - data_start] == header[key]["data_offsets"]


@pytest.mark.parametrize("chunk_bytes", [16 * 1024**2, 3])  # 3: every tensor copies in several short chunks
def test_write_concatenated_round_trips_in_the_given_order(tmp_path, sources, monkeypatch, chunk_bytes):
    monkeypatch.setattr(safetensors_stream, "CHUNK_BYTES", chunk_bytes)
    tensors, first, second = sources
    slices = {**tensor_slices(first), **tensor_slices(second)}
    order = ["half", "scalar", "weight", "empty", "deq_scale_fp16", "input_scale", "router", "quant_bias"]
    out = tmp_path / "out.safetensors"
    write_concatenated(out, [slices[key] for key in order])

    loaded = load_file(str(out))
    assert list(loaded) == order
    for key in order:
        assert loaded[key].dtype == tensors[key].dtype and loaded[key].shape == tensors[key].shape
        assert torch.equal(loaded[key], tensors[key])
    header, data_start = read_header(out)
    assert list(header) == order and "__metadata__" not in header
    assert data_start % 8 == 0
    raw_header = out.read_bytes()[8:data_start]
    assert raw_header.rstrip(b" ").endswith(b"}") and len(raw_header) - len(raw_header.rstrip(b" ")) < 8
    offsets = [header[key]["data_offsets"] for key in order]
    assert offsets[0][0] == 0 and all(a[1] == b[0] for a, b in zip(offsets, offsets[1:]))
    assert data_start + offsets[-1][1] == out.stat().st_size


def test_write_concatenated_of_nothing_is_an_empty_safetensors_file(tmp_path):
    out = tmp_path / "out.safetensors"
    write_concatenated(out, [])
    assert load_file(str(out)) == {}
    assert read_header(out) == ({}, 16)


def test_a_truncated_source_is_reported(tmp_path, sources):
    tensors, first, _ = sources
    piece = tensor_slices(first)["weight"]
    first.write_bytes(first.read_bytes()[: piece.end - 1])
    with pytest.raises(ValueError, match="ends before byte"):
        write_concatenated(tmp_path / "out.safetensors", [piece])


def test_read_header_refuses_files_that_are_not_safetensors(tmp_path):
    short, bad_length = tmp_path / "short", tmp_path / "bad_length"
    short.write_bytes(b"1234")
    bad_length.write_bytes(struct.pack("<Q", 1000) + json.dumps({}).encode())
    for path in (short, bad_length):
        with pytest.raises(ValueError, match="not a safetensors file"):
            read_header(path)


def write_raw(path, header: dict, data: bytes) -> None:
    header_bytes = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


def test_the_library_judges_what_is_valid(tmp_path):
    """A file the safetensors library accepts is read, even with a dtype newer than torch's (the reader then refuses
    it by name) or a null __metadata__, which the library allows."""
    path = tmp_path / "scales.safetensors"
    write_raw(path, {"__metadata__": None, "scale": {"dtype": "F8_E8M0", "shape": [4], "data_offsets": [0, 4]}},
              bytes(4))
    assert tensor_slices(path)["scale"].dtype == "F8_E8M0"


@pytest.mark.parametrize("dtype", ["Q9", "Q" * 100_000])
def test_a_refusal_not_worded_here_is_the_librarys_clipped(tmp_path, dtype):
    path = tmp_path / "w.safetensors"
    write_raw(path, {"w": {"dtype": dtype, "shape": [4], "data_offsets": [0, 4]}}, bytes(4))
    with pytest.raises(HeaderError, match="the safetensors library refuses it: .*unknown variant") as error:
        tensor_slices(path)
    assert len(error.value.detail) < 500


def test_a_size_that_does_not_match_dtype_and_shape_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    write_raw(path, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, bytes(16))
    with pytest.raises(HeaderError, match="the safetensors library refuses it: .*invalid shape, data type"):
        tensor_slices(path)
