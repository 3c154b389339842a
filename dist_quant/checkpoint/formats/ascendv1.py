"""msModelSlim's "ascendv1" format (docs/FORMAT.md): what vLLM Ascend (``--quantization ascend``) and MindIE load.

Files: HF-style weight parts ``quant_model_weights-0000k-of-0000n.safetensors`` with their index,
``quant_model_description.json`` (a quant type per tensor key, plus version, model_quant_type, metadata, group_size
and optional), ``optional/quarot.safetensors`` with QuaRot's rotation, and the source's config.json without any
``quantization_config`` (vLLM would read it as the description). Every tensor of a linear is keyed
``{linear}.{role}``; a bias is described FLOAT; ``deq_scale`` is float32 for a bfloat16 model and the float32 bit
pattern in int64 for any other (float16, float32), as msModelSlim writes it: vLLM Ascend's W8A8 method creates it
float32 for bfloat16 serving and int64 for float16, which is how vLLM serves a float32 model by default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from dist_quant.checkpoint.formats.common import drop_config_keys, hub_part_names
from dist_quant.checkpoint.model_folder import JSON_FILE_ERRORS, load_json_file, model_file
from dist_quant.errors import CheckpointError, RecipeError, reason

if TYPE_CHECKING:  # light to import (as `dist-quant check` needs its formats): torch and the schemes where they work
    import torch
    from torch import nn

    from dist_quant.schemes import LinearSpec, QuantizedLinear

NAME = "ascendv1"
SAVER = "ascendv1_saver"  # msModelSlim's saver type
CLI_NAME = "ascendv1"
CHECK_RULES = "dist_quant.check.ascend"
WEIGHTS_PREFIX = "quant_model_weights"
SINGLE_WEIGHTS_FILE = f"{WEIGHTS_PREFIX}.safetensors"
INDEX_FILE = f"{WEIGHTS_PREFIX}.safetensors.index.json"
DESCRIPTION_FILE = "quant_model_description.json"
DESCRIPTION_FIELDS = ("version", "model_quant_type", "metadata", "group_size", "optional")
MARKER_FILE = DESCRIPTION_FILE  # published last: a folder without it does not look finished
OPTIONAL_DIR = "optional"
QUAROT_FILE = f"{OPTIONAL_DIR}/quarot.safetensors"
HIJACKING_CONFIG_KEYS = ("quantization_config", "compression_config")  # vLLM takes these for the description


def part_names(count: int) -> list[str]:
    """The weight files of a checkpoint of ``count`` parts (0 parts limit: one file without a number)."""
    return hub_part_names(WEIGHTS_PREFIX, count)


# --- writing ---------------------------------------------------------------------------------------------------------

def linear_entries(name: str, quant_type: str, quantized: QuantizedLinear,
                   spec: LinearSpec) -> list[tuple[str, torch.Tensor, str]]:
    """(key, tensor, described type) of each stored tensor of the linear ``name``, from what its scheme made (on
    the host), by the type's encoding (ascendv1_encoding.py), in msModelSlim's order; a bias is described FLOAT."""
    from dist_quant.checkpoint.formats.ascendv1_encoding import ENCODINGS
    from dist_quant.schemes import FLOAT

    roles = ENCODINGS[quant_type].encode(quantized, spec)
    return [(f"{name}.{role}", tensor, FLOAT if role == "bias" else quant_type) for role, tensor in roles.items()]


def unsupported(quant_types: Iterable[str]) -> Optional[str]:
    """Why linears of these quant types cannot be written together in this format (asked before any unit runs), or
    None: a type without an encoding, or types that need different values of the description's one group_size."""
    try:
        group_size(quant_types)
    except RecipeError as error:
        return str(error)
    return None


def _encodings(types: Iterable[str]) -> dict:
    """The encoding of each of these types (ascendv1_encoding.py), sorted by name; RecipeError for a type without
    one."""
    from dist_quant.checkpoint.formats.ascendv1_encoding import ENCODINGS

    present = sorted(set(types))
    unknown = [t for t in present if t not in ENCODINGS]
    if unknown:
        raise RecipeError(f"the ascendv1 format has no encoding for {unknown[0]}; it stores {list(ENCODINGS)}")
    return {t: ENCODINGS[t] for t in present}


