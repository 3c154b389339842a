"""W4A8_DYNAMIC: int4 per-channel symmetric expert weights, int8 per-token symmetric activations computed at run time.

Routed experts only: vLLM Ascend has no W4A8 linear method on main. Its MoE method loads the codes packed two per
byte with the kernel's ``scale_bias`` (the ascendv1 format's encoding, docs/w4a8-loader-facts.md), which constrains
the shapes it takes (``check_shape``).

The weight scale is msModelSlim's "ssz" least-squares refinement by default (``method: ssz``, data-free), or plain
min/max (``method: minmax``); ``method: gptq`` keeps ssz's scale and rounds with GPTQ on the expert's routed
calibration inputs (what the ``--quant_type w4a8`` preset uses: docs/accuracy.md, "W4A8"). The engine computes
exactly dynamic W8A8 with the int4 codes as the weight (the kernel's split of the activations into int4 halves is
undone by ``scale_bias``; section 4.2).
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Optional

from dist_quant.algorithms.int4_params import QMAX4, QMIN4, SCALE_BIAS_CHUNKS, SSZ_ITERATIONS
from dist_quant.errors import RecipeError
from dist_quant.schemes.base import FLOAT32_MAX, LinearSpec, QSpec, QuantizedLinear, Scheme

if TYPE_CHECKING:
    import torch

    from dist_quant.algorithms.gptq import Hessian

NAME = "W4A8_DYNAMIC"
WEIGHT_METHODS = ("ssz", "minmax", "gptq")  # the qconfig weight methods that select it; ssz first: the default
EXT_KEYS = ("step", "group_size", "damp")  # msModelSlim's ssz iterations and group size (ignored); GPTQ's damping


MAX_STEP = 10_000  # ssz iterations: msModelSlim's default is 50, and each is a pass over the expert's weights


def check_ext(side: str, spec: QSpec) -> tuple[str, ...]:
    """``weight.ext.step``: ssz's iteration count (a positive int, msModelSlim's ``ext["step"]``). ``weight.ext.
    group_size``: taken and ignored, as msModelSlim's per-channel ssz does (its W4A8 recipe for Qwen3-30B-A3B writes
    64 under ``per_channel``): the checkpoint is per channel, ``group_size`` 0, because vLLM Ascend's main branch
    refuses per-group W4A8 MoE weights (docs/w4a8-loader-facts.md 1.2, 1.4). ``weight.ext.damp``: ``method:
    gptq``'s damping, a positive fraction of the Gram matrix's mean diagonal (default 0.01, algorithms/gptq.py)."""
    options = dict(spec.ext)
    if side == "act" and options:
        raise ValueError(f"W4A8_DYNAMIC's activations take no options, got {sorted(options)}")
    step = options.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= MAX_STEP):
        raise ValueError(f"step must be a whole number from 1 to {MAX_STEP} (ssz iterations), got {step!r}")
    warnings = []
    damp = options.get("damp")
    if damp is not None:
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < math.inf:
            raise ValueError(f"damp must be a positive number (GPTQ's damping, a fraction of the mean diagonal), "
                             f"got {damp!r}")
        if spec.method != "gptq":
            warnings.append(f"damp is GPTQ's option and is ignored by method {spec.method}")
    group = options.get("group_size")
    if group is not None:
        if isinstance(group, bool) or not isinstance(group, int) or group < 0:
            raise ValueError(f"group_size must be a non-negative integer, got {group!r}")
        if group:
            warnings.append(f"group_size {group} is ignored, as msModelSlim ignores it under scope per_channel: the "
                            "experts are quantized per channel (group_size 0), the only W4A8 layout vLLM Ascend's "
                            "main branch loads")
    return tuple(warnings)


PACKED_WORD = 8  # int4 codes per int32 word: vLLM Ascend views the packed weight as int32 along the output dimension


def check_shape(name: str, shape: tuple[int, ...], input_split: bool) -> Optional[str]:
    """Why a [out, in] expert projection cannot be written or loaded as W4A8_DYNAMIC, or None. The output
    dimension holds two codes per byte (pack_int4_rows), and vLLM Ascend's loader views the packed codes as int32
    along it (docs/w4a8-loader-facts.md 1.3 and 1.5: ``H % 8`` for down_proj, ``I_p % 4`` packed rows per rank for
    gate/up): a multiple of 8. A linear whose input the engine splits across ranks (down_proj) has one scale_bias
    sum per 16th of its input: a multiple of 16."""
    out, inputs = shape[0], shape[-1]
    if out % PACKED_WORD:
        return (f"{name} {list(shape)}: W4A8_DYNAMIC needs an output size that is a multiple of {PACKED_WORD} (int4 "
                f"codes packed two per byte, loaded as int32 words), got {out}")
    if input_split and inputs % SCALE_BIAS_CHUNKS:
        return (f"{name} {list(shape)}: W4A8_DYNAMIC needs an input size that is a multiple of {SCALE_BIAS_CHUNKS} "
                f"for a row-parallel linear (scale_bias holds one sum per 16th of the input), got {inputs}")
    return None


def weight_limit(inputs: int) -> float:
    """The largest ``max |W|`` whose int4 math stays finite in float32 for a linear of ``inputs`` input channels.
    Every scale the scheme makes (min/max, ssz's least squares ``sum W q / sum q^2``) is at most ``max |W|``
    (``|q| >= 1`` where ``q != 0``) and codes are in [-8, 7], so a residual ``W - q s`` is at most ``9 max |W|`` and
    ssz's ``sum_k r_k^2`` at most ``81 in max|W|^2``: the binding sum (``sum W q`` and scale_bias's ``8 s sum q``, at
    most ``64 in max |W|``, are smaller below this limit). Beyond it ssz would compare Inf errors and silently keep the
    min/max scale."""
    return math.sqrt(FLOAT32_MAX / (81 * inputs))


def needs_hessian(weight: Optional[QSpec]) -> bool:
    """``method: gptq`` rounds with the expert's routed calibration inputs."""
    return weight is not None and weight.method == "gptq"


