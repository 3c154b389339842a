"""Write an msModelSlim "ascendv1" checkpoint (see docs/FORMAT.md) that vLLM Ascend loads with --quantization ascend.

Tensors stream into numbered part files inside a staging folder, so memory holds at most one part. Nothing lands in
save_path until publish(), and quant_model_description.json lands last: a crashed run never leaves a folder that
looks like a finished checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from dist_quant.checkpoint.reader import read_config
from dist_quant.errors import OutputError

logger = logging.getLogger(__name__)

QUANT_TYPE_PRIORITY = ("FLOAT", "W8A8_DYNAMIC", "W8A8")  # lowest first
STAGING_DIR = ".dist_quant_staging"
WEIGHTS_PREFIX = "quant_model_weights"
SINGLE_WEIGHTS_FILE = f"{WEIGHTS_PREFIX}.safetensors"
INDEX_FILE = f"{WEIGHTS_PREFIX}.safetensors.index.json"
DESCRIPTION_FILE = "quant_model_description.json"
COPIED_SUFFIXES = (".json", ".py", ".txt", ".jinja")
GB = 1024**3  # msModelSlim's part_file_size unit


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
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A private contiguous CPU copy: safetensors refuses tensors that share storage (q/k/v passing one input_scale)."""
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


class CheckpointWriter:
    """Collects (key, tensor, quant type) triples and publishes them as one ascendv1 checkpoint in save_path."""

    def __init__(
        self,
        save_path: str | Path,
        *,
        part_file_size_gb: float = 4,
        overwrite: bool = False,
        model_path: str | Path | None = None,
    ):
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
                    "pass overwrite to replace its content"
                )
        self.overwrite = overwrite
        shutil.rmtree(self.staging, ignore_errors=True)  # left over by a run that crashed
        self.staging.mkdir(parents=True)

        self._part_bytes = int(part_file_size_gb * GB)
        self._quant_types: dict[str, str] = {}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._part_keys: list[list[str]] = []  # keys of each part written to staging, in order
        self._total_bytes = 0
        self._optional_files: list[str] = []
        self._optional_description: dict | None = None

    def add(self, key: str, tensor: torch.Tensor, quant_type: str) -> None:
        if quant_type not in QUANT_TYPE_PRIORITY:
            raise ValueError(f"quant type {quant_type!r} of {key} is not one of {QUANT_TYPE_PRIORITY}")
        if key in self._quant_types:
            raise ValueError(f"tensor {key} was already added")
        tensor = _cpu_copy(tensor)
        nbytes = tensor.numel() * tensor.element_size()
        if self._part_bytes and self._buffer and self._buffer_bytes + nbytes > self._part_bytes:
            self._flush()
        self._buffer[key] = tensor
        self._buffer_bytes += nbytes
        self._total_bytes += nbytes
        self._quant_types[key] = quant_type

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self.staging / f"part-{len(self._part_keys) + 1:05d}.safetensors"
        save_file(self._buffer, str(path))
        logger.info("wrote %s (%.2f GB, %d tensors)", path.name, self._buffer_bytes / GB, len(self._buffer))
        self._part_keys.append(list(self._buffer))
        self._buffer = {}
        self._buffer_bytes = 0

    def add_optional(self, relpath: str, tensors: dict[str, torch.Tensor]) -> None:
        """A side file such as optional/quarot.safetensors; it is neither indexed nor described per tensor."""
        path = self.staging / relpath
        if Path(relpath).is_absolute() or ".." in Path(relpath).parts or relpath in self._optional_files:
            raise ValueError(f"optional file {relpath} must be a new path relative to the save path")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({name: _cpu_copy(tensor) for name, tensor in tensors.items()}, str(path))
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
    ) -> dict:
        """Finish every file in staging, then move them into save_path, the description last."""
        if not self._quant_types:
            raise OutputError(f"no tensors were added for {self.save_path}; nothing to publish")
        source = Path(source_model_dir)
        self._flush()
        self._name_parts()
        self._write_config(source)
        self._copy_source_files(source)
        if recipe_path is not None:
            shutil.copy2(recipe_path, self.staging / Path(recipe_path).name)
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

    def _name_parts(self) -> None:
        """Give the staged parts their final names (HF shard style) and write the index that lists them."""
        count = len(self._part_keys)
        if self._part_bytes == 0:
            names = [SINGLE_WEIGHTS_FILE]
        else:
            names = [f"{WEIGHTS_PREFIX}-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
        weight_map = {}
        for number, (name, keys) in enumerate(zip(names, self._part_keys), start=1):
            os.replace(self.staging / f"part-{number:05d}.safetensors", self.staging / name)
            weight_map.update({key: name for key in keys})
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
                shutil.copy2(path, self.staging / path.name)

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
        staged = sorted(self.staging.iterdir(), key=lambda p: p.name == DESCRIPTION_FILE)
        for path in staged:
            os.replace(path, self.save_path / path.name)
        self.staging.rmdir()

    def abort(self) -> None:
        """Drop everything written so far; save_path keeps whatever it held before."""
        self._buffer = {}
        shutil.rmtree(self.staging, ignore_errors=True)
