"""Read tensors from a Hugging Face safetensors checkpoint one tensor (or one slice of experts) at a time.

Only file headers are parsed up front; tensor data is read on demand with plain positioned reads (no memory map),
so a worker holding a few experts of a 235B model never reads, or keeps resident, anything else.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection
from pathlib import Path
from typing import Literal

import torch
from dist_quant.checkpoint.safetensors_stream import TensorSlice, tensor_slices
from dist_quant.errors import CheckpointError

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# safetensors header dtype names -> torch dtypes
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

ExpertLayout = Literal["hub", "transposed"]


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf anywhere: min and max propagate both, and one fused reduction is ~10x cheaper than isfinite()."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def detect_expert_layout(
    gate_up_shape: tuple[int, ...],
    down_shape: tuple[int, ...],
    num_experts: int,
    hidden: int,
    intermediate: int,
) -> ExpertLayout:
    """Tell the transformers 4.57 / Hub layout from the transformers 5.x one, which share tensor names.

    hub: gate_up (E, hidden, 2I), down (E, I, hidden); transposed: gate_up (E, 2I, hidden), down (E, hidden, I).
    """
    gate_up_shape, down_shape = tuple(gate_up_shape), tuple(down_shape)
    expected = {
        "hub": ((num_experts, hidden, 2 * intermediate), (num_experts, intermediate, hidden)),
        "transposed": ((num_experts, 2 * intermediate, hidden), (num_experts, hidden, intermediate)),
    }
    fitting = [layout for layout, shapes in expected.items() if shapes == (gate_up_shape, down_shape)]
    if not fitting:
        raise CheckpointError(
            f"expert tensors have shapes gate_up_proj {gate_up_shape} and down_proj {down_shape}, but the config "
            f"(num_experts={num_experts}, hidden_size={hidden}, moe_intermediate_size={intermediate}) expects "
            f"either {expected['hub'][0]} and {expected['hub'][1]} (transformers 4.57 / Hub layout) or "
            f"{expected['transposed'][0]} and {expected['transposed'][1]} (transformers 5.x layout); "
            "check that config.json belongs to these weights"
        )
    if 2 * intermediate == hidden or intermediate == hidden:
        raise CheckpointError(
            f"cannot tell the expert layout: with hidden_size={hidden} and moe_intermediate_size={intermediate} "
            f"(2*I == hidden or I == hidden) one of gate_up_proj {gate_up_shape} / down_proj {down_shape} has the "
            "same shape in the transformers 4.57 (Hub) and 5.x (transposed) layouts, so its orientation would be a "
            "guess; use a model whose sizes differ, or convert it to the Hub layout with transformers 4.57"
        )
    return fitting[0]


def read_config(path: Path) -> dict:
    """A model's config.json as a dict; every failure names the file, since configs are often hand-edited."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: pass the Hugging Face model directory that holds config.json")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path}: {error}; restore the file from the original model")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; restore the file from the original model")
    return config


