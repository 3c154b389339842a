"""MXFP8 weights (algorithms/mxfp8.py) against independent computations: torch's float8_e4m3fn against a decoder
written from the E4M3 bit layout, the rounding against a float64 bound on the format's grid, the elements against
torch's round-to-nearest-even cast (equal except at ties, which msModelSlim rounds away from zero), the shared
exponents against exact powers of two; and msModelSlim's own edge cases (signed zeros, float32 double rounding, bf16
log2), each checked once against its 26.1 code."""

import math

import pytest
import torch

from dist_quant.algorithms import mxfp8


def decode_e4m3(byte: int) -> float:
    """An E4M3 (fn) byte from its bit layout: sign, 4-bit exponent with bias 7, 3-bit mantissa; exponent field 0 is
    subnormal (0.m * 2^-6); 0x7F and 0xFF are NaN, there is no infinity."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * math.ldexp(mantissa / 8, -6)
    return sign * math.ldexp(1 + mantissa / 8, exponent - 7)


def block_exponents(scale: torch.Tensor, inputs: int) -> torch.Tensor:
    """Each element's shared exponent, from the scale bytes: float64 [out, in]."""
    return (scale.double() - 127).repeat_interleave(32, dim=1)[:, :inputs]


def exact_floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2|x|) of non-zero values from frexp, free of log2's rounding."""
    return (torch.frexp(x.double().abs())[1] - 1).double()


