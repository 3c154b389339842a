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

from dist_quant.checkpoint.formats import compressed_tensors, drop_config_keys, hub_part_names
from dist_quant.checkpoint.model_folder import JSON_FILE_ERRORS, load_json_file, model_file
from dist_quant.errors import CheckpointError, reason

if TYPE_CHECKING:  # light to import (as `dist-quant check` needs its formats): torch and the schemes where they work
    import torch
    from torch import nn

NAME = "ascendv1"
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

def float32_bits_as_int64(values: torch.Tensor) -> torch.Tensor:
    """The float32 bit pattern of ``values`` widened to int64: how ``deq_scale`` is stored for models not in bf16."""
    import torch

    return values.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)


def deq_scale_values(deq_scale: torch.Tensor) -> torch.Tensor:
    """Undo the int64 storage of ``deq_scale`` (models not in bfloat16)."""
    import torch

    if deq_scale.dtype == torch.int64:
        return deq_scale.to(torch.int32).view(torch.float32)
    return deq_scale.to(torch.float32)


def linear_entries(name: str, quant_type: str, roles: dict[str, torch.Tensor],
                   model_dtype: torch.dtype) -> list[tuple[str, torch.Tensor, str]]:
    """(key, tensor, described type) of each role of the linear ``name``, in the scheme's order."""
    import torch

    from dist_quant.schemes import FLOAT

    entries = []
    for role, tensor in roles.items():
        if role == "deq_scale" and model_dtype != torch.bfloat16:
            tensor = float32_bits_as_int64(tensor)
        entries.append((f"{name}.{role}", tensor, FLOAT if role == "bias" else quant_type))
    return entries


def model_quant_type(types: Iterable[str]) -> str:
    """The description's model_quant_type: the present scheme of highest priority (FLOAT < W8A8_DYNAMIC < W8A8)."""
    from dist_quant.schemes import highest

    return highest(types)


def description(types: dict[str, str], optional: Optional[dict]) -> dict:
    """The description's content: each tensor's type, then the top-level fields in msModelSlim's order. Its saver
    writes ``optional`` always since 2026-03 (f200bca): ``{}`` unless a side file such as QuaRot's rotation fills it
    (vLLM Ascend reads ``optional.quarot.rotation_map`` only for an Eagle3 draft model, and tolerates its absence)."""
    return {**types, "version": "1.0.0", "model_quant_type": model_quant_type(types.values()), "metadata": {},
            "group_size": 0, "optional": {} if optional is None else optional}


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
    """Every role a linear of any scheme may carry besides its weight."""
    from dist_quant.schemes import SCHEMES

    return tuple(dict.fromkeys(r for s in SCHEMES.values() for r in (*s.roles, "bias") if r != "weight"))


def needed_roles(quant_type: Optional[str]) -> tuple[str, ...]:
    """The roles besides its weight a linear of that type must have to be served (none for an unknown type)."""
    from dist_quant.schemes import SCHEMES

    roles = SCHEMES[quant_type].roles if quant_type in SCHEMES else ()
    return tuple(r for r in roles if r != "weight")


class Checkpoint:
    """An ascendv1 checkpoint read back: its description, tensors, rotation, and each linear as the engine runs it."""

    def __init__(self, path: str | Path, dtype: torch.dtype):
        from dist_quant.checkpoint.reader import CheckpointReader

        self.path = Path(path)
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
        """The roles of the linear ``name`` as the engine holds them: deq_scale decoded, float tensors in the
        evaluation dtype, every role the scheme needs present."""
        from dist_quant.schemes import FLOAT

        present = [r for r in ("weight", *role_suffixes()) if f"{name}.{r}" in self.reader]
        missing = [f"{name}.{r}" for r in ("weight", *needed_roles(quant_type)) if r not in present]
        if missing:
            raise CheckpointError(f"{self.path} has no tensor {missing[0]}, which its {quant_type} linear {name} "
                                  "needs; the checkpoint is incomplete: quantize again")
        roles = {}
        for role in present:
            key = f"{name}.{role}"
            if quant_type == FLOAT or role == "bias":
                roles[role] = self.float_tensor(key)
            elif role == "deq_scale":
                roles[role] = deq_scale_values(self.reader.get(key))
            else:
                roles[role] = self.reader.get(key)
        return roles

    def linear(self, name: str) -> nn.Module:
        """The module vLLM Ascend would build for the linear ``name``, by its type in the description."""
        from dist_quant import schemes

        quant_type = self.description.get(f"{name}.weight")
        if quant_type is None:
            raise CheckpointError(f"{self.path / DESCRIPTION_FILE} has no entry for {name}.weight")
        if quant_type not in schemes.SCHEMES:
            raise CheckpointError(f"{self.path / DESCRIPTION_FILE} describes {name}.weight as {quant_type!r}, which "
                                  f"this version cannot serve (known: {list(schemes.SCHEMES)})")
        return schemes.get(quant_type).serve(self.roles(name, quant_type))
