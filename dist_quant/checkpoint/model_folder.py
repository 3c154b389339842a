"""The files of a model folder that may be read, and its config.json: what ``dist-quant plan`` and ``check`` need
before (or without) any tensor, so this module imports no torch (checkpoint/reader.py, which reads the tensors, does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from dist_quant.checkpoint.safetensors_stream import DuplicateKeyError, parse_json, read_text
from dist_quant.errors import CheckpointError, reason

# Hugging Face cache snapshots (.../models--org--name/snapshots/<revision>/) hold symlinks into ../../blobs/
HF_CACHE_SNAPSHOTS, HF_CACHE_BLOBS = "snapshots", "blobs"


def allowed_roots(folder: Path) -> tuple[Path, ...]:
    """Where the files of a model folder may really lie (symlinks followed): inside the folder and, for a Hugging Face
    cache snapshot, in its repository's blobs folder."""
    root = folder.resolve()
    blobs = root.parent.parent / HF_CACHE_BLOBS
    if root.parent.name == HF_CACHE_SNAPSHOTS and blobs.is_dir():
        return root, blobs.resolve()
    return (root,)


def lies_outside(path: Path, roots: Sequence[Path]) -> bool:
    """Whether ``path``, every symlink followed, is outside all of ``roots`` (resolved folders)."""
    real = path.resolve()
    return not any(real.is_relative_to(root) for root in roots)


def climbs_out(name: str) -> bool:
    """A file name from a file (an index entry) that is absolute or uses '..': it would name a file outside its
    folder, whatever that folder holds."""
    pure = PurePosixPath(name)
    return "\x00" in name or pure.is_absolute() or ".." in pure.parts or not pure.parts


def model_file(model_dir: Path, name: str, what: str) -> Path:
    """``model_dir/name`` once it is known to stay inside the model folder, symlinks followed (CheckpointError
    naming ``what`` otherwise): a config or index must not make the tool read, or quote, any file of the machine."""
    path = model_dir / name
    if climbs_out(name):
        raise CheckpointError(f"{what} names {name[:200]!r}, a path outside the model folder {model_dir}; only "
                              "files inside the model folder are read")
    if lies_outside(path, allowed_roots(model_dir)):
        raise CheckpointError(f"{path} is a symlink to {path.resolve()}, outside the model folder {model_dir}; "
                              "copy the file into the model folder")
    return path


def load_json_file(path: Path) -> object:
    """A JSON file's content: OSError (NotARegularFile for a FIFO, device or directory), UnicodeDecodeError,
    JSONDecodeError, DuplicateKeyError or RecursionError otherwise; report them with errors.reason()."""
    return parse_json(read_text(path))


JSON_FILE_ERRORS = (OSError, UnicodeDecodeError, json.JSONDecodeError, DuplicateKeyError, RecursionError)


def read_config(path: Path) -> dict:
    """A model's config.json as a dict; every failure names the file, since configs are often hand-edited."""
    path = Path(path)
    model_file(path.parent, path.name, "the model folder")
    try:
        config = load_json_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: pass the Hugging Face model directory that holds config.json") \
            from None
    except JSON_FILE_ERRORS as error:
        raise CheckpointError(f"cannot read {path}: {reason(error)}; restore the file from the original model") \
            from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; restore the file from the original model")
    return config