def random_weight(out: int, inputs: int, magnitude: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gaussian weights with a spread of magnitudes (log-normal factor), a zero and a saturating outlier."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inputs, generator=generator) * torch.randn(out, inputs, generator=generator).exp() * magnitude
    w[0, 5] = 0.0
    w[1, 2] = 1.8 * 2 ** math.ceil(math.log2(w[1, :32].abs().max()))  # the block's amax, 460.8 after scaling
    return w.to(dtype)


WEIGHT_CASES = [(magnitude, dtype, inputs) for magnitude in (1e-3, 1.0, 1e3)
                for dtype in (torch.bfloat16, torch.float32) for inputs in (64, 70)]


def test_torch_float8_e4m3fn_agrees_with_the_bit_layout():
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().tolist()
    for byte, value in enumerate(values):
        expected = decode_e4m3(byte)
        assert (math.isnan(value) and math.isnan(expected)) or value == expected, (hex(byte), value, expected)
    assert decode_e4m3(0x7E) == mxfp8.E4M3_MAX and decode_e4m3(0x01) == 2**-9


def test_every_emitted_element_decodes_to_what_dequantize_uses():
    weight = random_weight(8, 70, 1.0, torch.float32, seed=0)
    elements, scale = mxfp8.quantize_mxfp8(weight)
    dequantized = mxfp8.dequantize_mxfp8(elements, scale).tolist()
    exponents = block_exponents(scale, 70).tolist()
    for row, (codes, values) in enumerate(zip(elements.view(torch.uint8).tolist(), dequantized)):
        for col, (byte, value) in enumerate(zip(codes, values)):
            assert not math.isnan(decode_e4m3(byte))
            assert value == math.ldexp(decode_e4m3(byte), int(exponents[row][col]))


@pytest.mark.parametrize("magnitude, dtype, inputs", WEIGHT_CASES)
def test_round_trip_is_within_half_an_e4m3_step_or_saturates(magnitude, dtype, inputs):
    weight = random_weight(16, inputs, magnitude, dtype, seed=inputs)
    elements, scale = mxfp8.quantize_mxfp8(weight)
    exponent = block_exponents(scale, inputs)
    w = weight.double()
    r = w / torch.exp2(exponent)  # exact: a power-of-two scaling in float64
    step = torch.exp2((exact_floor_log2(r).clamp(min=-6) - 3) + exponent)
    deq = mxfp8.dequantize_mxfp8(elements, scale).double()
    saturated, rounded = r.abs() > 448, (r.abs() <= 448) & (w != 0)
    assert bool(saturated[1, 2])
    assert bool(((deq - w).abs()[rounded] <= step[rounded] / 2).all())
    assert bool((deq[w == 0] == 0).all())
    assert torch.equal(deq[saturated], torch.sign(w[saturated]) * 448 * torch.exp2(exponent[saturated]))


@pytest.mark.parametrize("magnitude, dtype, inputs", WEIGHT_CASES)
def test_shared_exponent_is_the_floor_of_the_block_amax_less_8(magnitude, dtype, inputs):
    """Exact for float32; bf16 may go one up where the amax's mantissa is close to 2 (msModelSlim's bf16 log2)."""
    weight = random_weight(16, inputs, magnitude, dtype, seed=inputs + 1)
    _, scale = mxfp8.quantize_mxfp8(weight)
    padded = torch.nn.functional.pad(weight.double(), (0, -inputs % 32))
    amax = padded.abs().reshape(16, -1, 32).amax(dim=2)
    exact = exact_floor_log2(amax) - 8
    got = scale.double() - 127
    if dtype == torch.float32:
        assert torch.equal(got, exact)
    else:
        bumped = got == exact + 1
        assert bool(((got == exact) | bumped).all())
        assert bool((torch.frexp(amax[bumped])[0] * 2 > 1.95).all())


def torch_cast(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Torch's own float8 cast of the scaled weight (round to nearest, ties to even), as bytes."""
    exponent = block_exponents(scale, weight.shape[1]).float()
    return (weight.float() / torch.exp2(exponent)).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_elements_equal_torchs_cast_except_at_ties_which_go_away_from_zero(dtype):
    weight = random_weight(32, 128, 0.02, dtype, seed=3)
    elements, scale = mxfp8.quantize_mxfp8(weight)
    r = weight.double() / torch.exp2(block_exponents(scale, 128))
    units = r * torch.exp2(3 - exact_floor_log2(r).clamp(min=-6))  # r in steps of its E4M3 binade
    tie = (units - units.floor() == 0.5) & (r.abs() < 448)
    ours, torchs = elements.view(torch.uint8), torch_cast(weight, scale)
    assert torch.equal(ours[~tie], torchs[~tie])
    expected = torch.sign(units) * (units.abs() + 0.5) / torch.exp2(3 - exact_floor_log2(r).clamp(min=-6))
    assert torch.equal(elements.double()[tie], expected[tie])
    if dtype == torch.bfloat16:  # bf16 has 4 more mantissa bits than E4M3: ties are common
        assert int(tie.sum()) > 0 and bool((ours[tie] != torchs[tie]).any())


def one_block(*values: float) -> torch.Tensor:
    """A [1, 32] float32 weight whose block amax is 256 (exponent 0), holding ``values`` after it."""
    return torch.tensor([[256.0, *values] + [0.0] * (31 - len(values))])


def test_exact_ties_round_away_from_zero_where_torch_rounds_to_even():
    """1.0625 lies halfway between 1.0 and 1.125; 2^-10 halfway between 0 and the smallest subnormal 2^-9."""
    weight = one_block(1.0625, -1.0625, 2**-10, 1.1875)
    elements, scale = mxfp8.quantize_mxfp8(weight)
    assert int(scale) == 127
    assert elements.float()[0, 1:5].tolist() == [1.125, -1.125, 2**-9, 1.25]
    assert torch_cast(weight, scale).view(torch.float8_e4m3fn).float()[0, 1:5].tolist() == [1.0, -1.0, 0.0, 1.25]


def test_magnitudes_above_448_saturate():
    """The block's amax lands in [256, 512): 460 to 511 would round to 480 or 512, which E4M3 (fn) lacks."""
    assert mxfp8.round_to_e4m3(torch.tensor([460.0, 464.0, -500.0, 511.0])).tolist() == [448.0, 448.0, -448.0, 448.0]
    elements, _ = mxfp8.quantize_mxfp8(one_block(-500.0, 255.0))
    assert elements.float()[0, :3].tolist() == [256.0, -448.0, 256.0]


def test_signed_zeros_are_msmodelslims():
    """A zero weight (either sign) is set to +0 before rounding; a negative that rounds to zero keeps its sign."""
    elements, _ = mxfp8.quantize_mxfp8(one_block(-0.0, -(2**-12), 2**-12))
    assert elements.view(torch.uint8)[0, 1:4].tolist() == [0x00, 0x80, 0x00]


def test_float32_double_rounding_of_msmodelslims_hand_rounding_is_kept():
    """msModelSlim adds 0.5 in float32: 2^9 (2^-10 - 2^-34) + 0.5 = 1 - 2^-25 rounds to 1.0, so the value just below
    the tie at 2^-10 goes up to 2^-9 (checked against msModelSlim 26.1's own code); exact rounding gives 0."""
    elements, _ = mxfp8.quantize_mxfp8(one_block(2**-10 - 2**-34, 2**-10 - 2**-33))
    assert elements.float()[0, 1:3].tolist() == [2**-9, 0.0]


def test_shared_exponent_of_powers_of_two_zero_and_subnormal_blocks():
    k = torch.arange(-126, 128, dtype=torch.float64)
    weight = torch.zeros(len(k), 96)
    weight[:, 0] = torch.exp2(k)  # block 0: amax exactly 2^k
    weight[:, 33] = -1.999 * torch.exp2(k - 1)  # block 1: amax 1.999 * 2^(k-1)
    weight[:, 64:] = 0.0  # block 2: all zero
    elements, scale = mxfp8.quantize_mxfp8(weight)
    expected = (k - 8).clamp(min=-127) + 127
    assert scale[:, 0].tolist() == expected.tolist()
    assert scale[:, 1].tolist() == ((k - 9).clamp(min=-127) + 127).tolist()
    assert scale[:, 2].tolist() == [0] * len(k)
    assert bool((elements[:, 64:].float() == 0).all())
    assert mxfp8.shared_exponents(torch.tensor([[1e-40] + [0.0] * 31])).item() == -127  # float32 subnormal amax


def test_bf16_exponent_follows_msmodelslims_bf16_log2():
    """log2(1.984375 * 2^-5) = -4.0116 rounds to -4 in bf16: exponent -12 (byte 115), not -13 as in float32."""
    weight = torch.full((1, 32), 0.01, dtype=torch.bfloat16)
    weight[0, 0] = 1.984375 * 2**-5
    assert mxfp8.shared_exponents(weight).item() == -12
    assert mxfp8.shared_exponents(weight.float()).item() == -13


def test_non_finite_weights_are_refused():
    with pytest.raises(ValueError, match="Inf or NaN"):
        mxfp8.quantize_mxfp8(torch.tensor([[1.0, float("inf")]]))


@pytest.mark.parametrize("inputs", [32, 64, 70, 5])
def test_shapes_and_dtypes(inputs):
    weight = torch.randn(6, inputs, dtype=torch.bfloat16)
    elements, scale = mxfp8.quantize_mxfp8(weight)
    assert elements.dtype == torch.float8_e4m3fn and elements.shape == (6, inputs)
    assert scale.dtype == torch.uint8 and scale.shape == (6, math.ceil(inputs / 32))
    assert mxfp8.shared_exponents(weight).dtype == torch.int32
    assert mxfp8.dequantize_mxfp8(elements, scale).dtype == torch.float32


def test_dequantize_reads_the_e8m0_extremes():
    elements = torch.ones(3, 32).to(torch.float8_e4m3fn)
    scale = torch.tensor([[0], [127], [255]], dtype=torch.uint8)
    values = mxfp8.dequantize_mxfp8(elements, scale)
    assert values[0, 0].item() == 2**-127 and values[1, 0].item() == 1.0 and bool(values[2].isnan().all())


def test_activation_fake_quant_is_the_weight_round_trip_on_float32():
    """Also for bf16 activations, whose exponent comes from float32 (the weights' bf16 log2 goes one up here)."""
    x = torch.randn(4, 2, 70, dtype=torch.bfloat16)
    x[0, 0, 0] = 1.984375 * 2**4
    flat = x.reshape(8, 70).float()
    expected = mxfp8.dequantize_mxfp8(*mxfp8.quantize_mxfp8(flat))
    assert torch.equal(mxfp8.quantize_mxfp8_activations(flat), expected)
    fake = mxfp8.quantize_mxfp8_activations(x)
    assert fake.dtype == torch.float32 and fake.shape == x.shape
    assert torch.equal(fake.reshape(8, 70), expected)
    assert not torch.equal(fake.reshape(8, 70), mxfp8.dequantize_mxfp8(*mxfp8.quantize_mxfp8(x.reshape(8, 70))))


def test_scale_bytes_are_the_e8m0_bytes_of_power_of_two_scales():
    """Every E8M0 power of two (2^-127, a float32 subnormal, to 2^127) gives its byte, as torch's float8_e8m0fnu
    cast stores it where torch has that dtype; anything else is refused."""
    exponents = torch.arange(-127, 128)
    scales = torch.tensor([math.ldexp(1.0, int(e)) for e in exponents], dtype=torch.float32)
    assert torch.equal(mxfp8.scale_bytes(scales), (exponents + 127).to(torch.uint8))
    if hasattr(torch, "float8_e8m0fnu"):
        assert torch.equal(mxfp8.scale_bytes(scales), scales.to(torch.float8_e8m0fnu).view(torch.uint8))
    for bad in (0.0, 0.75, 3.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="powers of two"):
            mxfp8.scale_bytes(torch.tensor([1.0, bad]))