def prepare_hessian(hessian: Hessian, weight: Optional[QSpec]) -> None:
    """GPTQ's factorisation for the damping ``quantize`` will ask for, kept in ``hessian``. A Gram matrix that
    cannot be factored is left for ``quantize``, which refuses it naming the linear and ``weight.ext.damp``."""
    from dist_quant.algorithms.gptq import DAMP, NotPositiveDefinite

    if needs_hessian(weight):
        with contextlib.suppress(NotPositiveDefinite):
            hessian.prepared(weight.option("damp", DAMP))


def weight_scale(weight: torch.Tensor, spec: Optional[QSpec]) -> torch.Tensor:
    """The per-channel int4 scale by the qconfig's weight ``method``. On fake tensors (the writer's layout pass) the
    refinement, whose stopping test needs values, is skipped: its result has the min/max scale's shape and dtype."""
    from torch._subclasses.fake_tensor import is_fake

    from dist_quant.algorithms.int4 import minmax_scale, ssz_scale

    method = spec.method if spec is not None else WEIGHT_METHODS[0]
    if method == "minmax" or is_fake(weight):  # gptq: ssz's scales, then GPTQ's rounding
        return minmax_scale(weight)
    return ssz_scale(weight, spec.option("step", SSZ_ITERATIONS) if spec is not None else SSZ_ITERATIONS)


def quantize(weight: torch.Tensor, bias: Optional[torch.Tensor], spec: LinearSpec) -> QuantizedLinear:
    """Codes in [-8, 7] (int8 [out, in], one per byte) and their scale float32 [out]."""
    from torch._subclasses.fake_tensor import is_fake

    from dist_quant.algorithms.gptq import DAMP, NotPositiveDefinite, gptq_codes
    from dist_quant.algorithms.int4 import int4_codes
    from dist_quant.schemes.tensors import check_finite_inputs, check_weight

    if bias is not None:
        raise ValueError(f"{spec.name}: W4A8_DYNAMIC is for routed experts, which have no bias")
    problem = check_shape(spec.name, tuple(weight.shape), spec.input_split)
    if problem:
        raise RecipeError(f"{problem}; leave these experts out of that linear_quant (W8A8_DYNAMIC has no such rule)")
    check_weight(spec, weight, NAME, weight_limit(weight.shape[1]), "ssz's float32 sums of squared errors")
    gptq = needs_hessian(spec.weight) and spec.hessian is not None and not is_fake(weight)
    if gptq:
        check_finite_inputs(spec, "the Gram matrix of its calibration inputs", spec.hessian.gram)
    scale = weight_scale(weight, spec.weight)
    if gptq:
        damp = spec.weight.option("damp", DAMP)
        try:
            codes = gptq_codes(weight, scale, spec.hessian, QMIN4, QMAX4, damp=damp)
        except NotPositiveDefinite as error:
            raise RecipeError(f"linear {spec.name}: GPTQ cannot round it: {error}; raise weight.ext.damp (now "
                              f"{damp:g}; default {DAMP:g})") from None
    else:  # also gptq for an expert without calibration tokens: plain rounding
        codes = int4_codes(weight, scale)
    return QuantizedLinear(codes, scale)


SCHEME = Scheme(NAME, act=QSpec("per_token", "int8", True, "minmax"),
                weight=QSpec("per_channel", "int4", True, WEIGHT_METHODS[0]), needs_input_range=False, weight_bits=4,
                serves_experts=True, quantize=quantize, weight_methods=WEIGHT_METHODS[1:], serves_linears=False,
                ext_keys=EXT_KEYS, check_ext=check_ext,
                needs_hessian=needs_hessian, prepare_hessian=prepare_hessian, check_shape=check_shape)
