"""What a model family provides (the :class:`FamilySizes` and :class:`Family` protocols), its registration, and
the table entries its outlier-suppression tables are made of.

A family is a module of dist_quant/models/ (with a torch-free companion for its sizes), found by the config's
``model_type`` through ``family_for``. It owns the checkpoint's key names, the expert layout, the pieces'
construction and forward, the fused groups, the QuaRot and smoothing points (as the tables below), the calibration
input it reads and the parameter counts; the rest of dist-quant reaches the model only through these protocols and
names no family (tests/test_family_protocol.py checks both). docs/ARCHITECTURE.md says how to add one.

Configs: the sizes module's config and the family's transformers config both answer ``get_text_config()`` (the
decoder's fields: the config itself for a text-only model), which is how code outside models/ reads them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional, Protocol

from dist_quant.errors import CheckpointError

# model_type -> (family module, name for people, sizes module: its config.json reading and counts without torch)
FAMILIES = {
    "qwen3_vl_moe": ("dist_quant.models.qwen3_vl_moe", "Qwen3-VL-MoE", "dist_quant.models.qwen3_vl_moe_sizes"),
    "qwen3_moe": ("dist_quant.models.qwen3_moe", "Qwen3-MoE", "dist_quant.models.qwen3_moe_sizes"),
    "qwen3_5_moe": ("dist_quant.models.qwen3_5_moe", "Qwen3.5-MoE", "dist_quant.models.qwen3_5_moe_sizes"),
}

IMAGE_AND_TEXT, TEXT_ONLY = "image+text", "text"  # what a family's calibration samples hold (FamilySizes.CALIBRATION)


class FamilySizes(Protocol):
    """The torch-free half of a family (``dist-quant plan`` and ``check`` import no torch): key names, which unit
    kinds the plan has, counts and shapes in closed form over a config read from config.json alone."""

    MODEL_TYPE: str  # config.json's model_type
    NAME: str  # for people: "Qwen3-VL-MoE"
    # the plan's unit kinds this family has, in plan order (runtime.plan.Kind values): "images" and "vision" (a
    # vision tower, run on the images, then quantized) only for a family with one; "embed", "layer", "experts", "head"
    UNIT_KINDS: tuple[str, ...]
    CALIBRATION: str  # IMAGE_AND_TEXT or TEXT_ONLY: what a calibration sample holds
    OUTLIER_SUPPRESSION: bool  # whether QuaRot and smoothing have points in its layers (else a recipe is refused)
    REPLICATED_LINEARS: tuple[str, ...]  # name suffixes of the linears vLLM replicates on every rank (the router)
    UNQUANTIZED_LINEARS: tuple[str, ...]  # name suffixes of the linears vLLM builds without a quant config: FLOAT
    EMBED_KEY: str
    NORM_KEY: str
    LM_HEAD_KEY: str
    VISUAL: Optional[str]  # the vision tower's module prefix; None without one
    EXPERT_PROJS: tuple[str, ...]  # an expert's linears, in the order read_experts returns their weights
    FUSED_GROUPS: tuple[tuple[str, ...], ...]  # module-name suffixes vLLM loads as one parameter (one quant type)
    SERVED_PREFIXES: tuple[tuple[str, str], ...]  # (checkpoint key prefix, the name vLLM's model gives it)
    TOKEN_FIELDS: tuple[str, ...]  # config.json's special token ids the model code reads

    def load_sizes_config(self, raw: dict, source: str = ...) -> Any: ...  # refused where the plan cannot use it
    def load_checked_sizes(self, raw: dict, source: str = ...) -> Any: ...  # and where the model code cannot
    def source_dtype_name(self, raw_config: dict) -> str: ...
    def source_bytes(self, raw_config: dict) -> int: ...
    def layer_prefix(self, layer_idx: int) -> str: ...
    def expert_key(self, layer_idx: int, expert: int, proj: str) -> str: ...  # the output's per-expert module
    def is_moe_layer(self, text_config, layer_idx: int) -> bool: ...
    def splits_input(self, name: str) -> bool: ...  # a row-parallel linear in vLLM
    def expected_tensors(self, config) -> dict[str, Optional[tuple[int, ...]]]: ...  # the source checkpoint's
    def expert_shapes(self, config) -> tuple[tuple[int, int], ...]: ...
    def vision_linears(self, config) -> dict[str, int]: ...  # {} without a vision tower
    def layer_linears(self, config, layer_idx: int) -> dict[str, int]: ...
    def expert_linears(self, config, layer_idx: int, first: int, stop: int) -> dict[str, int]: ...
    def vision_param_count(self, config) -> int: ...  # 0 without a vision tower
    def layer_param_count(self, config, layer_idx: int) -> int: ...
    def expert_param_count(self, config) -> int: ...
    def carried_param_count(self, config) -> int: ...  # the tensors the head unit carries unchanged (Family.carried)
    def tp_errors(self, config, tp: int) -> list[str]: ...  # what a tensor-parallel size does not divide


class Family(FamilySizes, Protocol):
    """The family module: its sizes (re-exported) plus the pieces the worker builds and runs, with transformers'
    own modules. ``read`` arguments are ``read(key, shape=None) -> tensor`` from the float checkpoint."""

    # --- config and weights
    def load_config(self, raw: dict, source: str = ...) -> Any: ...  # transformers' config, checked
    def load_checked(self, model_path) -> tuple[Any, Any]: ...  # (reader, config), config against the headers
    def read_experts(self, reader, config, layer_idx: int, first: int, stop: int, dtype) -> list[tuple]: ...
    def carried(self, reader, config) -> list: ...  # source tensors the head unit writes unchanged (Carried)
    # --- pieces
    def materialize(self, module, read: Callable, prefix: str, dtype) -> Any: ...
    def meta_layer(self, config, layer_idx: int) -> Any: ...  # a decoder layer without experts, on meta
    def build_layer(self, config, layer_idx: int, read: Callable, dtype) -> Any: ...
    def build_text_rotary(self, config) -> Any: ...
    def sample_context(self, config, rotary, inputs, vision, dtype, device) -> Any: ...
    # one calibration sample's positions and mask (``inputs``: calib.inputs.ModelInputs; ``vision``: its
    # VisionOutput, None without an image), on ``device``
    def place_images(self, config, embeds, input_ids, vision) -> Any: ...  # token embeddings with image features
    def layer_forward(self, block, hidden: list, contexts: list, moe: bool) -> tuple[list, Any]: ...
    def router_logits(self, block, x) -> Any: ...
    def route(self, router_logits, top_k: int, dtype) -> tuple[Any, Any]: ...
    def float_expert(self, gate, up, down, act_fn) -> Callable: ...
    def expert_group_forward(self, x, topk_ids, topk_weights, experts: list, first_expert: int) -> Any: ...
    def add_deepstack(self, hidden, ctx, layer_idx: int) -> Any: ...  # the identity without deepstack
    def activation(self, config) -> Callable: ...
    def rms_norm(self, hidden, weight, eps: float) -> Any: ...
    # --- outlier suppression (applied by models/outliers.py)
    LAYER_ROTATION: dict[str, tuple]  # layer kind -> QuaRot steps (Readers, Writer, HeadPair)
    LAYER_SMOOTHING: dict[str, tuple]  # layer kind -> Smoothing subgraphs
    EXPERT_READER_NORM: str  # the norm fused into every expert's gate/up
    def heads(self, text_config) -> tuple[int, int, int]: ...
    def layer_kind(self, text_config, layer_idx: int) -> str: ...  # a key of the tables above
    # --- dist-quant eval
    def config_differences(self, quantized, reference) -> list[str]: ...
    def served_shapes(self, config, reader) -> dict[str, tuple[int, ...]]: ...


class VisionFamily(Family, Protocol):
    """What a family with a vision tower (UNIT_KINDS has "images" and "vision") adds."""

    VISION_STREAM_WRITERS: tuple[str, ...]  # the tower's linears that write into the text stream (QuaRot)
    def build_vision(self, config, read: Callable, dtype, load: Optional[Callable] = None) -> Any: ...
    def vision_forward(self, visual, pixel_values, grid_thw) -> VisionOutput: ...
    def image_costs(self, inputs: list, config) -> list[int]: ...  # the tower's work per sample (0: no image)


@dataclass
class VisionOutput:
    """What a vision tower gives one sample's text stream (``VisionFamily.vision_forward``): its image features,
    placed at the image tokens (``Family.place_images``), and the features added to the stream after the first
    layers (Qwen3-VL's deepstack; empty where a family has none). Saved for --resume as these tensors."""

    image_embeds: Any
    deepstack: list


def has_vision(family) -> bool:
    """Whether the family's plan has the vision units (and its module the VisionFamily pieces)."""
    return "vision" in family.UNIT_KINDS


def reads_images(family) -> bool:
    """Whether the family's calibration samples hold images (else text only)."""
    return family.CALIBRATION == IMAGE_AND_TEXT


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
