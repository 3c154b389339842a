"""GPTQ rounding for per-channel integer weights with a fixed scale (Frantar et al., 2022, "OPTQ"): quantize the
input columns one at a time and spread each column's rounding error over the columns not yet quantized, weighted by
the inverse of ``H = X^T X`` (X: the linear's calibration inputs), so that ``X W^T`` moves as little as possible.

Pure functions over tensors. The Hessian is damped by ``DAMP`` times its mean diagonal and inverted in float64; the
column updates run in float32, ``BLOCK`` columns at a time (the lazy-batch form: identical math, fewer passes).
The result is the same for a fixed intra-op thread count (the block updates are matrix products).
"""

from __future__ import annotations

import torch

DAMP = 0.01  # fraction of the mean diagonal added to H (the paper's default)
BLOCK = 128  # columns per lazy-batch block


def input_gram(x: torch.Tensor) -> torch.Tensor:
    """``X^T X`` of calibration inputs ``x`` [tokens, in], accumulated in float32 (on the compute device, which may
    have no float64), returned as float64 [in, in]."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    return (x.T @ x).to(torch.float64)


def inverse_cholesky(gram: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, float64. Input columns that never saw a
    nonzero value (zero diagonal) get 1 on the diagonal, so they are rounded plainly."""
    h = gram.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    diag = torch.diagonal(h)
    diag += damp * diag.mean()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def gptq_codes(weight: torch.Tensor, scale: torch.Tensor, gram: torch.Tensor, qmin: int, qmax: int,
               block: int = BLOCK, damp: float = DAMP) -> torch.Tensor:
    """Integer codes in [qmin, qmax] for ``weight`` [out, in] with the per-output-channel ``scale`` [out], by GPTQ
    against the input Gram matrix ``gram`` [in, in]: int8 [out, in]."""
    w = weight.to(torch.float32).clone()
    hinv = inverse_cholesky(gram, damp).to(torch.float32)
    s = scale.to(torch.float32)[:, None]
    codes = torch.empty_like(w)
    columns = w.shape[1]
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        w1, h1 = w[:, i1:i2], hinv[i1:i2, i1:i2]
        errors = torch.empty_like(w1)
        for i in range(i2 - i1):
            q = w1[:, i:i + 1].div(s).round_().clamp_(qmin, qmax)
            codes[:, i1 + i:i1 + i + 1] = q
            err = (w1[:, i:i + 1] - q * s) / h1[i, i]
            w1[:, i:] -= err * h1[i:i + 1, i:]
            errors[:, i:i + 1] = err
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return codes.to(torch.int8)


__all__ = ["BLOCK", "DAMP", "gptq_codes", "input_gram", "inverse_cholesky"]
