"""Orthogonal rotations for QuaRot: normalised Hadamard matrices and their seeded, block-diagonal variants.

A Hadamard rotation spreads an outlier channel evenly over all channels it mixes, which is what makes the rotated
activations easy to quantize; being orthogonal, it changes nothing in the float model. Everything here is built in
float64 from exact ±1 entries, so orthogonality holds to float64 rounding.
"""

from __future__ import annotations

import math

import torch

MSMODELSLIM_SEED = 1234  # the seed msModelSlim's quarot uses for its random signs

# A 12x12 Hadamard matrix (Paley construction I for q = 11): row i, column j is +1 for "+" and -1 for "-".
# Together with Sylvester matrices it covers the widths 2^k that are not enough on their own: 768 = 12 * 2^6,
# 1536 = 12 * 2^7.
_HADAMARD_12 = (
    "++++++++++++",
    "-++-+++---+-",
    "--++-+++---+",
    "-+-++-+++---",
    "--+-++-+++--",
    "---+-++-+++-",
    "----+-++-+++",
    "-+---+-++-++",
    "-++---+-++-+",
    "-+++---+-++-",
    "--+++---+-++",
    "-+-+++---+-+",
)


# --- plain Hadamard matrices ----------------------------------------------------------------------------------------

def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def is_hadamard_size(n: int) -> bool:
    """Whether :func:`hadamard_matrix` can build an ``n x n`` matrix: ``n = 2^k`` or ``n = 12 * 2^k``."""
    return _is_power_of_two(n) or (n % 12 == 0 and _is_power_of_two(n // 12))


def _sylvester(n: int) -> torch.Tensor:
    """The ±1 Sylvester matrix of a power-of-two size: ``H_2m = [[H_m, H_m], [H_m, -H_m]]``."""
    h = torch.ones(1, 1, dtype=torch.float64)
    step = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(step, h)
    return h


def _hadamard_12() -> torch.Tensor:
    return torch.tensor([[1.0 if c == "+" else -1.0 for c in row] for row in _HADAMARD_12], dtype=torch.float64)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalised ``n x n`` Hadamard matrix (entries ``±1/sqrt(n)``, ``H @ H.T = I``).

    ``n = 2^k`` uses Sylvester's construction, ``n = 12 * 2^k`` the Kronecker product of a 12x12 Hadamard matrix
    with a Sylvester one (the Kronecker product of Hadamard matrices is Hadamard).
    """
    if _is_power_of_two(n):
        signs = _sylvester(n)
    elif is_hadamard_size(n):
        signs = torch.kron(_hadamard_12(), _sylvester(n // 12))
    else:
        raise ValueError(
            f"no Hadamard matrix of size {n}: supported sizes are 2^k (..., 64, 128, 2048, 4096) and "
            f"12 * 2^k (12, 24, 48, ..., 768, 1536)"
        )
    return (signs / math.sqrt(n)).to(dtype)


# --- randomised rotations -------------------------------------------------------------------------------------------

def random_hadamard(n: int, seed: int = MSMODELSLIM_SEED) -> torch.Tensor:
    """``H @ diag(±1)`` in float64, the signs drawn from a CPU generator seeded with ``seed``.

    The random signs make the rotation incoherent with any fixed outlier pattern; the seed makes it reproducible, so
    the exported rotation can be rebuilt.
    """
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return hadamard_matrix(n) * signs  # scaling column j by signs[j] is the product with diag(signs)


def block_random_hadamard(n: int, block_size: int, seed: int = MSMODELSLIM_SEED) -> torch.Tensor:
    """msModelSlim's rotation: ONE ``random_hadamard(block_size, seed)`` repeated block-diagonally over ``n``.

    Mixing only within blocks keeps the rotation cheap and works for any width that ``block_size`` divides.
    """
    if block_size < 1 or n % block_size != 0:
        raise ValueError(f"block size {block_size} does not divide the width {n}; pick a block size that divides it")
    return torch.block_diag(*[random_hadamard(block_size, seed)] * (n // block_size))


def head_rotation(head_dim: int, block_size: int, seed: int = MSMODELSLIM_SEED) -> torch.Tensor:
    """The ``head_dim x head_dim`` rotation between v_proj and o_proj, never wider than a head.

    Blocks of ``min(block_size, head_dim)`` when that is a Hadamard size dividing ``head_dim``, else one full-size
    random Hadamard of ``head_dim``. msModelSlim builds ``head_dim // block_size`` blocks instead, which is zero blocks
    (an all-zero matrix that silently zeroes v_proj and o_proj) when ``head_dim < block_size``.
    """
    block = min(block_size, head_dim)
    if is_hadamard_size(block) and head_dim % block == 0:
        return block_random_hadamard(head_dim, block, seed)
    if is_hadamard_size(head_dim):
        return random_hadamard(head_dim, seed)
    raise ValueError(
        f"no head rotation for head_dim {head_dim}: neither a block of {block} nor a full Hadamard matrix fits "
        f"(Hadamard sizes are 2^k and 12 * 2^k)"
    )


def check_orthogonal(r: torch.Tensor, what: str, atol: float = 1e-6) -> None:
    """Raise ValueError naming ``what`` unless ``r`` is square with ``max |R R^T - I| <= atol``.

    A non-orthogonal R would change the model's outputs silently, so every rotation is checked before it is applied.
    """
    if r.ndim != 2 or r.shape[0] != r.shape[1]:
        raise ValueError(f"{what} is not a square matrix (shape {tuple(r.shape)}), so it cannot be a rotation")
    r64 = r.to(torch.float64)
    error = (r64 @ r64.T - torch.eye(r.shape[0], dtype=torch.float64, device=r.device)).abs().max().item()
    if not error <= atol:  # also catches NaN
        raise ValueError(f"{what} is not orthogonal: max |R R^T - I| = {error:.3g} > {atol:g}")