class CheckpointReader:
    """Random access to the tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""

    def __init__(self, model_dir: str | Path, *, weights_name: str = "model.safetensors"):
        """``weights_name``: the single-file name; shards are listed in ``<weights_name>.index.json``
        (``quant_model_weights.safetensors`` reads a quantized ascendv1 checkpoint)."""
        self.model_dir = Path(model_dir)
        self._single_name, self._index_name = weights_name, f"{weights_name}.index.json"
        self.config = read_config(self.model_dir / "config.json")
        self.bytes_read = 0
        self._headers: dict[Path, dict[str, TensorSlice]] = {}
        self._fds: dict[Path, int] = {}
        self._file_of_key = self._map_keys()

    def _map_keys(self) -> dict[str, Path]:
        index_path = self.model_dir / self._index_name
        if not index_path.exists():
            single = self.model_dir / self._single_name
            if not single.exists():
                raise CheckpointError(
                    f"{self.model_dir} holds neither {self._single_name} nor {self._index_name}: pass a model "
                    "directory with safetensors weights"
                )
            return {key: single for key in self._header(single)}

        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"cannot read the weight_map of {index_path}: {error!r}; restore the index file")
        keys_of_shard: dict[Path, set[str]] = {}
        for key, shard_name in weight_map.items():
            keys_of_shard.setdefault(self.model_dir / shard_name, set()).add(key)
        for shard, keys in keys_of_shard.items():
            if not shard.exists():
                raise CheckpointError(f"{index_path} names shard {shard.name}, which is missing; download it again")
            missing = keys - set(self._header(shard))
            if missing:
                raise CheckpointError(
                    f"{index_path} places {sorted(missing)[:3]} ({len(missing)} tensors) in {shard.name}, which "
                    "does not hold them; download the shard and the index again"
                )
        return {key: self.model_dir / shard_name for key, shard_name in weight_map.items()}

    def _header(self, path: Path) -> dict[str, TensorSlice]:
        """Where each tensor of a file lies; a file whose header or size does not add up is reported as corrupt."""
        if path not in self._headers:
            try:
                slices = tensor_slices(path)
                size = path.stat().st_size
                end = max((t.end for t in slices.values()), default=0)
                bad = [t.key for t in slices.values() if t.dtype not in _DTYPES
                       or t.end - t.begin != math.prod(t.shape) * _DTYPES[t.dtype].itemsize] if end <= size else []
            except (OSError, ValueError) as error:  # unreadable, shorter than 8 bytes, or a header that is not JSON
                raise CheckpointError(f"{path} is not a readable safetensors file ({error}); download it again")
            except (KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{path} is not a readable safetensors file (its header does not describe "
                                      "tensors as safetensors does); download it again") from None
            except (OverflowError, MemoryError):  # the first 8 bytes claim a header larger than memory
                raise CheckpointError(f"{path} is not a readable safetensors file (its first 8 bytes claim an "
                                      "impossibly large header); download it again") from None
            if end > size or bad:
                raise CheckpointError(f"{path} is truncated or corrupt (its header describes {end} bytes, the file "
                                      f"has {size}{'; bad entries ' + str(bad[:3]) if bad else ''}); download it again")
            self._headers[path] = slices
        return self._headers[path]

    def _read_bytes(self, path: Path, begin: int, end: int) -> bytearray:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        buffer = bytearray(end - begin)
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            n = os.preadv(self._fds[path], [view[done:]], begin + done)
            if n == 0:
                raise CheckpointError(f"{path} ended early while reading bytes {begin}-{end}; download it again")
            done += n
        return buffer

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self._file_of_key)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of_key

    def file_of(self, key: str) -> Path:
        if key not in self._file_of_key:
            raise CheckpointError(f"tensor {key} is not in the checkpoint at {self.model_dir}")
        return self._file_of_key[key]

    def _slice(self, key: str) -> TensorSlice:
        return self._header(self.file_of(key))[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._slice(key).dtype]

    def check(
        self,
        key: str,
        shape: tuple[int, ...] | None = None,
        dtype_in: torch.dtype | Collection[torch.dtype] | None = None,
    ) -> None:
        """Fail early, naming the file, when a tensor is not what the model config says it should be.

        dtype_in: the accepted source dtype(s); by default the floating dtypes quantization supports.
        """
        if dtype_in is None:
            dtype_in = SUPPORTED_DTYPES
        elif isinstance(dtype_in, torch.dtype):
            dtype_in = (dtype_in,)
        actual_shape, actual_dtype = self.shape(key), self.dtype(key)
        if shape is not None and actual_shape != tuple(shape):
            raise CheckpointError(
                f"tensor {key} in {self.file_of(key)} has shape {actual_shape}, expected {tuple(shape)} from "
                "config.json; check that the config belongs to these weights"
            )
        if actual_dtype not in dtype_in:
            raise CheckpointError(
                f"tensor {key} in {self.file_of(key)} has dtype {actual_dtype}, expected one of {tuple(dtype_in)}: "
                "quantize from the original floating-point checkpoint"
            )

    def get(self, key: str, *, dtype: torch.dtype | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The whole tensor; ``shape``, when given, is the one the model config expects (checked before reading).

        A floating ``dtype`` asks for a source weight, so an integer or fp8 tensor is refused rather than cast: cast,
        it would be quantized as if its codes were weights. Without ``dtype`` any stored dtype is returned as is.
        """
        if shape is not None:
            self.check(key, shape, dtype_in=_DTYPES.values())
        stored = self.shape(key)
        return self._rows(key, 0, stored[0] if stored else 1, dtype)

    def get_slice(self, key: str, start: int, stop: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows start:stop along dim 0, read without touching the other rows (e.g. a few experts of a fused tensor)."""
        rows = self.shape(key)[0]
        if not 0 <= start < stop <= rows:
            raise ValueError(f"slice {start}:{stop} is outside the {rows} rows of tensor {key}")
        return self._rows(key, start, stop, dtype)

    def _rows(self, key: str, start: int, stop: int, dtype: torch.dtype | None) -> torch.Tensor:
        """Rows start:stop are one contiguous byte range of the file: read exactly that."""
        if dtype is not None and dtype.is_floating_point:
            self.check(key)
        info = self._slice(key)
        rows = info.shape[0] if info.shape else 1
        row_bytes = (info.end - info.begin) // rows if rows else 0
        data = self._read_bytes(info.source, info.begin + start * row_bytes, info.begin + stop * row_bytes)
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        tensor = torch.frombuffer(data, dtype=_DTYPES[info.dtype]).reshape(shape) if data else \
            torch.empty(shape, dtype=_DTYPES[info.dtype])
        self.bytes_read += len(data)
        if not all_finite(tensor):
            raise CheckpointError(
                f"tensor {key} in {self.file_of(key)} holds NaN or Inf values; the checkpoint is corrupt, "
                "download the file again"
            )
        return tensor if dtype is None else tensor.to(dtype)

    def read_experts(
        self,
        layer_prefix: str,
        start: int,
        stop: int,
        *,
        num_experts: int,
        hidden: int,
        intermediate: int,
        dtype: torch.dtype = torch.float32,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(gate, up, down) nn.Linear weights [out, in] of experts start..stop-1 of one MoE layer.

        gate and up are the first and second halves of the fused 2I dimension of `gate_up_proj`.
        """
        gate_up_key = f"{layer_prefix}.mlp.experts.gate_up_proj"
        down_key = f"{layer_prefix}.mlp.experts.down_proj"
        try:
            layout = detect_expert_layout(self.shape(gate_up_key), self.shape(down_key), num_experts, hidden,
                                          intermediate)
        except CheckpointError as error:
            files = " and ".join(sorted({str(self.file_of(gate_up_key)), str(self.file_of(down_key))}))
            raise CheckpointError(f"{layer_prefix}.mlp.experts in {files}: {error}") from None
        gate_up = self.get_slice(gate_up_key, start, stop, dtype=dtype)
        down = self.get_slice(down_key, start, stop, dtype=dtype)
        if layout == "hub":  # applied as x @ W: transpose to [out, in]
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        return [
            (g_u[:intermediate].contiguous(), g_u[intermediate:].contiguous(), d.contiguous())
            for g_u, d in zip(gate_up, down)
        ]
