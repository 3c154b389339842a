"""Int4 weights of W4A8_DYNAMIC experts (algorithms/int4.py) against independent computations: the packing against a
byte-by-byte unpacking in plain Python, scale_bias against the A8W4 kernel's own decomposition of int8 activations
into two int4 halves (CANN grouped_matmul_antiquant_a8w4_msd_pre.h, docs/w4a8-loader-facts.md 4.2), the "ssz" scale
against a brute-force search over clipping ratios."""

import pytest
import torch

from dist_quant.algorithms import int4


def nibble(value: int) -> int:
    """A 4-bit two's-complement value."""
    return value - 16 if value >= 8 else value


def test_packing_round_trips_against_a_byte_by_byte_unpacking():
    torch.manual_seed(0)
    codes = torch.randint(-8, 8, (10, 7), dtype=torch.int8)
    codes[0, :] = -8
    codes[1, :] = 7  # the extremes in both nibbles
    packed = int4.pack_int4_rows(codes)
    assert packed.dtype == torch.int8 and packed.shape == (5, 7)
    for j in range(5):
        for k in range(7):
            byte = int(packed[j, k]) & 0xFF  # the stored bit pattern
            assert nibble(byte & 0xF) == int(codes[2 * j, k])  # low nibble: the even output channel
            assert nibble(byte >> 4) == int(codes[2 * j + 1, k])
    assert torch.equal(int4.unpack_int4_rows(packed), codes)


def test_packing_refuses_an_odd_number_of_channels():
    with pytest.raises(ValueError, match="even number of output channels"):
        int4.pack_int4_rows(torch.zeros(3, 4, dtype=torch.int8))


def test_codes_and_minmax_scale_follow_msmodelslim():
    """int_quantize: clamp(round(W / s), -8, 7), round half to even; scale max(-min, max) / 7, at least eps."""
    weight = torch.tensor([[0.7, -0.7, 0.05, 0.15], [0.0, 0.0, 0.0, 0.0], [0.35, 0.25, 0.0, -0.1]])
    scale = int4.minmax_scale(weight)
    assert torch.allclose(scale, torch.tensor([0.1, torch.finfo(torch.float32).eps, 0.05]))
    codes = int4.int4_codes(weight, scale)
    assert codes[0].tolist() == [7, -7, 0, 2]  # 0.5 and 1.5 round to even
    assert codes[1].tolist() == [0, 0, 0, 0]
    assert codes[2].tolist() == [7, 5, 0, -2]


@pytest.mark.parametrize("input_split, chunks", [(False, 1), (True, 16)])
def test_scale_bias_restores_the_kernels_split_of_int8_activations(input_split, chunks):
    """The kernel computes x_q @ W as 16 (x_hi @ W) + (x_lo @ W) with x_hi = floor(x_q / 16), x_lo = (x_q & 15) - 8,
    then adds scale_bias (summed over its chunks, each TP rank's share) after the weight scale."""
    torch.manual_seed(1)
    codes = torch.randint(-8, 8, (6, 64), dtype=torch.int8)
    scale = torch.rand(6) + 0.1
    bias = int4.scale_bias(codes, scale, input_split)
    assert bias.shape == (6, chunks) and bias.dtype == torch.float32
    x_q = torch.randint(-128, 128, (5, 64), dtype=torch.int64)
    x_hi, x_lo = torch.div(x_q, 16, rounding_mode="floor"), (x_q & 15) - 8
    w, ws = codes.to(torch.float64), scale.to(torch.float64)
    kernel = 16 * ws * (x_hi.double() @ w.T) + ws * (x_lo.double() @ w.T) + bias.double().sum(dim=1)
    exact = ws * (x_q.double() @ w.T)
    assert torch.allclose(kernel, exact, rtol=0, atol=1e-6 * float(exact.abs().max()))  # scale_bias is float32
    if input_split:  # chunk c holds the sum over inputs [4c, 4c + 4)
        assert torch.allclose(bias[:, 3], 8 * scale * codes[:, 12:16].float().sum(dim=1))


def reconstruction_error(weight, scale):
    codes = int4.int4_codes(weight, scale)
    return (weight - codes.float() * scale[:, None]).square().mean(dim=1)


def test_ssz_scale_beats_minmax_and_nears_the_best_clipping_ratio():
    torch.manual_seed(2)
    weight = torch.randn(32, 256)
    weight[:4, 0] = 12.0  # channels with an outlier, where min/max wastes most of the grid
    minmax, ssz = int4.minmax_scale(weight), int4.ssz_scale(weight)
    error_minmax, error_ssz = reconstruction_error(weight, minmax), reconstruction_error(weight, ssz)
    assert bool((error_ssz <= error_minmax).all())
    assert float(error_ssz.mean()) < 0.9 * float(error_minmax.mean())
    ratios = torch.linspace(0.3, 1.0, 141)
    grid = torch.stack([reconstruction_error(weight, minmax * r) for r in ratios]).amin(dim=0)  # per channel
    assert float(error_ssz.mean()) < 1.05 * float(grid.mean())


def test_ssz_keeps_an_all_zero_channel_at_eps():
    weight = torch.randn(4, 32)
    weight[2] = 0
    scale = int4.ssz_scale(weight)
    assert float(scale[2]) == torch.finfo(torch.float32).eps
    assert bool(torch.isfinite(scale).all())
