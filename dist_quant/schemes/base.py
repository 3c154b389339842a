"""What a quant scheme is: the recipe qconfig that selects it, how it quantizes one linear, what it costs in bytes,
and how the serving engine computes with its tensors.

A scheme speaks in *roles* (``weight``, ``weight_scale``, ``input_scale``...): the tensors of one linear as the
serving engine's method holds them after loading, in plain dtypes. An output format (checkpoint/formats/) turns the
roles into file keys, description entries and dtype encodings.

What a scheme declares (names, qconfigs, bits, options) is read without torch: ``dist-quant plan`` and the recipe
need only that. The tensor work is in each scheme's ``quantize`` and ``serve``, which import torch when called, and
in schemes/tensors.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dist_quant.algorithms.gptq import Hessian

InputRange = tuple[float, float]  # (min, max) of a linear's calibration input
FLOAT32_MAX = (2 - 2**-23) * 2**127  # torch.finfo(torch.float32).max: the schemes compute in float32


def _float32() -> torch.dtype:
    import torch

    return torch.float32


@dataclass(frozen=True)
class QSpec:
    """How one side (activations or weights) of a linear is quantized: a recipe's ``qconfig.act`` / ``.weight``."""

    scope: str
    dtype: str
    symmetric: bool
    method: str
    ext: tuple[tuple[str, object], ...] = ()  # the qconfig's ``ext`` options (e.g. msModelSlim's group_size), sorted

    def option(self, key: str, default=None):
        return dict(self.ext).get(key, default)

    def core(self) -> "QSpec":
        """The spec without its options: what a scheme is selected by."""
        return QSpec(self.scope, self.dtype, self.symmetric, self.method)


@dataclass(frozen=True)
class LinearSpec:
    """What a scheme is told about the linear it quantizes."""

    name: str = "linear"  # the module name, as the recipe's globs see it
    act: Optional[QSpec] = None  # the recipe's qconfig for it (None for FLOAT)
    weight: Optional[QSpec] = None
    input_range: Optional[InputRange] = None  # its calibrated input (min, max), for schemes that need one
    model_dtype: torch.dtype = field(default_factory=_float32)  # the source checkpoint's float dtype
    input_split: bool = False  # the engine splits its input dimension across tensor-parallel ranks (o, down...)
    hessian: Optional[Hessian] = None  # X^T X of its calibration inputs (algorithms/gptq.py), when asked for


@dataclass(frozen=True)
class Scheme:
    """One quant type. ``quantize(weight, bias, spec)`` returns its roles in the order they are written;
    ``serve(roles)`` is the module the serving engine would run."""

    name: str  # the description's quant type
    act: Optional[QSpec]  # the recipe qconfig that selects the scheme (None: not selectable, the default)
    weight: Optional[QSpec]
    needs_input_range: bool  # quantizing needs the linear's calibrated input range
    weight_bits: Optional[int]  # None: the weight stays in the source dtype
    serves_experts: bool  # the serving engine has a MoE method for it
    priority: int  # the description's model_quant_type is the present scheme of highest priority
    roles: tuple[str, ...]  # what ``quantize`` emits besides an optional "bias"; serving needs all of them
    quantize: Callable[[torch.Tensor, Optional[torch.Tensor], LinearSpec], dict[str, torch.Tensor]]
    serve: Callable[[dict[str, torch.Tensor]], nn.Module]
    summary: str  # one line for error messages and docs
    ext_keys: tuple[str, ...] = ()  # the qconfig ``ext`` options the scheme understands (others are refused)
    # checks the values of a qconfig side's options: ``check_ext(side, spec)`` raises ValueError for a bad one and
    # returns warnings (e.g. an option the scheme accepts for msModelSlim's recipes but ignores)
    check_ext: Callable[[str, "QSpec"], tuple[str, ...]] = lambda side, spec: ()
    # whether quantizing with this weight qconfig needs the Gram matrix of the linear's inputs (LinearSpec.hessian)
    needs_hessian: Callable[[Optional["QSpec"]], bool] = lambda weight: False
    weight_methods: tuple[str, ...] = ()  # more weight ``method``s that select it (``quantize`` reads spec.weight)
    serves_linears: bool = True  # the serving engine has a method for it outside the routed experts
    weight_packing: int = 1  # output channels per stored row of ``weight`` (2 for int4 codes packed in int8)
    # why a linear of this [out, in] shape cannot be stored or loaded with the scheme, or None: ``check_shape(name,
    # shape, input_split)`` (input_split: LinearSpec.input_split), for refusing a recipe before any unit runs
    check_shape: Callable[[str, tuple[int, ...], bool], Optional[str]] = lambda name, shape, input_split: None

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape ``weight`` is stored in, for a linear whose float weight has ``shape`` [out, in]."""
        return (shape[0] // self.weight_packing, *shape[1:])

    def selected_by(self, act: "QSpec", weight: "QSpec") -> bool:
        """Whether a recipe qconfig (its options aside) selects this scheme."""
        if self.act is None or act.core() != self.act:
            return False
        return any(weight.core() == replace(self.weight, method=m) for m in (self.weight.method, *self.weight_methods))

    def bytes_per_param(self, source_bytes: int) -> float:
        """Bytes a weight parameter takes in the checkpoint (scales are negligible)."""
        return source_bytes if self.weight_bits is None else self.weight_bits / 8
