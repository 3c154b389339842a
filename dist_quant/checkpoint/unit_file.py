"""One unit of work's output tensors as one safetensors file in the staging folder's spill directory.

Workers (in this process or in Ray actors on other nodes) write unit files; the checkpoint writer later assembles the
parts from them in plan order, by byte ranges, so no process ever holds more than a unit's tensors. A record says
what a file holds; when the driver cannot see the worker's disk, the record carries the file's bytes instead.
"""

from __future__ import annotations

import errno
import os
import re
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import save

from dist_quant.errors import OutputError
from dist_quant.schemes import SCHEMES

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


def file_crc32(path: Path) -> int:
    """CRC-32 of a whole file, read in blocks: how staged files are checked before a resumed run keeps them."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 * 1024**2), b""):
            crc = zlib.crc32(block, crc)
    return crc


def is_plain_name(name: str) -> bool:
    """A file name with no folder part (no "/", "..", or hidden name): records may only name files of their own
    staging folder, whatever a journal line says."""
    return bool(name) and name == Path(name).name and name not in (".", "..") and not name.startswith(".") \
        and "\\" not in name and "\0" not in name


def _out_of_space(target: str | Path, code: int) -> OutputError:
    return OutputError(
        f"cannot write {target}: {os.strerror(code)} (the disk, a quota or the file size limit is full); free "
        "space there or choose a save_path on a filesystem with room for the quantized checkpoint"
    )


@dataclass(frozen=True)
class UnitRecord:
    unit_id: str
    file: str  # name inside the spill directory
    keys: tuple[str, ...]  # in the order the unit produced them
    quant_types: tuple[str, ...]
    nbytes: int  # tensor data bytes
    file_bytes: int  # size of the file
    crc32: int  # of the whole file, checked when a run is resumed
    payload: Optional[bytes] = None  # the file itself, when it has to travel through the object store


class UnitSink:
    """Collects the tensors of one unit at a time and writes them to ``spill_dir/<unit_id>.safetensors``.

    The sink takes the tensors it is given as they are (no copy, they are large): callers must not change them later.
    """

    def __init__(self, spill_dir: str | Path, *, ship_unit_files: bool = False):
        self.spill_dir = Path(spill_dir)
        self.ship_unit_files = ship_unit_files  # the record carries the file's bytes (driver on another disk)
        self._tensors: dict[str, torch.Tensor] = {}
        self._types: dict[str, str] = {}
        self._storages: set[int] = set()
        self.serialise_seconds = 0.0  # spent turning tensors into safetensors bytes, over every finish()

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def pending_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def add(self, key: str, tensor: torch.Tensor, quant_type: str) -> None:
        if quant_type not in SCHEMES:
            raise ValueError(f"quant type {quant_type!r} of {key} is not one of {list(SCHEMES)}")
        if key in self._tensors:
            raise ValueError(f"tensor {key} was already added")
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        if storage.nbytes() != tensor.numel() * tensor.element_size() or storage.data_ptr() in self._storages:
            tensor = tensor.clone()  # a view, or a tensor given twice: safetensors refuses storage shared by keys
        self._storages.add(tensor.untyped_storage().data_ptr())
        self._tensors[key] = tensor
        self._types[key] = quant_type

    def finish(self, unit_id: str) -> UnitRecord:
        """Write the unit file (atomically: a half-written file never carries the final name) and start afresh."""
        name = f"{unit_id}.safetensors"
        path = self.spill_dir / name
        tmp = self.spill_dir / f".{name}.{os.getpid()}.tmp"
        started = time.perf_counter()
        data = save(self._tensors)  # serialised once, in memory: checksummed, written, shipped if need be
        self.serialise_seconds += time.perf_counter() - started
        with writing(path):
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
            except BaseException:
                tmp.unlink(missing_ok=True)  # a half-written file is of no use and holds the space that ran out
                raise
        os.replace(tmp, path)
        record = UnitRecord(unit_id, name, tuple(self._tensors), tuple(self._types.values()), self.pending_bytes,
                            len(data), zlib.crc32(data), data if self.ship_unit_files else None)
        self._tensors, self._types, self._storages = {}, {}, set()
        return record
