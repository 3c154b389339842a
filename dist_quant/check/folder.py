"""A checkpoint folder as a serving engine's loader sees it: the top-level files, config.json, and every tensor of
every top-level ``*.safetensors`` file (vLLM globs them all; an index does not choose among them), from the headers
alone. Nothing here raises on a bad folder: what cannot be read is recorded, for the rules to report; nothing here
opens a file that is not a regular one (a FIFO named ``*.safetensors`` would block the reader, as it blocks vLLM)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dist_quant.checkpoint.safetensors_stream import HeaderError, open_regular, tensor_slices
from dist_quant.errors import reason

MAX_JSON_DEPTH = 32  # config.json nests 4 deep, an index 2, a description 1: deeper is refused before any rule walks it

# dtypes are the safetensors header's names, as the rules compare them: no torch (``dist-quant check`` answers in well
# under a second, and importing torch alone takes 2-3 s)
FLOATS = ("F16", "BF16", "F32")  # the float dtypes a float parameter's tensor may have (the loader casts them)
# struct's little-endian formats of the dtypes decoded here (BF16 is decoded by :func:`decode_values` itself)
STRUCT_FORMATS = {"BOOL": "?", "U8": "B", "I8": "b", "I16": "h", "I32": "i", "I64": "q", "F16": "e", "F32": "f",
                  "F64": "d"}
DECODABLE = (*STRUCT_FORMATS, "BF16")


def decode_values(raw: bytes, dtype: str) -> list[bool | int | float]:
    """The values of a tensor's little-endian bytes ``raw`` of the safetensors ``dtype`` (one of DECODABLE), in
    order: a bfloat16 is the upper half of a float32, so its 16 bits shifted up are that float32's bits."""
    if dtype == "BF16":
        halves = struct.unpack(f"<{len(raw) // 2}H", raw)
        return list(struct.unpack(f"<{len(halves)}f", struct.pack(f"<{len(halves)}I", *(h << 16 for h in halves))))
    code = STRUCT_FORMATS[dtype]
    return list(struct.unpack(f"<{len(raw) // struct.calcsize(code)}{code}", raw))


@dataclass(frozen=True)
class TensorInfo:
    file: str  # the top-level file that holds it
    dtype: str  # the safetensors header's name, e.g. "BF16", "I8" (any the header says)
    shape: tuple[int, ...]
    begin: int  # where its bytes lie in the file: absolute positions, begin included, end not
    end: int


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

    def values(self, key: str) -> list[bool | int | float]:
        """A tensor's values, flattened (for the few one-element ones a rule looks at: the caller checks the shape
        and that the dtype is DECODABLE), from its bytes in the file."""
        info = self.tensors[key]
        with open_regular(self.path / info.file) as file:
            file.seek(info.begin)
            return decode_values(file.read(info.end - info.begin), info.dtype)


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
            folder.tensors.setdefault(key, TensorInfo(name, info.dtype, tuple(info.shape), info.begin,
                                                          info.end))
    folder.duplicates = {k: v for k, v in holders.items() if len(v) > 1}
    return folder
