"""A checkpoint's fingerprint: what binds an eval report to the checkpoint it measured (``dist-quant report --eval``
refuses another's). Cheap at any size, and light to import (no torch): it reads the small JSON files whole and, of
each part file, its safetensors header and a few sampled data blocks, never all of the tensor data.

Modification times and the folder's path are left out, so a copied checkpoint keeps its fingerprint; quant_run.json
(the source model's, recipe's and calibration set's digests) and the sampled scales make a requantization of the same
model another one. Files written next to a checkpoint later (report.html, an eval JSON) do not change it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO

from dist_quant.errors import CheckpointError

SMALL_FILES = ("config.json", "quant_model_description.json", "quant_model_files.json", "quant_run.json")
SAMPLES = 16  # data blocks read from each part file, evenly spread
SAMPLE_BYTES = 4096
MAX_HEADER_BYTES = 100 << 20  # safetensors' own bound on a header: a corrupt length never reads a whole file


def digest_safetensors(digest, f: BinaryIO, size: int, block_bytes: int) -> None:
    """Feed ``digest`` a safetensors file's header (tensor names, dtypes, shapes, offsets; a length beyond
    safetensors' own bound is not read) and SAMPLES blocks of ``block_bytes`` spread over its ``size`` bytes, then its
    last block: what changes with any other tensor layout and, most likely, with other data, read cheaply."""
    header_length = int.from_bytes(f.read(8), "little")
    digest.update(f.read(min(header_length, size, MAX_HEADER_BYTES)))
    step = max(size // SAMPLES, 1)
    for position in range(0, size, step)[:SAMPLES]:
        digest.update(os.pread(f.fileno(), block_bytes, position))
    digest.update(os.pread(f.fileno(), block_bytes, max(size - block_bytes, 0)))


def checkpoint_fingerprint(folder: str | Path) -> str:
    """``"sha256:<hex>"`` over the bytes of the folder's small JSON files and safetensors indexes (whichever exist:
    any format), and for each ``*.safetensors`` regular file its name, size, header and SAMPLES data blocks. Anything
    that is not a regular file is left out (a FIFO is never opened). CheckpointError when a file cannot be read."""
    folder = Path(folder)
    digest = hashlib.sha256()
    names = [n for n in SMALL_FILES if (folder / n).is_file()]
    names += sorted(p.name for p in folder.glob("*.safetensors.index.json") if p.is_file())
    try:
        for name in names:
            digest.update(json.dumps([name, (folder / name).stat().st_size]).encode())
            digest.update((folder / name).read_bytes())
        for part in sorted(p for p in folder.glob("*.safetensors") if p.is_file()):
            size = part.stat().st_size
            digest.update(json.dumps([part.name, size]).encode())
            with open(part, "rb") as f:
                digest_safetensors(digest, f, size, SAMPLE_BYTES)
    except OSError as error:
        raise CheckpointError(f"cannot fingerprint checkpoint {folder} ({error.strerror or error}: "
                              f"{error.filename}); check the folder's files and permissions") from None
    return f"sha256:{digest.hexdigest()}"
