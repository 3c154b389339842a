"""GPTQ rounding (dist_quant/algorithms/gptq.py) against a column-by-column float64 reference written here from the
paper's update rule, against plain rounding, and in W4A8_DYNAMIC's ``method: gptq`` end to end."""

import pytest
import torch

from dist_quant.algorithms.gptq import DAMP, Hessian, NotPositiveDefinite, gptq_codes, input_gram, upper_factor
from dist_quant.algorithms.int4 import QMAX4, QMIN4, int4_codes, ssz_scale


def reference_codes(w: torch.Tensor, s: torch.Tensor, gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """OPTQ, one column at a time, float64, the columns by decreasing ``H[i, i]`` (act order): quantize column c,
    then ``W[:, d] -= e_c H^-1[c, d] / H^-1[c, c]`` for every column d still to come, with H^-1 re-taken on the
    remaining columns at each step (the inverse of the trailing block)."""
    w, h = w.double().clone(), gram.double().clone()
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    todo = sorted(range(w.shape[1]), key=lambda c: (-float(h[c, c]), c))
    codes = torch.empty_like(w)
    while todo:
        c, rest = todo[0], todo[1:]
        hinv = torch.linalg.inv(h[todo][:, todo])
        q = torch.clamp(torch.round(w[:, c] / s.double()), QMIN4, QMAX4)
        codes[:, c] = q
        err = w[:, c] - q * s.double()
        w[:, rest] -= err[:, None] * (hinv[0, 1:] / hinv[0, 0])[None, :]
        todo = rest
    return codes.to(torch.int8)


def inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g) + torch.randn(tokens, width, generator=g) @ torch.randn(
        width, width, generator=g) * 0.2
    x[:, :3] *= 10  # a few large channels: an anisotropic Hessian, where error feedback matters
    return x


def out_error(x, w, codes, s):
    return float((x @ (w - codes.float() * s[:, None]).T).norm() / (x @ w.T).norm())


def test_blocked_gptq_equals_the_column_by_column_reference():
    torch.manual_seed(0)
    w, x = torch.randn(24, 40), inputs(200, 40, 1)
    s = ssz_scale(w)
    ours, ref = gptq_codes(w, s, Hessian(input_gram(x)), QMIN4, QMAX4, block=16), reference_codes(w, s, input_gram(x))
    assert (ours == ref).float().mean() > 0.99  # float32 blocks against float64: a rare rounding tie may differ
    assert abs(out_error(x, w, ours, s) - out_error(x, w, ref, s)) < 1e-3


def test_both_levels_of_blocks_equal_the_column_by_column_reference():
    """Blocks of 256 (the default: sub-blocks of 32 inside), of 100 (a sub-block cut short at the block's end) and
    of 64, over 300 columns (the last block partial), against the paper's rule one column at a time."""
    torch.manual_seed(1)
    w, x = torch.randn(24, 300), inputs(600, 300, 3)
    s = ssz_scale(w)
    ref = reference_codes(w, s, input_gram(x))
    for block in (256, 100, 64):
        ours = gptq_codes(w, s, Hessian(input_gram(x)), QMIN4, QMAX4, block=block)
        assert (ours == ref).float().mean() > 0.99, block
        assert abs(out_error(x, w, ours, s) - out_error(x, w, ref, s)) < 1e-3, block


def test_gptq_lowers_the_output_error_of_plain_rounding_and_a_diagonal_hessian_changes_nothing():
    torch.manual_seed(2)
    w, x = torch.randn(64, 128), inputs(400, 128, 3)
    s = ssz_scale(w)
    plain = int4_codes(w, s)
    gptq = gptq_codes(w, s, Hessian(input_gram(x)), QMIN4, QMAX4)
    assert out_error(x, w, gptq, s) < 0.7 * out_error(x, w, plain, s)
    assert int(gptq.min()) >= QMIN4 and int(gptq.max()) <= QMAX4
    # with a diagonal H the inverse is diagonal: no error is carried to other columns, so GPTQ is plain rounding
    # (in any column order: this one puts the columns in reverse)
    diagonal = torch.diag(torch.arange(1.0, 129.0, dtype=torch.float64))
    assert torch.equal(gptq_codes(w, s, Hessian(diagonal), QMIN4, QMAX4), plain)


def test_inputs_that_never_fire_are_rounded_plainly():
    torch.manual_seed(4)
    w, x = torch.randn(16, 32), inputs(100, 32, 5)
    x[:, 7] = 0.0
    codes = gptq_codes(w, ssz_scale(w), Hessian(input_gram(x)), QMIN4, QMAX4)
    assert codes.dtype == torch.int8 and codes.shape == w.shape


