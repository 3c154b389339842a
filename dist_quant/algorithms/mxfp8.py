"""MXFP8 (OCP microscaling FP8) weights for W8A8_MXFP8: E4M3 elements sharing one E8M0 power-of-two scale per block
of 32 along the last (input) dimension, computed exactly as msModelSlim 26.1 does (``mx_quantization.py``:
``calculate_mx_qparam``, ``mxfp_per_block_quantize``; ``ascendv1.py``: ``on_w8a8_mx_dynamic_per_block``).

msModelSlim rounds by hand in float32 rather than through a torch fp8 cast, and its hand rounding differs from the
cast: ties go away from zero (the cast rounds them to even). The operations below are msModelSlim's, in its order, so
that its float32 intermediate roundings (and with them the rare values that land differently) are reproduced too.
A checkpoint stores the elements as float8_e4m3fn [out, in] and the scale as uint8 [out, ceil(in/32)], the byte
being the block's exponent + 127 (vLLM Ascend reads it as ``float8_e8m0fnu``). A last partial block (``in % 32``)
counts as zero-padded. Every function also takes leading dimensions before ``[out, in]`` (stacked experts).

Checked bit for bit against msModelSlim 26.1's own quantizer (run once on random bf16 and float32 weights, partial
blocks included). Not on float16: msModelSlim forms 2^e in the weight's dtype, which in float16 underflows below
2^-24 (here it is float32).
"""

from __future__ import annotations

import torch

BLOCK = 32  # elements per shared scale, along the input dimension
E4M3_MAX = 448.0  # largest finite E4M3 value, 2^8 * 1.75; larger magnitudes saturate to it
E4M3_EMAX = 8  # exponent of E4M3's largest binade: a block's amax lands in [2^8, 2^9) after scaling
E4M3_MANTISSA_BITS = 3
E4M3_MIN_EXP = -6  # exponent of E4M3's smallest normal; below it the grid is the subnormal one, 2^-9 apart
E8M0_BIAS = 127  # scale byte = shared exponent + 127; also the lowest exponent kept (byte 0)
E8M0_NAN = 255  # the one E8M0 byte that is not a power of two


