"""Read tensors from a Hugging Face safetensors checkpoint one tensor (or one slice of experts) at a time.

Only file headers are parsed up front; tensor data is read on demand with plain positioned reads (no memory map),
so a worker holding a few experts of a 235B model never reads, or keeps resident, anything else.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Optional

import torch

from dist_quant.checkpoint.model_folder import JSON_FILE_ERRORS, load_json_file, model_file, read_config
from dist_quant.checkpoint.safetensors_stream import HeaderError, TensorSlice, open_regular, tensor_slices
from dist_quant.errors import CheckpointError, reason

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

DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}  # torch dtype -> safetensors name


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf anywhere: min and max propagate both, and one fused reduction is ~10x cheaper than isfinite()."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    if tensor.element_size() == 1:  # float8 (MXFP8 weights): torch has no min/max for it
        tensor = tensor.to(torch.float32)
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


class CheckpointReader:
    """Random access to the tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""

    def __init__(self, model_dir: str | Path, *, weights_name: str = "model.safetensors",
                 config: Optional[dict] = None):
        """``weights_name``: the single-file name; shards are listed in ``<weights_name>.index.json``
        (``quant_model_weights.safetensors`` reads a quantized ascendv1 checkpoint). ``config``: for a side file
        with no config.json beside it (the QuaRot rotation), instead of reading one."""
        self.model_dir = Path(model_dir)
        self._single_name, self._index_name = weights_name, f"{weights_name}.index.json"
        self.config = read_config(self.model_dir / "config.json") if config is None else config
        self.bytes_read = 0
        self._io = threading.local()  # per thread (the worker's prefetch thread reads too): see io_seconds
        self._headers: dict[Path, dict[str, TensorSlice]] = {}
        self._fds: dict[Path, int] = {}
        self._file_of_key = self._map_keys()

    @property
    def io_seconds(self) -> float:
        """Seconds this thread spent reading tensor bytes and checking them for NaN/Inf (not converting them)."""
        return getattr(self._io, "seconds", 0.0)

    def _map_keys(self) -> dict[str, Path]:
        index_path = model_file(self.model_dir, self._index_name, "the model folder")
        if not os.path.lexists(index_path):
            single = model_file(self.model_dir, self._single_name, "the model folder")
            if not os.path.lexists(single):
                raise CheckpointError(
                    f"{self.model_dir} holds neither {self._single_name} nor {self._index_name}: pass a model "
                    "directory with safetensors weights"
                )
            return {key: single for key in self._header(single)}
        shard_of_key = self._weight_map(index_path)
        keys_of_shard: dict[str, set[str]] = {}
        for key, shard_name in shard_of_key.items():
            keys_of_shard.setdefault(shard_name, set()).add(key)
        file_of_key = {}
        for shard_name, keys in keys_of_shard.items():
            shard = model_file(self.model_dir, shard_name, str(index_path))
            if not os.path.lexists(shard):
                raise CheckpointError(f"{index_path} names shard {shard.name}, which is missing; download it again")
            held = set(self._header(shard))
            missing, unlisted = keys - held, held - set(shard_of_key)
            if missing:
                raise CheckpointError(
                    f"{index_path} places {sorted(missing)[:3]} ({len(missing)} tensors) in {shard.name}, which "
                    "does not hold them; download the shard and the index again"
                )
            if unlisted:  # every tensor is read from the file the index names, so these would silently be dropped
                raise CheckpointError(
                    f"{shard} holds {sorted(unlisted)[:3]} ({len(unlisted)} tensors) that {index_path} does not "
                    "list anywhere; download the shard and the index again"
                )
            file_of_key.update({key: shard for key in keys})
        return file_of_key

    @staticmethod
    def _weight_map(index_path: Path) -> dict[str, str]:
        """The index's {tensor: shard file name}; the error never quotes the file, which may be anything."""
        try:
            index = load_json_file(index_path)
        except JSON_FILE_ERRORS as error:
            raise CheckpointError(f"cannot read {index_path}: {reason(error)}; restore the index file") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path} has no \"weight_map\" object of tensor names to shard file names; "
                                  "restore the index file")
        return weight_map

    def _header(self, path: Path) -> dict[str, TensorSlice]:
        """Where each tensor of a file lies; a file the safetensors library would refuse is reported as corrupt."""
        if path not in self._headers:
            try:
                self._headers[path] = tensor_slices(path)
            except HeaderError as error:
                state = "is truncated or corrupt" if error.truncated else "is not a readable safetensors file"
                raise CheckpointError(f"{path} {state} ({error.detail}); download it again") from None
            except OSError as error:
                raise CheckpointError(f"cannot read {path}: {reason(error)}; pass a model folder of safetensors "
                                      "files") from None
            unknown = [t.key for t in self._headers[path].values() if t.dtype not in _DTYPES]
            if unknown:
                del self._headers[path]
                raise CheckpointError(f"{path} holds tensors of dtypes torch cannot read ({sorted(unknown)[:3]}); "
                                      "quantize from the original floating-point checkpoint")
        return self._headers[path]

    def _read_bytes(self, path: Path, begin: int, end: int) -> torch.Tensor:
        """Bytes begin:end of ``path`` as a uint8 tensor, read straight into torch's memory (huge pages: see
        dist_quant/__init__.py), never through a Python buffer that would be copied again."""
        if path not in self._fds:
            try:
                with open_regular(path) as file:
                    self._fds[path] = os.dup(file.fileno())
            except OSError as error:
                raise CheckpointError(f"cannot read {path}: {reason(error)}") from None
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        view, done = memoryview(buffer.numpy()), 0
        while done < len(view):
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

    def stored_dtype(self, key: str) -> torch.dtype | None:
        """The dtype ``key`` is stored in; None when the checkpoint has no such tensor."""
        return self.dtype(key) if key in self else None

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
        started = time.perf_counter()
        info = self._slice(key)
        rows = info.shape[0] if info.shape else 1
        row_bytes = (info.end - info.begin) // rows if rows else 0
        data = self._read_bytes(info.source, info.begin + start * row_bytes, info.begin + stop * row_bytes)
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        tensor = data.view(_DTYPES[info.dtype]).reshape(shape)
        self.bytes_read += data.numel()
        finite = all_finite(tensor)
        self._io.seconds = self.io_seconds + time.perf_counter() - started
        if not finite:
            raise CheckpointError(
                f"tensor {key} in {self.file_of(key)} holds NaN or Inf values; the checkpoint is corrupt, "
                "download the file again"
            )
        return tensor if dtype is None else tensor.to(dtype)
