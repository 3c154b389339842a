"""A checkpoint folder as a serving engine's loader sees it: the top-level files, config.json, and every tensor of
every top-level ``*.safetensors`` file (vLLM globs them all; an index does not choose among them), from the headers
alone. Nothing here raises on a bad folder: what cannot be read is recorded, for the rules to report; nothing here
opens a file that is not a regular one (a FIFO named ``*.safetensors`` would block the reader, as it blocks vLLM)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from dist_quant.checkpoint.safetensors_stream import HeaderError, open_regular, tensor_slices
from dist_quant.errors import reason

MAX_JSON_DEPTH = 32  # config.json nests 4 deep, an index 2, a description 1: deeper is refused before any rule walks it

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
        if not path.exists() and not path.is_symlink():
            return None
        try:
            with open_regular(path) as file:
                content = json.loads(file.read().decode())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
            self.problems[name] = reason(error)
            return None
        if json_depth(content) > MAX_JSON_DEPTH:
            self.problems[name] = f"nested more than {MAX_JSON_DEPTH} levels deep"
            return None
        return content

    def value(self, key: str) -> torch.Tensor:
        """A tensor's values (for the few small ones a rule looks at)."""
        with safe_open(str(self.path / self.tensors[key].file), "pt") as f:
            return f.get_tensor(key)


def json_depth(content: object) -> int:
    """How deep lists and objects nest in parsed JSON, without recursion (a deep value would overflow the rules'
    own recursive walks, such as repr)."""
    deepest, todo = 0, [(content, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, depth)
            todo += [(v, depth + 1) for v in (value.values() if isinstance(value, dict) else value)]
    return deepest


def read_folder(path: str | Path) -> Folder:
    path = Path(path)
    files = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    folder = Folder(path, files, None)
    config = folder.json("config.json")
    folder.config = config if isinstance(config, dict) else None
    holders: dict[str, list[str]] = {}
    for name in files:
        if not name.endswith(".safetensors"):
            continue
        try:  # vLLM globs *.safetensors: it would block on a FIFO, fail on a folder, and so is each reported
            slices = tensor_slices(path / name)
        except HeaderError as error:
            folder.unreadable[name] = str(error)
            continue
        except OSError as error:
            folder.unreadable[name] = reason(error)
            continue
        for key, info in slices.items():
            holders.setdefault(key, []).append(name)
            folder.tensors.setdefault(key, TensorInfo(name, DTYPES.get(info.dtype), tuple(info.shape)))
    folder.duplicates = {k: v for k, v in holders.items() if len(v) > 1}
    return folder
