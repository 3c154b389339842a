"""Where every tensor of a checkpoint lies, computed before any unit runs, so each unit writes its tensors once,
straight into their final part files.

The parts are consecutive runs of the tensors in plan order (each unit's in the order it produces them); a new part
starts when the next tensor would push the current one past ``part_bytes`` (0: one part). A part file is the
safetensors format: an 8-byte little-endian header length, the JSON header ({key: {dtype, shape, data_offsets}} in
that order, padded with spaces to 8 bytes), then the data in the same order. Every size follows from the tensors'
dtypes and shapes (config.json and the recipe: runtime/layout.py ``unit_entries``), so the headers are written
first and each unit fills its byte ranges, from any process that sees the staging folder, or through the driver.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from dist_quant.checkpoint.reader import DTYPE_NAMES
from dist_quant.checkpoint.safetensors_stream import HEADER_ALIGNMENT
from dist_quant.errors import OutputError

READ_BLOCK = 16 * 1024**2
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def writing(target: str | Path) -> Iterator[None]:
    """A write that runs out of space becomes an OutputError naming ``target``, not a traceback hours into a run.

    Python reports it as OSError; safetensors' Rust writer as a SafetensorError whose text ends in "(os error N)".
    """
    try:
        yield
    except OSError as error:
        if error.errno not in OUT_OF_SPACE:
            raise
        raise _out_of_space(target, error.errno) from error
    except SafetensorError as error:
        code = re.search(r"\(os error (\d+)\)", str(error))
        if code is None or int(code[1]) not in OUT_OF_SPACE:
            raise
        raise _out_of_space(target, int(code[1])) from error


def _out_of_space(target: str | Path, code: int) -> OutputError:
    return OutputError(
        f"cannot write {target}: {os.strerror(code)} (the disk, a quota or the file size limit is full); free "
        "space there or choose a save_path on a filesystem with room for the quantized checkpoint"
    )


@dataclass(frozen=True)
class Place:
    """One tensor's bytes: ``part``[begin:end] (absolute file positions)."""

    key: str
    dtype: str  # safetensors' name: "BF16", "I8", ...
    shape: tuple[int, ...]
    part: str
    begin: int
    end: int


@dataclass(frozen=True)
class Part:
    name: str
    header: bytes  # the length prefix and the padded JSON header
    size: int  # of the whole file


@dataclass
class Layout:
    parts: list[Part]
    units: dict[str, list[Place]]  # by unit id, in the order the unit writes them

    @property
    def total_bytes(self) -> int:
        """Tensor data bytes (the index's total_size)."""
        return sum(p.end - p.begin for places in self.units.values() for p in places)

    def weight_map(self) -> dict[str, str]:
        return {p.key: p.part for places in self.units.values() for p in places}

    def to_json(self) -> dict:
        return {"parts": [[p.name, p.size] for p in self.parts],
                "units": {unit: [[p.key, p.dtype, list(p.shape), p.part, p.begin, p.end] for p in places]
                          for unit, places in self.units.items() if places}}  # not the units that write nothing


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


def plan_layout(units: list[tuple[str, list[tuple[str, torch.dtype, tuple[int, ...]]]]], part_bytes: int,
                part_names: Callable[[int], list[str]]) -> Layout:
    """Parts and places for ``units`` = [(unit id, [(key, dtype, shape), ...]), ...] in plan order; ``part_names(n)``
    names n parts (0: the single-file name)."""
    runs: list[list[tuple[str, str, str, tuple[int, ...], int]]] = [[]]
    size = 0
    for unit, entries in units:
        for key, dtype, shape in entries:
            nbytes = _nbytes(dtype, shape)
            if part_bytes and runs[-1] and size + nbytes > part_bytes:
                runs.append([])
                size = 0
            runs[-1].append((unit, key, DTYPE_NAMES[dtype], tuple(shape), nbytes))
            size += nbytes
    names = part_names(0 if part_bytes == 0 else len(runs))
    parts, placed = [], {unit: [] for unit, _ in units}
    for name, run in zip(names, runs):
        header, offset = {}, 0
        for _, key, dtype, shape, nbytes in run:
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % HEADER_ALIGNMENT)
        start = 8 + len(text)
        parts.append(Part(name, struct.pack("<Q", len(text)) + text, start + offset))
        for unit, key, dtype, shape, _ in run:
            begin, end = header[key]["data_offsets"]
            placed[unit].append(Place(key, dtype, shape, name, start + begin, start + end))
    return Layout(parts, placed)


def create_parts(parts: list[Part], folder: Path) -> None:
    """Each part file with its header, at its full size (its data still zeros, a sparse file): units fill their
    ranges in any order, from any process. A file size limit shows here, before any unit runs; a full disk when a
    unit writes."""
    for part in parts:
        with writing(folder / part.name), open(folder / part.name, "wb") as f:
            f.write(part.header)
            f.truncate(part.size)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def check_matches(unit: str, places: list[Place], tensors: list[tuple[str, torch.Tensor]]) -> None:
    """A unit must write exactly the tensors the layout placed for it: anything else is a bug, never data to keep."""
    got = [(key, DTYPE_NAMES.get(t.dtype), tuple(t.shape)) for key, t in tensors]
    expected = [(p.key, p.dtype, p.shape) for p in places]
    if got != expected:
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        raise OutputError(f"unit {unit} wrote {len(got)} tensors where the checkpoint layout has {len(expected)}; "
                          f"the first difference is at #{first}: {got[first:first + 1]} against "
                          f"{expected[first:first + 1]} (a bug: please report it)")


class PartFiles:
    """Positioned writes and reads of the part files in one folder (descriptors kept open until closed)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fds: dict[str, int] = {}

    def _fd(self, part: str) -> int:
        if part not in self._fds:
            self._fds[part] = os.open(self.folder / part, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        return self._fds[part]

    def write(self, place: Place, data: memoryview) -> None:
        if len(data) != place.end - place.begin:
            raise OutputError(f"{place.key}: {len(data)} bytes for a place of {place.end - place.begin}")
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd(place.part), data[done:], place.begin + done)

    def crc32(self, places: list[Place]) -> int:
        """CRC-32 of the bytes at ``places``, in order, as they are on disk (what a resumed run checks)."""
        crc = 0
        for place in places:
            position = place.begin
            while position < place.end:
                block = os.pread(self._fd(place.part), min(READ_BLOCK, place.end - position), position)
                if not block:
                    return -1  # the file is shorter than its layout: not this unit's bytes
                crc = zlib.crc32(block, crc)
                position += len(block)
        return crc

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def write_payload(files: PartFiles, places: list[Place], payload: bytes) -> None:
    """A unit's bytes that came through the object store (its places' bytes, concatenated in order)."""
    view, offset = memoryview(payload), 0
    for place in places:
        with writing(files.folder / place.part):
            files.write(place, view[offset:offset + place.end - place.begin])
        offset += place.end - place.begin
    if offset != len(payload):
        raise OutputError(f"a unit's payload holds {len(payload)} bytes, its places {offset}")
