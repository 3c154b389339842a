"""A checkpoint folder as a serving engine's loader sees it: the top-level files, config.json, and every tensor of
every top-level ``*.safetensors`` file (vLLM globs them all; an index does not choose among them), from the headers
alone. Nothing here raises on a bad folder: what cannot be read is recorded, for the rules to report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from dist_quant.checkpoint.safetensors_stream import HeaderError, tensor_slices

# the safetensors dtype names, as torch dtypes (what the rules compare with)
DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
          "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class TensorInfo:
    file: str  # the top-level file that holds it
    dtype: Optional[torch.dtype]  # None: a dtype torch has no name for
    shape: tuple[int, ...]


@dataclass
class Folder:
    path: Path
    files: list[str]  # top-level names (folders included)
    config: Optional[dict]  # config.json, None when missing or unreadable
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    duplicates: dict[str, list[str]] = field(default_factory=dict)  # key -> the files holding it, when more than one
    unreadable: dict[str, str] = field(default_factory=dict)  # file -> why it could not be read
    problems: dict[str, str] = field(default_factory=dict)  # file -> why it could not be parsed as JSON

    def json(self, name: str) -> Optional[object]:
        """A top-level JSON file's content; None when it is missing or unreadable (recorded in ``problems``)."""
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as error:
            self.problems[name] = str(error)
            return None

    def value(self, key: str) -> torch.Tensor:
        """A tensor's values (for the few small ones a rule looks at)."""
        with safe_open(str(self.path / self.tensors[key].file), "pt") as f:
            return f.get_tensor(key)


def read_folder(path: str | Path) -> Folder:
    path = Path(path)
    files = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    folder = Folder(path, files, None)
    config = folder.json("config.json")
    folder.config = config if isinstance(config, dict) else None
    holders: dict[str, list[str]] = {}
    for name in files:
        if not name.endswith(".safetensors") or not (path / name).is_file():
            continue
        try:
            slices = tensor_slices(path / name)
        except (HeaderError, OSError) as error:
            folder.unreadable[name] = str(error)
            continue
        for key, info in slices.items():
            holders.setdefault(key, []).append(name)
            folder.tensors.setdefault(key, TensorInfo(name, DTYPES.get(info.dtype), tuple(info.shape)))
    folder.duplicates = {k: v for k, v in holders.items() if len(v) > 1}
    return folder
