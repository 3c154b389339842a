"""Read safetensors headers and assemble safetensors files from byte ranges of other ones, without loading tensors.

The format: an 8-byte little-endian header length N, N bytes of JSON ({key: {"dtype", "shape", "data_offsets"}} plus
an optional "__metadata__"), then the data; data_offsets count from the end of the header. Copying byte ranges lets
the checkpoint writer build multi-GB parts out of small spill files while holding only one chunk in memory.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Sequence
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import BinaryIO, NamedTuple

CHUNK_BYTES = 16 * 1024**2
NO_COPY_FILE_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
HEADER_ALIGNMENT = 8  # safetensors pads the JSON header with spaces so the data starts 8-byte aligned
METADATA_KEY = "__metadata__"


class TensorSlice(NamedTuple):
    """Where one tensor's bytes lie: begin and end are absolute byte positions in source, not header offsets."""

    key: str
    source: Path
    dtype: str
    shape: Sequence[int]
    begin: int
    end: int


def read_header(path: str | Path) -> tuple[dict, int]:
    """The parsed JSON header (with "__metadata__" when the file has one) and the byte position where data starts."""
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is not a safetensors file: it holds fewer than 8 bytes")
        (length,) = struct.unpack("<Q", prefix)
        if length > os.fstat(file.fileno()).st_size - 8:  # checked before reading: it may claim exabytes
            raise ValueError(f"{path} is not a safetensors file: its header claims {length} bytes past the end "
                             "of the file")
        header_bytes = file.read(length)
    return json.loads(header_bytes), 8 + length


def tensor_slices(path: str | Path) -> dict[str, TensorSlice]:
    """Each tensor of a safetensors file by key, in the header's order."""
    header, data_start = read_header(path)
    source = Path(path)
    slices = {}
    for key, info in header.items():
        if key != METADATA_KEY:
            begin, end = info["data_offsets"]
            slices[key] = TensorSlice(key, source, info["dtype"], info["shape"], data_start + begin, data_start + end)
    return slices


def write_concatenated(out_path: str | Path, entries: Sequence[TensorSlice]) -> None:
    """Write a safetensors file holding the tensors (key, source, dtype, shape, begin, end) in the order given, copying
    each one's bytes from source[begin:end] in chunks of CHUNK_BYTES: memory holds one chunk, never a tensor."""
    header = {}
    offset = 0
    for key, _, dtype, shape, begin, end in entries:
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % HEADER_ALIGNMENT)
    with open(out_path, "wb") as out:
        out.write(struct.pack("<Q", len(header_bytes)))
        out.write(header_bytes)
        out.flush()
        for source, group in groupby(entries, key=itemgetter(1)):
            with open(source, "rb") as file:
                for _, _, _, _, begin, end in group:
                    _copy_range(file, out, begin, end)
        out.flush()
        os.fsync(out.fileno())  # a published checkpoint must survive a crash right after its description lands


def _copy_range(source: BinaryIO, out: BinaryIO, begin: int, end: int) -> None:
    """Copy bytes begin:end of source to the end of out, in the kernel where the filesystem allows it."""
    remaining = end - begin
    try:
        while remaining:
            copied = os.copy_file_range(source.fileno(), out.fileno(), remaining, end - remaining)
            if copied == 0:
                raise ValueError(f"{source.name} ends before byte {end}; it was truncated or changed since it was read")
            remaining -= copied
        return
    except OSError as error:  # no copy_file_range between these filesystems: copy through a buffer
        if error.errno not in NO_COPY_FILE_RANGE:
            raise  # out of space and the like are real errors
        out.seek(0, os.SEEK_END)
    source.seek(end - remaining)
    remaining = end - begin
    while remaining:
        chunk = source.read(min(CHUNK_BYTES, remaining))
        if not chunk:
            raise ValueError(f"{source.name} ends before byte {end}; it was truncated or changed since it was read")
        out.write(chunk)
        remaining -= len(chunk)