def group_size(types: Iterable[str]) -> int:
    """The description's group_size for a checkpoint of these types: what they need (0 when none needs one)."""
    needed = {t: e.group_size for t, e in _encodings(types).items() if e.group_size is not None}
    if len(set(needed.values())) > 1:
        raise RecipeError("the ascendv1 description has one group_size, and these types need different ones: "
                          + ", ".join(f"{t} {g}" for t, g in needed.items()) + " (vLLM Ascend reads it for each); "
                          "quantize them in separate checkpoints or choose other types")
    return next(iter(needed.values()), 0)


def model_quant_type(types: Iterable[str]) -> str:
    """The description's model_quant_type: the present type of highest priority (msModelSlim's QUANT_TYPE_PRIORITY:
    FLOAT < W8A16 < W8A8_DYNAMIC < W8A8 < W8A8_MXFP8; W4A8_DYNAMIC below FLOAT)."""
    encodings = _encodings(types)
    if not encodings:
        raise ValueError("no quant types given")
    return max(encodings, key=lambda t: encodings[t].priority)


def description(types: dict[str, str], optional: Optional[dict]) -> dict:
    """The description's content: each tensor's type, then the top-level fields in msModelSlim's order. Its saver
    writes ``optional`` always since 2026-03 (f200bca): ``{}`` unless a side file such as QuaRot's rotation fills it
    (vLLM Ascend reads ``optional.quarot.rotation_map`` only for an Eagle3 draft model, and tolerates its absence)."""
    present = set(types.values())
    return {**types, "version": "1.0.0", "model_quant_type": model_quant_type(present), "metadata": {},
            "group_size": group_size(present), "optional": {} if optional is None else optional}


def description_files(types: dict[str, str], optional: Optional[dict]) -> dict[str, dict]:
    """The JSON files that describe the checkpoint, by name (the writer publishes MARKER_FILE last)."""
    return {DESCRIPTION_FILE: description(types, optional)}


def published_types(save_path: Path) -> dict[str, str]:
    """The quant type of each tensor of a published checkpoint of this format."""
    return described_types(json.loads((Path(save_path) / DESCRIPTION_FILE).read_text()))


def described_types(content: dict) -> dict[str, str]:
    """The quant type of each tensor key of a description (its other fields left out)."""
    return {k: v for k, v in content.items() if k not in DESCRIPTION_FIELDS}


def rewrite_config(config: dict, types: dict[str, str]) -> dict:
    """The source config.json without the keys vLLM would take for the quant description, from both levels (the
    quant types live in the description file, not here; docs/ascend-loader-rules.md R2)."""
    return drop_config_keys(config, HIJACKING_CONFIG_KEYS)


def rotation_file(rotation: torch.Tensor) -> tuple[str, dict[str, torch.Tensor], dict]:
    """QuaRot's dense rotation as a side file: (path in the checkpoint, its tensors, the description's optional)."""
    import torch

    return (QUAROT_FILE, {"global_rotation": rotation.to(torch.float32)},
            {"quarot": {"rotation_map": {"global_rotation": QUAROT_FILE}}})


def is_published(save_path: Path) -> bool:
    """A finished checkpoint of this format is in ``save_path`` (its marker is there)."""
    return (Path(save_path) / MARKER_FILE).exists()


def is_own_file(name: str) -> bool:
    """A file name this format writes into a checkpoint folder."""
    return name.startswith(WEIGHTS_PREFIX) or name == DESCRIPTION_FILE


# --- reading (dist-quant eval) ---------------------------------------------------------------------------------------

def role_suffixes() -> tuple[str, ...]:
    """Every role a linear of any type may carry besides its weight."""
    from dist_quant.checkpoint.formats.ascendv1_encoding import ENCODINGS

    return tuple(dict.fromkeys(r for e in ENCODINGS.values() for r in (*e.roles, "bias") if r != "weight"))


def needed_roles(quant_type: Optional[str]) -> tuple[str, ...]:
    """The roles besides its weight a linear of that type must have to be served (none for an unknown type)."""
    from dist_quant.checkpoint.formats.ascendv1_encoding import ENCODINGS

    roles = ENCODINGS[quant_type].roles if quant_type in ENCODINGS else ()
    return tuple(r for r in roles if r != "weight")


