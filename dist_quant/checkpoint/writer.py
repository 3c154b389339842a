"""Write an msModelSlim "ascendv1" checkpoint (see docs/FORMAT.md) that vLLM Ascend loads with --quantization ascend.

Tensors spill into small numbered files inside a staging folder, so memory holds a few layers, never a whole part;
publish() then assembles the parts by copying byte ranges out of the spill files. Nothing lands in save_path until
publish(), and quant_model_description.json lands last: a crashed run never leaves a folder that looks like a
finished checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Optional
from pathlib import Path

import torch
from safetensors.torch import save_file

from dist_quant.checkpoint.reader import read_config
from dist_quant.checkpoint.safetensors_stream import TensorSlice, tensor_slices, write_concatenated
from dist_quant.checkpoint.unit_file import QUANT_TYPES as QUANT_TYPE_PRIORITY
from dist_quant.checkpoint.unit_file import UnitRecord, UnitSink, writing
from dist_quant.errors import OutputError

logger = logging.getLogger(__name__)

STAGING_DIR = ".dist_quant_staging"
SPILL_DIR = "spill"
PRIVATE_DIR = "run"
WEIGHTS_PREFIX = "quant_model_weights"
SINGLE_WEIGHTS_FILE = f"{WEIGHTS_PREFIX}.safetensors"
INDEX_FILE = f"{WEIGHTS_PREFIX}.safetensors.index.json"
DESCRIPTION_FILE = "quant_model_description.json"
COPIED_SUFFIXES = (".json", ".py", ".txt", ".jinja")
GB = 1024**3  # msModelSlim's part_file_size unit
MiB = 1024**2


def model_quant_type(types: Iterable[str]) -> str:
    """The description's model_quant_type: the highest-priority type present (FLOAT < W8A8_DYNAMIC < W8A8)."""
    present = set(types)
    unknown = present - set(QUANT_TYPE_PRIORITY)
    if unknown:
        raise ValueError(f"unknown quant types {sorted(unknown)}; expected some of {QUANT_TYPE_PRIORITY}")
    if not present:
        raise ValueError("no quant types given")
    return max(present, key=QUANT_TYPE_PRIORITY.index)


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _write_json(path: Path, content: dict) -> None:
    with writing(path), open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file creates files readable by the owner only; a served checkpoint is read by other users too."""
    with writing(path):
        save_file(tensors, str(path))
    path.chmod(0o644)


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A private contiguous CPU copy: safetensors refuses tensors that share storage (q/k/v passing one input_scale)."""
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def _layout_parts(slices: list[TensorSlice], part_bytes: int) -> Iterator[list[TensorSlice]]:
    """Consecutive runs of slices; a new part starts when the next tensor would push the current one past part_bytes
    (0: everything in one part), so only a single tensor larger than part_bytes makes a part exceed it."""
    part: list[TensorSlice] = []
    size = 0
    for tensor in slices:
        nbytes = tensor.end - tensor.begin
        if part_bytes and part and size + nbytes > part_bytes:
            yield part
            part, size = [], 0
        part.append(tensor)
        size += nbytes
    if part:
        yield part


PartWriter = Callable[[list[tuple[Path, list[TensorSlice]]]], None]


def _write_parts_here(batch: list[tuple[Path, list[TensorSlice]]]) -> None:
    for path, part in batch:
        with writing(path):
            write_concatenated(path, part)


def _copy(source: Path, target: Path) -> None:
    with writing(target):
        shutil.copy2(source, target)


