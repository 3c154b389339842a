"""One unit of work's output tensors, written straight into their places in the checkpoint's part files.

Workers (in this process or in Ray actors on other nodes) collect a unit's tensors and, when it ends, write each one
at the place the checkpoint layout gave it (checkpoint/layout.py), so no process holds more than a unit's tensors
and no byte is written twice. A record says what a unit wrote and its CRC-32; when the worker cannot see the
staging folder, the record carries the unit's bytes instead and the driver writes them.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dist_quant.checkpoint.layout import PartFiles, Place, check_matches, tensor_bytes, writing
from dist_quant.schemes import SCHEMES


def file_crc32(path: Path) -> int:
    """CRC-32 of a whole file, read in blocks: how a saved stream file (runtime/resume.py) is checked before
    a resumed run uses it."""
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


@dataclass(frozen=True)
class UnitRecord:
    unit_id: str
    keys: tuple[str, ...]  # in the order the unit produced them
    quant_types: tuple[str, ...]
    nbytes: int  # tensor data bytes
    crc32: int  # of the unit's bytes in place order, checked when a run is resumed
    payload: Optional[bytes] = None  # the unit's bytes, when they have to travel through the object store


class UnitSink:
    """Collects the tensors of one unit at a time and writes them to their places in the part files of
    ``staging_dir`` (or into the record, ``ship_unit_files``).

    The sink takes the tensors it is given as they are (no copy, they are large): callers must not change them later.
    """

    def __init__(self, staging_dir: str | Path, *, ship_unit_files: bool = False):
        self.ship_unit_files = ship_unit_files  # the record carries the bytes (driver on another disk)
        self.files = PartFiles(Path(staging_dir))
        self._tensors: dict[str, torch.Tensor] = {}
        self._types: dict[str, str] = {}
        self.serialise_seconds = 0.0  # spent gathering the bytes a record carries, over every finish()

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
        self._tensors[key] = tensor.detach().to("cpu").contiguous()
        self._types[key] = quant_type

    def finish(self, unit_id: str, places: list[Place]) -> UnitRecord:
        """Write the unit's tensors at ``places`` (the layout's, in order) and start afresh."""
        tensors = list(self._tensors.items())
        check_matches(unit_id, places, tensors)
        payload, crc = None, 0
        if self.ship_unit_files:
            started = time.perf_counter()
            payload = b"".join(tensor_bytes(t) for _, t in tensors)
            self.serialise_seconds += time.perf_counter() - started
            crc = zlib.crc32(payload)
        else:
            for place, (_, tensor) in zip(places, tensors):
                data = tensor_bytes(tensor)
                with writing(self.files.folder / place.part):
                    self.files.write(place, data)
                crc = zlib.crc32(data, crc)
        record = UnitRecord(unit_id, tuple(self._tensors), tuple(self._types.values()), self.pending_bytes, crc,
                            payload)
        self._tensors, self._types = {}, {}
        return record

    def close(self) -> None:
        self.files.close()