def stored_shape(quant_type: Optional[str], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a linear's ``weight`` of that type is stored in, for a float weight of ``shape`` [out, in]."""
    from dist_quant.checkpoint.formats.ascendv1_encoding import ENCODINGS

    return ENCODINGS[quant_type].stored_shape(shape) if quant_type in ENCODINGS else shape


class Checkpoint:
    """An ascendv1 checkpoint read back: its description, tensors, rotation, and each linear as the engine runs it."""

    def __init__(self, path: str | Path, dtype: torch.dtype):
        from dist_quant.checkpoint.reader import CheckpointReader

        self.path = Path(path)
        from dist_quant.checkpoint.formats import compressed_tensors

        description_file = model_file(self.path, DESCRIPTION_FILE, "the quantized checkpoint")
        if not description_file.exists() and compressed_tensors.is_published(self.path):
            raise CheckpointError(f"{path} is a compressed-tensors checkpoint; dist-quant eval runs vLLM Ascend's "
                                  "math on ascendv1 checkpoints only: quantize again without --save_format (the same "
                                  "recipe gives the same codes and scales) and evaluate that")
        try:
            self.description = load_json_file(description_file)
        except JSON_FILE_ERRORS as error:
            raise CheckpointError(f"{description_file} is missing or unreadable ({reason(error)}); is {path} a "
                                  "finished dist-quant / msModelSlim checkpoint?") from None
        if not isinstance(self.description, dict):
            raise CheckpointError(f"{description_file} does not hold a JSON object; is {path} a finished "
                                  "dist-quant / msModelSlim checkpoint?")
        self.description_file = description_file
        self.reader = CheckpointReader(self.path, weights_name=SINGLE_WEIGHTS_FILE)
        self.dtype = dtype
        self.rotation = self._rotation()

    def _rotation(self) -> Optional[torch.Tensor]:
        """The QuaRot rotation the description points to (a file inside the checkpoint), or None."""
        import torch

        from dist_quant.checkpoint.reader import CheckpointReader

        rotation_map = self.description
        for field_name in ("optional", "quarot", "rotation_map"):
            rotation_map = rotation_map.get(field_name, {}) if isinstance(rotation_map, dict) else None
        if not isinstance(rotation_map, dict) or "global_rotation" not in rotation_map:
            if rotation_map is None:
                raise CheckpointError(f"{self.description_file}: optional.quarot.rotation_map is not an object; "
                                      "restore the file")
            return None
        name = rotation_map["global_rotation"]
        if not isinstance(name, str):
            raise CheckpointError(f"{self.description_file}: optional.quarot.rotation_map.global_rotation is not a "
                                  "file name; restore the file")
        path = model_file(self.path, name, str(self.description_file))
        with CheckpointReader(path.parent, weights_name=path.name, config={}) as reader:  # checked like weights
            rotation = reader.get("global_rotation")
        if rotation.dim() != 2 or rotation.shape[0] != rotation.shape[1]:
            raise CheckpointError(f"{path}: global_rotation has shape {tuple(rotation.shape)}, not a square matrix; "
                                  "restore the file")
        return rotation.to(torch.float64)

    def float_tensor(self, key: str, shape: Optional[tuple[int, ...]] = None) -> torch.Tensor:
        return self.reader.get(key, dtype=self.dtype, shape=shape)

    def roles(self, name: str, quant_type: str) -> dict[str, torch.Tensor]:
        """The stored tensors of the linear ``name`` by role, float ones (a FLOAT weight, a bias) in the evaluation
        dtype, every role its type needs present."""
        from dist_quant.schemes import FLOAT

        present = [r for r in ("weight", *role_suffixes()) if f"{name}.{r}" in self.reader]
        missing = [f"{name}.{r}" for r in ("weight", *needed_roles(quant_type)) if r not in present]
        if missing:
            raise CheckpointError(f"{self.path} has no tensor {missing[0]}, which its {quant_type} linear {name} "
                                  "needs; the checkpoint is incomplete: quantize again")
        roles = {}
        for role in present:
            key = f"{name}.{role}"
            roles[role] = self.float_tensor(key) if quant_type == FLOAT or role == "bias" else self.reader.get(key)
        return roles

    def linear(self, name: str) -> nn.Module:
        """The module vLLM Ascend would build for the linear ``name``, by its type in the description."""
        from dist_quant.checkpoint.formats.ascendv1_encoding import ENCODINGS

        quant_type = self.description.get(f"{name}.weight")
        if quant_type is None:
            raise CheckpointError(f"{self.path / DESCRIPTION_FILE} has no entry for {name}.weight")
        if quant_type not in ENCODINGS:
            raise CheckpointError(f"{self.path / DESCRIPTION_FILE} describes {name}.weight as {quant_type!r}, which "
                                  f"this version cannot serve (known: {list(ENCODINGS)})")
        return ENCODINGS[quant_type].serve(self.roles(name, quant_type))