class CheckpointWriter:
    """Collects (key, tensor, quant type) triples and publishes them as one ascendv1 checkpoint in save_path."""

    def __init__(
        self,
        save_path: str | Path,
        *,
        part_file_size_gb: float = 4,
        spill_bytes: int = 256 * MiB,
        overwrite: bool = False,
        model_path: str | Path | None = None,
        resume: bool = False,
    ):
        """spill_bytes bounds the tensors held in memory: past it, add() writes them to a spill file in staging.
        resume keeps the staging folder of an interrupted run (the caller adds its unit files again)."""
        self.save_path = Path(save_path)
        if part_file_size_gb < 0:
            raise ValueError(f"part_file_size_gb must be >= 0 (0 writes a single file), got {part_file_size_gb}")
        if model_path is not None:
            target, source = self.save_path.resolve(), Path(model_path).resolve()
            if _is_within(target, source) or _is_within(source, target):
                raise OutputError(
                    f"save path {self.save_path} and model path {model_path} overlap: writing there would mix the "
                    "quantized files with (or delete) the float model; choose a separate folder"
                )
        if self.save_path.exists() and not self.save_path.is_dir():
            raise OutputError(f"save path {self.save_path} exists and is not a folder; choose another path")
        self.staging = self.save_path / STAGING_DIR
        if self.save_path.exists():
            existing = sorted(p.name for p in self.save_path.iterdir() if p.name != STAGING_DIR)
            if existing and not overwrite:
                raise OutputError(
                    f"save path {self.save_path} is not empty (holds {existing[:5]}); choose an empty folder or "
                    "pass --overwrite to replace its content"
                )
        self.overwrite = overwrite
        if not resume:
            shutil.rmtree(self.staging, ignore_errors=True)  # left over by a run that crashed
        self.spill_dir = self.staging / SPILL_DIR
        self.private_dir = self.staging / PRIVATE_DIR  # the run's own bookkeeping (resume journal...): never published
        with writing(self.spill_dir):
            self.spill_dir.mkdir(parents=True, exist_ok=resume)
            self.private_dir.mkdir(exist_ok=resume)

        self._part_bytes = int(part_file_size_gb * GB)
        self._spill_bytes = spill_bytes
        self._quant_types: dict[str, str] = {}
        self._sink = UnitSink(self.spill_dir)
        self._spill_count = 0
        self._spilled: list[TensorSlice] = []  # every tensor written to a spill file, in insertion order
        self._total_bytes = 0
        self._optional_files: list[str] = []
        self._optional_description: dict | None = None

    def add_unit(self, record: UnitRecord) -> None:
        """Register a unit file written by a worker; the parts list units in the order they are added."""
        path = self.spill_dir / record.file
        if record.payload is not None:  # the worker's disk is not ours: its file came through the object store
            with writing(path):
                path.write_bytes(record.payload)
        if not path.is_file() or path.stat().st_size != record.file_bytes:
            raise OutputError(f"unit file {path} of unit {record.unit_id} is missing or incomplete; is save_path on a "
                              "filesystem every worker node shares?")
        clash = [key for key in record.keys if key in self._quant_types]
        if clash:
            raise ValueError(f"unit {record.unit_id} repeats tensors already added: {clash[:5]}")
        slices = tensor_slices(path)
        self._spilled.extend(slices[key] for key in record.keys)  # the file's own data order sorts by dtype
        self._quant_types.update(zip(record.keys, record.quant_types))
        self._total_bytes += record.nbytes

    def add(self, key: str, tensor: torch.Tensor, quant_type: str) -> None:
        """Add one tensor; past spill_bytes the buffered tensors go to a spill file."""
        if key in self._quant_types:
            raise ValueError(f"tensor {key} was already added")
        self._sink.add(key, tensor.detach().clone(), quant_type)  # the caller may change its tensor afterwards
        if self._sink.pending_bytes > self._spill_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered tensors to the next spill file (bounds memory by what was added since the last flush)."""
        if not len(self._sink):
            return
        self._spill_count += 1
        self.add_unit(self._sink.finish(f"{self._spill_count:06d}"))

    def add_optional(self, relpath: str, tensors: dict[str, torch.Tensor]) -> None:
        """A side file such as optional/quarot.safetensors; it is neither indexed nor described per tensor."""
        path = self.staging / relpath
        if Path(relpath).is_absolute() or ".." in Path(relpath).parts or relpath in self._optional_files:
            raise ValueError(f"optional file {relpath} must be a new path relative to the save path")
        path.parent.mkdir(parents=True, exist_ok=True)
        _save({name: _cpu_copy(tensor) for name, tensor in tensors.items()}, path)
        self._optional_files.append(relpath)

    def set_optional_description(self, optional: dict) -> None:
        """The description's "optional" field, which tells vLLM where side files such as the QuaRot rotation live."""
        self._optional_description = optional

    def publish(
        self,
        source_model_dir: str | Path,
        *,
        recipe_path: str | Path | None = None,
        metadata: dict | None = None,
        write_parts: Optional[PartWriter] = None,
        parallel_parts: int = 1,
    ) -> dict:
        """Finish every file in staging, then move them into save_path, the description last.

        ``write_parts`` writes a batch of ``parallel_parts`` parts at once (the Ray driver hands them to its actors);
        by default this process writes them one by one.
        """
        self.flush()
        if not self._quant_types:
            raise OutputError(f"no tensors were added for {self.save_path}; nothing to publish")
        source = Path(source_model_dir)
        self._write_parts(write_parts or _write_parts_here, max(1, parallel_parts))
        self._write_config(source)
        self._copy_source_files(source)
        if recipe_path is not None:
            _copy(Path(recipe_path), self.staging / Path(recipe_path).name)
        description = {
            **self._quant_types,
            "version": "1.0.0",
            "model_quant_type": model_quant_type(self._quant_types.values()),
            "metadata": metadata or {},
            "group_size": 0,
        }
        if self._optional_description is not None:
            description["optional"] = self._optional_description
        _write_json(self.staging / DESCRIPTION_FILE, description)

        files = sorted(str(p.relative_to(self.staging)) for p in self.staging.rglob("*") if p.is_file())
        self._move_into_place()
        logger.info(
            "published %d tensors (%.2f GB) to %s", len(self._quant_types), self._total_bytes / GB, self.save_path
        )
        return {
            "tensors": len(self._quant_types),
            "bytes": self._total_bytes,
            "counts": dict(Counter(self._quant_types.values())),
            "files": files,
        }

    def _write_parts(self, write_batch: PartWriter, batch_size: int) -> None:
        """Assemble the parts (HF shard names) from the spill files, a batch at a time, deleting each spill file once
        all of it is copied, so the disk holds little more than one batch of parts twice; then write the index."""
        parts = list(_layout_parts(self._spilled, self._part_bytes))
        count = len(parts)
        if self._part_bytes == 0:
            names = [SINGLE_WEIGHTS_FILE]
        else:
            names = [f"{WEIGHTS_PREFIX}-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
        uncopied = Counter(tensor.source for tensor in self._spilled)
        weight_map = {}
        jobs = [(self.staging / name, part) for name, part in zip(names, parts)]
        for first in range(0, count, batch_size):
            batch = jobs[first:first + batch_size]
            write_batch(batch)
            for path, part in batch:
                path.chmod(0o644)
                logger.info("wrote part %s (%.2f GB)", path.name, path.stat().st_size / GB)
                weight_map.update({tensor.key: path.name for tensor in part})
                uncopied.subtract(tensor.source for tensor in part)
            for spill in [spill for spill, left in uncopied.items() if left == 0]:
                spill.unlink()
                del uncopied[spill]
        self.spill_dir.rmdir()
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
        _write_json(self.staging / INDEX_FILE, index)

    def _write_config(self, source: Path) -> None:
        """vLLM would read a leftover quantization_config as the quant description, so it goes, from both levels."""
        config = read_config(source / "config.json")
        config.pop("quantization_config", None)
        if isinstance(config.get("text_config"), dict):
            config["text_config"].pop("quantization_config", None)
        _write_json(self.staging / "config.json", config)

    def _copy_source_files(self, source: Path) -> None:
        """Tokenizer, processor and templates; never a float index, which would make vLLM skip the quantized parts."""
        for path in sorted(source.iterdir()):
            if (
                path.is_file()
                and path.suffix in COPIED_SUFFIXES
                and path.name != "config.json"
                and not path.name.endswith("index.json")
            ):
                _copy(path, self.staging / path.name)

    def _move_into_place(self) -> None:
        if self.overwrite:  # the old description goes first, so the old checkpoint stops looking finished
            old = sorted(
                (p for p in self.save_path.iterdir() if p.name != STAGING_DIR), key=lambda p: p.name != DESCRIPTION_FILE
            )
            for path in old:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        shutil.rmtree(self.private_dir, ignore_errors=True)
        staged = sorted(self.staging.iterdir(), key=lambda p: p.name == DESCRIPTION_FILE)
        for path in staged:
            os.replace(path, self.save_path / path.name)
        self.staging.rmdir()

    def abort(self) -> None:
        """Drop everything written so far; save_path keeps whatever it held before."""
        self._sink = UnitSink(self.spill_dir)
        shutil.rmtree(self.staging, ignore_errors=True)
