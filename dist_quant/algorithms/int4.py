"""Int4 weights for W4A8_DYNAMIC experts: the scale (min/max, or msModelSlim's "ssz" least-squares refinement), the
codes, the packing vLLM Ascend loads, and the kernel's ``scale_bias`` (docs/w4a8-loader-facts.md, sections 1.6, 1.7,
3.1 and 4).

Everything here is a pure function over tensors, computed in float32. Codes are in [-8, 7] (the asymmetric clamp of
msModelSlim's ``int_quantize``); scales are per output channel, never 0 (an all-zero channel keeps float32 eps, as
msModelSlim does).
"""

from __future__ import annotations

import torch

from dist_quant.algorithms.int4_params import QMAX4, QMIN4, SCALE_BIAS_CHUNKS, SSZ_ITERATIONS

EPS = torch.finfo(torch.float32).eps  # msModelSlim's floor for a min/max scale


def minmax_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel ``max(-min(W, 0), max(W, 0)) / 7``, at least float32 eps: float32 [out]."""
    w = weight.to(torch.float32)
    absmax = torch.maximum(w.amax(dim=1).clamp(min=0), -w.amin(dim=1).clamp(max=0))
    return (absmax / QMAX4).clamp(min=EPS)


def int4_codes(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(round(W / s), -8, 7)`` per output channel (round half to even), as int8 [out, in]."""
    return weight.to(torch.float32).div(scale[:, None]).round_().clamp_(QMIN4, QMAX4).to(torch.int8)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_k a[n, k] b[n, k]`` per row, without a product tensor (2.2x faster than einsum's batched dot at
    1536 x 4096 on one thread; each row is summed by one thread, so the result does not depend on the count)."""
    return torch.linalg.vecdot(a, b)


def ssz_scale(weight: torch.Tensor, iterations: int = SSZ_ITERATIONS) -> torch.Tensor:
    """msModelSlim's "ssz" int4 scale: from the min/max scale, alternate least-squares scales for the current codes
    (``s = sum W q / sum q^2``) and codes for that scale, keeping per channel the scale of least weight reconstruction
    error, until no channel improves (or ``iterations``). Data-free: it minimises ``sum_k (W - q s)^2`` per output
    channel. Float32 [out], never worse than the min/max scale.

    The error is ``sum W^2 - 2 s sum W q + s^2 sum q^2``, from the two row dots the next
    scale needs anyway, so an iteration makes three passes over the weight (divide-round-clamp and two dots)
    instead of six with a residual tensor (1.6x faster). Codes stay float32 in one preallocated tensor; on Gaussian
    weights every channel keeps improving for all 50 iterations."""
    w = weight.to(torch.float32)
    best = minmax_scale(w)
    codes = w.div(best[:, None]).round_().clamp_(QMIN4, QMAX4)
    ww = _row_dot(w, w)
    wq, qq = _row_dot(w, codes), _row_dot(codes, codes)
    best_error = _squared_error(ww, wq, qq, best)
    for _ in range(iterations):
        scale = wq / qq.clamp(min=1e-30)
        scale = torch.where(scale > 0, scale, best)  # an all-zero channel: nothing to fit
        torch.div(w, scale[:, None], out=codes).round_().clamp_(QMIN4, QMAX4)
        wq, qq = _row_dot(w, codes), _row_dot(codes, codes)
        error = _squared_error(ww, wq, qq, scale)
        better = error < best_error
        if not bool(better.any()):
            break
        best = torch.where(better, scale, best)
        best_error = torch.where(better, error, best_error)
    return best


def _squared_error(ww: torch.Tensor, wq: torch.Tensor, qq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``sum_k (W - s q)^2`` per row from its row dots (float32, on the weight's device: an NPU has no float64; the
    cancellation costs ~5 of float32's 24 bits at int4's errors, enough to rank scales). NaN or Inf where the dots
    overflowed: never an improvement."""
    return ww - 2 * scale * wq + scale * scale * qq


def pack_int4_rows(codes: torch.Tensor) -> torch.Tensor:
    """Two int4 codes per int8 along the output dimension: ``packed[j, k] = (W[2j+1, k] << 4) | (W[2j, k] & 0xF)``,
    int8 [out/2, in] (the low nibble is the even output channel)."""
    if codes.shape[0] % 2:
        raise ValueError(f"int4 packing needs an even number of output channels, got {codes.shape[0]}")
    pairs = codes.to(torch.int16).reshape(codes.shape[0] // 2, 2, codes.shape[1])
    packed = (pairs[:, 1] << 4) | (pairs[:, 0] & 0xF)  # in [-128, 127] as a signed byte
    return torch.where(packed > 127, packed - 256, packed).to(torch.int8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4_rows: int8 [out, in] codes in [-8, 7]."""
    p = packed.to(torch.int16)
    low = p & 0xF
    low = torch.where(low >= 8, low - 16, low)
    high = p >> 4  # arithmetic: keeps the sign of the high nibble
    return torch.stack([low, high], dim=1).reshape(2 * packed.shape[0], packed.shape[1]).to(torch.int8)


def scale_bias(codes: torch.Tensor, scale: torch.Tensor, input_split: bool) -> torch.Tensor:
    """The A8W4 kernel's correction for splitting int8 activations into two int4 halves: ``8 ws[n] sum_k W[n, k]``
    (float32 [out, 1]), or for a linear whose input the engine splits across ranks (down_proj) the same sum over
    each of 16 equal chunks of the input (float32 [out, 16])."""
    out, inputs = codes.shape
    chunks = SCALE_BIAS_CHUNKS if input_split else 1
    if inputs % chunks:
        raise ValueError(f"scale_bias needs an input size divisible by {chunks}, got {inputs}")
    sums = codes.to(torch.float32).reshape(out, chunks, inputs // chunks).sum(dim=2)
    return (8 * scale[:, None] * sums).contiguous()


__all__ = ["QMAX4", "QMIN4", "SCALE_BIAS_CHUNKS", "int4_codes", "minmax_scale", "pack_int4_rows", "scale_bias",
           "ssz_scale", "unpack_int4_rows"]
