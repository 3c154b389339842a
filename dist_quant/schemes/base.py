"""What a quant scheme is: the recipe qconfig that selects it, how it quantizes one linear, and what it costs in
bytes.

A scheme says what it made of a linear, in no file's spelling: a :class:`QuantizedLinear` (the codes, their scales
and zero points, the group size, a static activation scale and offset, the bias). Its qconfig sides (``act``,
``weight``: scope, element type, symmetry) say what the codes and scales mean. An output format
(checkpoint/formats/) derives its encoding from both: file keys, description entries, dtypes, packing, fused
scales, and the serving engine's math on them.

What a scheme declares (names, qconfigs, bits, options) is read without torch: ``dist-quant plan`` and the recipe
need only that. The tensor work is in each scheme's ``quantize``, which imports torch when called, and in
schemes/tensors.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    import torch

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


# msModelSlim's qconfig ``act`` where a recipe leaves it out (core/quantizer/linear.py): activations not quantized
UNQUANTIZED_ACT = QSpec("per_tensor", "float", True, "none")


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
class QuantizedLinear:
    """What a scheme made of one linear [out, in]; None where the scheme has no such part.

    The weight is ``scale * (codes - zero_point)`` per output channel, or per ``group_size`` consecutive inputs when
    ``group_size`` is not 0 (scales [out, ceil(in / group_size)]). Codes are integers in an integer dtype (int4 ones
    unpacked, one per int8) or elements of a float dtype (float8). A scheme that does not quantize (FLOAT) leaves
    its weight in ``codes``, in the source dtype, without a scale. A static activation quantization (per tensor)
    is ``input_scale`` and ``input_offset`` ([1] each: ``x_q = round(x / input_scale) + input_offset``); dynamic
    ones are computed by the engine at run time and have nothing here."""

    codes: torch.Tensor
    scale: Optional[torch.Tensor] = None  # float32 [out] per channel, [out, groups] per group
    zero_point: Optional[torch.Tensor] = None  # None: symmetric
    group_size: int = 0  # inputs per scale (0: one scale per output channel)
    input_scale: Optional[torch.Tensor] = None
    input_offset: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None  # float, as the linear had it

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "QuantizedLinear":
        """The same linear with ``fn`` applied to each of its tensors (e.g. to bring them to the host)."""
        return replace(self, **{f: fn(t) for f, t in self.tensors().items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f) for f in ("codes", "scale", "zero_point", "input_scale", "input_offset", "bias")
                if getattr(self, f) is not None}


@dataclass(frozen=True)
class Scheme:
    """One quant type. ``quantize(weight, bias, spec)`` returns what it made of the linear (:class:`QuantizedLinear`);
    an output format encodes that as its engine loads it."""

    name: str  # the description's quant type
    act: Optional[QSpec]  # the recipe qconfig that selects the scheme (None: not selectable, the default)
    weight: Optional[QSpec]
    needs_input_range: bool  # quantizing needs the linear's calibrated input range
    weight_bits: Optional[int]  # None: the weight stays in the source dtype
    serves_experts: bool  # the serving engine has a MoE method for it
    quantize: Callable[[torch.Tensor, Optional[torch.Tensor], LinearSpec], QuantizedLinear]
    ext_keys: tuple[str, ...] = ()  # the qconfig ``ext`` options the scheme understands (others are refused)
    # checks the values of a qconfig side's options: ``check_ext(side, spec)`` raises ValueError for a bad one and
    # returns warnings (e.g. an option the scheme accepts for msModelSlim's recipes but ignores)
    check_ext: Callable[[str, "QSpec"], tuple[str, ...]] = lambda side, spec: ()
    # whether quantizing with this weight qconfig needs the Gram matrix of the linear's inputs (LinearSpec.hessian)
    needs_hessian: Callable[[Optional["QSpec"]], bool] = lambda weight: False
    # the work on a linear's Gram matrix alone that ``quantize`` would start with (GPTQ's factorisation), done
    # ahead, possibly in another thread, and kept in the Hessian: ``prepare_hessian(hessian, weight)``. A failure is
    # left for ``quantize``, which names the linear
    prepare_hessian: Callable[["Hessian", Optional["QSpec"]], None] = lambda hessian, weight: None
    weight_methods: tuple[str, ...] = ()  # more weight ``method``s that select it (``quantize`` reads spec.weight)
    serves_linears: bool = True  # the serving engine has a method for it outside the routed experts
    # why a linear of this [out, in] shape cannot be stored or loaded with the scheme, or None: ``check_shape(name,
    # shape, input_split)`` (input_split: LinearSpec.input_split), for refusing a recipe before any unit runs
    check_shape: Callable[[str, tuple[int, ...], bool], Optional[str]] = lambda name, shape, input_split: None

    def selected_by(self, act: "QSpec", weight: "QSpec") -> bool:
        """Whether a recipe qconfig (its options aside) selects this scheme."""
        return self.act is not None and act.core() == self.act and self.takes_weight(weight)

    def takes_weight(self, weight: "QSpec") -> bool:
        """Whether a recipe qconfig's weight side (its options aside) is one this scheme takes."""
        return self.weight is not None and any(weight.core() == replace(self.weight, method=m)
                                               for m in (self.weight.method, *self.weight_methods))

    def bytes_per_param(self, source_bytes: int) -> float:
        """Bytes a weight parameter takes in the checkpoint (scales are negligible)."""
        return source_bytes if self.weight_bits is None else self.weight_bits / 8
