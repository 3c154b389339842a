"""safetensors_stream is checked against the safetensors library itself: its files as sources, its loader as judge."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dist_quant.checkpoint.safetensors_stream import HeaderError, tensor_slices


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


def test_tensor_slices_point_at_each_tensors_bytes(tmp_path):
    """The slices against the library's reading of a file it wrote (data ordered by dtype alignment, not key): the
    same keys, and each slice's bytes are the tensor's."""
    tensors = mixed_tensors()
    first = tmp_path / "first.safetensors"
    save_file(tensors, str(first), metadata={"made_by": "test"})
    slices = tensor_slices(first)
    raw = first.read_bytes()
    header_length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_length])
    assert header.pop("__metadata__") == {"made_by": "test"}
    with safe_open(str(first), framework="pt") as stored:
        assert list(slices) == list(stored.offset_keys()) == list(header)
        for key, piece in slices.items():
            tensor = stored.get_tensor(key)
            assert piece.key == key and piece.source == first
            assert (piece.dtype, list(piece.shape)) == (header[key]["dtype"], list(tensor.shape))
            assert piece.begin >= 8 + header_length
            assert raw[piece.begin : piece.end] == tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    assert set(slices) == set(tensors)


def test_tensor_slices_refuse_files_that_are_not_safetensors(tmp_path):
    short, bad_length = tmp_path / "short", tmp_path / "bad_length"
    short.write_bytes(b"1234")
    bad_length.write_bytes(struct.pack("<Q", 1000) + json.dumps({}).encode())
    for path in (short, bad_length):
        with pytest.raises(HeaderError, match="not a safetensors file"):
            tensor_slices(path)


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