def _pad_to_blocks(t: torch.Tensor) -> torch.Tensor:
    """``[..., in] -> [..., ceil(in/32), 32]``, the last block zero-padded (msModelSlim's ``reshape_to_blocks``)."""
    pad = -t.shape[-1] % BLOCK
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.reshape(*t.shape[:-1], t.shape[-1] // BLOCK, BLOCK)


def _per_element(blocks: torch.Tensor, inputs: int) -> torch.Tensor:
    """A per-block tensor ``[..., ceil(in/32)]`` repeated over its block's elements: ``[..., in]``."""
    return blocks.repeat_interleave(BLOCK, dim=-1)[..., :inputs]


def shared_exponents(weight: torch.Tensor) -> torch.Tensor:
    """Per block ``floor(log2(max|w|)) - 8``, at least -127: int32 [..., out, ceil(in/32)].

    The 8 puts a block's largest magnitude in E4M3's top binade [256, 512), so values above 448 saturate. An all-zero
    block gets -127 (byte 0): log2(0) = -inf clamps there, as msModelSlim's stand-in amax 2^-126 (-134) does.
    msModelSlim's upper clamp (above 127 becomes NaN) cannot fire on finite weights: float32 stays below 2^128, so the
    exponent is at most 128 - 8 = 120. Non-finite weights are refused.

    Like msModelSlim, the amax and its log2 are computed in the weight's own dtype (neither its observer nor
    ``calculate_mx_qparam`` upcasts), and log2 is rounded to that dtype: a value just below a power of two counts as
    that power. In float32 that is a few values per binade; in bf16 an amax with a mantissa near 2 (1.984375 * 2^-5;
    0.7% of the blocks of N(0, 0.02) weights) gets the next exponent up: one bit less precision, never a saturation."""
    amax = _pad_to_blocks(weight).abs().amax(dim=-1)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("MXFP8 quantization got a weight with Inf or NaN values; check the checkpoint or the "
                         "transforms applied before quantization")
    exponent = torch.floor(torch.log2(amax)) - E4M3_EMAX
    return exponent.clamp(min=-E8M0_BIAS).to(torch.int32)


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Float32 ``x`` rounded to the E4M3 grid, ties away from zero, saturated to ±448: msModelSlim's ``_quant`` and
    ``_clamp_out``. The grid step is 2^(floor(log2|x|) - 3), the exponent clipped at -6 below (subnormals)."""
    private_exp = torch.floor(torch.log2(x.abs() + (x == 0).to(x.dtype))).clamp(min=E4M3_MIN_EXP)
    step = torch.exp2(private_exp)
    units = x / step * 2**E4M3_MANTISSA_BITS
    units = torch.sign(units) * torch.floor(units.abs() + 0.5)
    return (units / 2**E4M3_MANTISSA_BITS * step).clamp(-E4M3_MAX, E4M3_MAX)


def quantize_mxfp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8 elements and scale bytes of a weight, as msModelSlim saves them: ``(float8_e4m3fn [..., out, in],
    uint8 [..., out, ceil(in/32)])``. The elements are ``w / 2^e`` rounded by ``round_to_e4m3`` in float32, whatever
    the weight's dtype, so the float8 cast is exact; the scale byte is ``e + 127``."""
    exponent = shared_exponents(weight)
    w = weight.to(torch.float32)
    divisor = _per_element(torch.exp2(exponent.to(torch.float32)), w.shape[-1])
    scaled = torch.where(w == 0, torch.zeros_like(w), w / divisor)
    elements = round_to_e4m3(scaled).to(torch.float8_e4m3fn)
    return elements, (exponent + E8M0_BIAS).to(torch.uint8)


def dequantize_mxfp8(elements: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``element * 2^(byte - 127)`` per block: float32 [..., out, in]. Byte 255 (E8M0's NaN) gives NaN. Plain
    arithmetic on the uint8 scale, so it runs on torch without ``float8_e8m0fnu`` (before 2.7)."""
    exponent = scale.to(torch.float32) - E8M0_BIAS
    factor = torch.where(scale == E8M0_NAN, torch.full_like(exponent, float("nan")), torch.exp2(exponent))
    return elements.to(torch.float32) * _per_element(factor, elements.shape[-1])


def scale_bytes(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales (float32, 2^-127 to 2^127) as their E8M0 bytes ``exponent + 127``: uint8 of the same shape.
    Exact (``frexp`` of a power of two is 0.5 * 2^(e + 1), subnormal 2^-127 included); ValueError for a scale that is
    not a power of two (a zero, a rounded or a non-finite one)."""
    mantissa, exponent = torch.frexp(scale)
    if not bool((mantissa == 0.5).all()):
        raise ValueError("MXFP8 scales must be powers of two (a zero, rounded or non-finite scale has no E8M0 byte)")
    return (exponent - 1 + E8M0_BIAS).to(torch.uint8)


def quantize_mxfp8_activations(x: torch.Tensor) -> torch.Tensor:
    """Activations through MXFP8 and back (fake quantization), float32 of ``x``'s shape, blocks of 32 along the last
    dimension: emulates vLLM Ascend's ``npu_dynamic_mx_quant(..., scale_alg=0)`` (floor exponent of the block amax) in
    evaluation. The exponent is taken from float32 values whatever ``x``'s dtype, as a kernel reading exponent bits
    would (no bf16 log2). The kernel's rounding of the elements (to nearest even, or ties away as here) is not
    documented; this uses the weights' rounding."""
    return dequantize_mxfp8(*quantize_mxfp8(x.to(torch.float32)))


__all__ = ["BLOCK", "E4M3_EMAX", "E4M3_MAX", "E8M0_BIAS", "dequantize_mxfp8", "quantize_mxfp8",
           "quantize_mxfp8_activations", "round_to_e4m3", "scale_bytes", "shared_exponents"]
