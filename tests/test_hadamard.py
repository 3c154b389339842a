"""Hadamard rotations: orthogonal to float64 precision for every width the real models need, and reproducible."""

import math

import pytest
import torch

from dist_quant.algorithms.hadamard import (
    block_random_hadamard,
    check_orthogonal,
    hadamard_matrix,
    head_rotation,
    random_hadamard,
)

MODEL_SIZES = [4096, 2048, 1536, 768, 128]
SMALL_SIZES = [1, 2, 4, 12, 16, 24, 32, 48, 64, 96]


def max_orthogonality_error(r: torch.Tensor) -> float:
    return (r @ r.T - torch.eye(r.shape[0], dtype=r.dtype)).abs().max().item()


@pytest.mark.parametrize("n", MODEL_SIZES + SMALL_SIZES)
def test_hadamard_is_orthogonal_with_entries_plus_minus_one_over_sqrt_n(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert max_orthogonality_error(h) < 1e-12
    assert torch.equal(h.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))


def test_hadamard_dtype_is_honoured():
    assert hadamard_matrix(16, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("n", [0, 3, 20, 36, 40, 1000, 1152])
def test_unsupported_sizes_are_refused_with_the_supported_ones_named(n):
    with pytest.raises(ValueError, match=r"supported sizes are 2\^k .* 12 \* 2\^k"):
        hadamard_matrix(n)


def test_random_hadamard_is_h_times_random_signs_and_reproducible():
    r = random_hadamard(1536, seed=7)
    assert max_orthogonality_error(r) < 1e-12
    signs = (r / hadamard_matrix(1536))[0]  # every column of H is scaled by one sign
    assert set(signs.tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(r, hadamard_matrix(1536) * signs, rtol=0, atol=0)
    assert torch.equal(r, random_hadamard(1536, seed=7))
    assert not torch.equal(r, random_hadamard(1536, seed=8))


def test_block_random_hadamard_repeats_one_block_on_the_diagonal():
    r = block_random_hadamard(128, 32)  # msModelSlim's default seed
    block = random_hadamard(32, seed=1234)
    for i in range(4):
        for j in range(4):
            expected = block if i == j else torch.zeros(32, 32, dtype=torch.float64)
            assert torch.equal(r[32 * i : 32 * (i + 1), 32 * j : 32 * (j + 1)], expected)
    assert max_orthogonality_error(block_random_hadamard(4096, 32)) < 1e-12


def test_block_size_must_divide_the_width():
    with pytest.raises(ValueError, match="does not divide"):
        block_random_hadamard(100, 32)


def test_head_rotation_smaller_than_the_block_is_a_full_head_hadamard_not_zero():
    r = head_rotation(16, block_size=32, seed=1234)
    assert r.shape == (16, 16)
    assert max_orthogonality_error(r) < 1e-12
    assert torch.equal(r.abs(), torch.full((16, 16), 0.25, dtype=torch.float64))


def test_head_rotation_uses_blocks_when_they_fit_and_falls_back_to_full_size():
    assert torch.equal(head_rotation(128, block_size=32), block_random_hadamard(128, 32))
    full = head_rotation(48, block_size=32, seed=5)  # 32 does not divide 48; 48 = 12 * 4 is a Hadamard size
    assert torch.equal(full, random_hadamard(48, seed=5))
    assert max_orthogonality_error(full) < 1e-12


def test_head_rotation_without_any_hadamard_fit_is_refused():
    with pytest.raises(ValueError, match="head_dim 40"):
        head_rotation(40, block_size=32)


def test_check_orthogonal_accepts_rotations_and_names_what_fails():
    check_orthogonal(random_hadamard(64, seed=3), "global rotation")
    check_orthogonal(random_hadamard(64, seed=3).to(torch.float32), "global rotation")
    with pytest.raises(ValueError, match="head rotation is not orthogonal"):
        check_orthogonal(torch.zeros(16, 16), "head rotation")
    with pytest.raises(ValueError, match="R is not orthogonal"):
        check_orthogonal(torch.full((4, 4), float("nan")), "R")
    with pytest.raises(ValueError, match="R is not orthogonal"):
        check_orthogonal(2 * torch.eye(4), "R")
    with pytest.raises(ValueError, match="not a square matrix"):
        check_orthogonal(torch.eye(4)[:3], "R")
