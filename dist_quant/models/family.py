"""What a model family module provides, and the table entries its outlier-suppression tables are made of.

A family is one module of dist_quant/models/ (today only qwen3_vl_moe.py), found by the config's ``model_type``
through ``family_for``. It owns the checkpoint's key names, the expert layout, the pieces' construction and forward,
the fused groups, the QuaRot and smoothing points (as the tables below), deepstack and parameter counts; the rest of
dist-quant reaches the model only through it. docs/ARCHITECTURE.md says what a second family adds.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from dist_quant.errors import CheckpointError

# model_type -> (module, name, sizes module: its config.json reading and parameter counts without torch)
FAMILIES = {"qwen3_vl_moe": ("dist_quant.models.qwen3_vl_moe", "Qwen3-VL-MoE", "dist_quant.models.qwen3_vl_moe_sizes")}


def _registered(model_type: object, source: str) -> tuple[str, str, str]:
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        shown = "missing" if model_type is None else (repr(model_type) if isinstance(model_type, str)
                                                      and len(model_type) < 80 else "not a model name")
        supported = ", ".join(f"{k!r} ({name})" for k, (_, name, _) in FAMILIES.items())
        raise CheckpointError(f"{source}: model_type is {shown}; dist-quant supports {supported} checkpoints")
    return FAMILIES[model_type]


def family_for(model_type: object, source: str = "config.json") -> ModuleType:
    """The family module of a config's ``model_type``."""
    return importlib.import_module(_registered(model_type, source)[0])


def sizes_for(model_type: object, source: str = "config.json") -> ModuleType:
    """The sizes module of a config's ``model_type``: key names, layer kinds and parameter counts without torch
    (the plan's), whose functions take the family's transformers config or the sizes module's own."""
    return importlib.import_module(_registered(model_type, source)[2])


def sizes_config_of(raw_config: object, source: str = "config.json"):
    """What ``dist-quant plan`` needs of a config.json's content, read and checked without torch."""
    if not isinstance(raw_config, dict):
        raise CheckpointError(f"{source} does not hold a JSON object; restore the file from the original model")
    return sizes_for(raw_config.get("model_type"), source).load_sizes_config(raw_config, source)


def family_of(raw_config: object, source: str = "config.json") -> ModuleType:
    """The family module of a config.json's content."""
    if not isinstance(raw_config, dict):
        raise CheckpointError(f"{source} does not hold a JSON object; restore the file from the original model")
    return family_for(raw_config.get("model_type"), source)


def load_checked(model_path: str | Path):
    """(family module, reader, config) of a float checkpoint, the config validated on its own and against the
    weights' headers by its family: what a driver needs before it plans anything."""
    from dist_quant.checkpoint.reader import read_config

    config_file = Path(model_path) / "config.json"
    family = family_of(read_config(config_file), str(config_file))
    return (family, *family.load_checked(model_path))


@dataclass(frozen=True)
class Readers:
    """Linears that read the residual stream through a norm: the norm's weight is fused in, then they are
    right-rotated and the norm becomes ones."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class Writer:
    """A linear that writes into the residual stream: left-rotated (bias included)."""

    linear: str


@dataclass(frozen=True)
class HeadPair:
    """Values rotated per head between a v projection and the o projection that reads them."""

    v: str
    o: str


@dataclass(frozen=True)
class Smoothing:
    """A smoothing subgraph: ``norm-linear`` (a norm and the linears it feeds), ``ov`` (v_proj into o_proj, per head)
    or ``up-down`` (a gated MLP's up into down). ``targets[0]`` is the linear whose input range sets the scales."""

    subgraph: str
    source: str  # the norm (norm-linear) or the first linear (ov, up-down)
    targets: tuple[str, ...]

    @property
    def first_linear(self) -> str:
        """What the recipe's include/exclude globs are matched against (msModelSlim: the subgraph's first linear)."""
        return self.targets[0] if self.subgraph == "norm-linear" else self.source