def test_w4a8_gptq_without_tokens_is_ssz_and_with_them_uses_the_gram():
    from dist_quant import schemes

    torch.manual_seed(6)
    w, x = torch.randn(32, 64), inputs(150, 64, 7)
    scheme = schemes.get("W4A8_DYNAMIC")
    spec = lambda method, gram=None: schemes.LinearSpec(  # noqa: E731
        weight=schemes.QSpec("per_channel", "int4", True, method), hessian=gram)
    ssz = scheme.quantize(w, None, spec("ssz"))
    untouched = scheme.quantize(w, None, spec("gptq"))
    assert torch.equal(untouched.codes, ssz.codes) and torch.equal(untouched.scale, ssz.scale)
    gptq = scheme.quantize(w, None, spec("gptq", Hessian.of_inputs(x)))
    assert torch.equal(gptq.scale, ssz.scale) and not torch.equal(gptq.codes, ssz.codes)
    assert scheme.needs_hessian(spec("gptq").weight) and not scheme.needs_hessian(spec("ssz").weight)


def test_w4a8_gptq_damping_from_the_recipe():
    """``weight.ext.damp``: GPTQ's damping. A huge one makes H a multiple of I, where no error is fed forward and
    GPTQ rounds as plainly as ssz; the shared factorisation is redone for another damping."""
    from dist_quant import schemes

    torch.manual_seed(9)
    w, hessian = torch.randn(32, 64), Hessian.of_inputs(inputs(150, 64, 7))
    scheme = schemes.get("W4A8_DYNAMIC")
    spec = lambda method, ext=(): schemes.LinearSpec(  # noqa: E731
        weight=schemes.QSpec("per_channel", "int4", True, method, ext), hessian=hessian)
    plain = scheme.quantize(w, None, spec("ssz")).codes
    assert torch.equal(scheme.quantize(w, None, spec("gptq", (("damp", 1e9),))).codes, plain)
    default = scheme.quantize(w, None, spec("gptq")).codes
    assert not torch.equal(default, plain)
    assert torch.equal(scheme.quantize(w, None, spec("gptq", (("damp", DAMP),))).codes, default)
    assert not torch.equal(scheme.quantize(w, None, spec("gptq", (("damp", 0.3),))).codes, default)


def test_the_factor_is_upper_triangular_and_its_product_is_the_damped_gram_matrix():
    """A A^T = H + damp mean(diag H) I with A upper triangular, against float64 arithmetic; and a damping so small
    that float32's factorisation breaks down is refactored in float64, not refused."""
    x = inputs(300, 96, 9)
    gram = input_gram(x)
    damped = gram.double() + 0.05 * torch.diagonal(gram.double()).mean() * torch.eye(96, dtype=torch.float64)
    a = upper_factor(gram, 0.05).double()
    assert torch.equal(a, a.triu()) and bool((torch.diagonal(a) > 0).all())
    assert float((a @ a.T - damped).abs().max() / damped.abs().max()) < 1e-6
    x = inputs(20, 96, 10).double()
    singular = x.T @ x  # rank 20: positive definite only through the damping
    assert int(torch.linalg.cholesky_ex(singular.float() + 1e-8 * torch.eye(96))[1]) > 0  # float32 breaks down
    tiny = upper_factor(singular, 1e-8).double()
    assert bool(torch.isfinite(tiny).all()) and bool((torch.diagonal(tiny) > 0).all())
    damped = singular + 1e-8 * torch.diagonal(singular).mean() * torch.eye(96, dtype=torch.float64)
    assert float((tiny @ tiny.T - damped).abs().max() / damped.abs().max()) < 1e-6
    with pytest.raises(NotPositiveDefinite, match="damped by 1e-10"):
        upper_factor(input_gram(inputs(20, 96, 10)), 1e-10)  # float32 inputs' rounding: no factor even in float64


def test_linears_reading_the_same_inputs_share_one_factorisation():
    torch.manual_seed(8)
    hessian = Hessian.of_inputs(inputs(120, 48, 10))
    first = hessian.prepared()
    codes = gptq_codes(torch.randn(16, 48), torch.full((16,), 0.3), hessian, QMIN4, QMAX4)
    assert hessian.prepared()[1] is first[1] and codes.shape == (16, 48)


def test_the_hessian_of_inputs_is_their_gram_in_act_order():
    """Built from the inputs (order from their sums of squares, Gram of the reordered inputs) as from the Gram
    matrix itself (order from its diagonal, the matrix reordered)."""
    x = inputs(300, 96, 11)
    from_inputs, from_gram = Hessian.of_inputs(x), Hessian(input_gram(x))
    assert torch.equal(from_inputs.order, from_gram.order)
    assert not torch.equal(from_inputs.order, torch.arange(96))
    assert torch.allclose(from_inputs.gram, from_gram.gram, rtol=1e-5, atol=1e-3)


def test_a_damping_too_small_for_the_inputs_is_refused_with_the_linear_and_the_option():
    from dist_quant import schemes
    from dist_quant.errors import RecipeError

    spec = schemes.LinearSpec(name="model.layers.0.mlp.experts.3.up_proj", hessian=Hessian.of_inputs(
        inputs(20, 96, 10)), weight=schemes.QSpec("per_channel", "int4", True, "gptq", (("damp", 1e-10),)))
    with pytest.raises(RecipeError, match=r"experts\.3\.up_proj: GPTQ cannot round it: .* raise weight\.ext\.damp"):
        schemes.get("W4A8_DYNAMIC").quantize(torch.randn(16, 96), None, spec)
