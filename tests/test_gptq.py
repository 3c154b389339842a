"""GPTQ rounding (dist_quant/algorithms/gptq.py) against a column-by-column float64 reference written here from the
paper's update rule, against plain rounding, and in W4A8_DYNAMIC's ``method: gptq`` end to end."""

import torch

from dist_quant.algorithms.gptq import gptq_codes, input_gram
from dist_quant.algorithms.int4 import QMAX4, QMIN4, int4_codes, ssz_scale


def reference_codes(w: torch.Tensor, s: torch.Tensor, gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """OPTQ, one column at a time, float64: quantize column i, then ``W[:, j] -= e_i H^-1[i, j] / H^-1[i, i]`` for
    j > i, with H^-1 re-taken on the remaining columns at each step (the inverse of the trailing block)."""
    w, h = w.double().clone(), gram.double().clone()
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    codes = torch.empty_like(w)
    for i in range(w.shape[1]):
        hinv = torch.linalg.inv(h[i:, i:])
        q = torch.clamp(torch.round(w[:, i] / s.double()), QMIN4, QMAX4)
        codes[:, i] = q
        err = w[:, i] - q * s.double()
        w[:, i + 1:] -= err[:, None] * (hinv[0, 1:] / hinv[0, 0])[None, :]
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
    ours, ref = gptq_codes(w, s, input_gram(x), QMIN4, QMAX4, block=16), reference_codes(w, s, input_gram(x))
    assert (ours == ref).float().mean() > 0.99  # float32 blocks against float64: a rare rounding tie may differ
    assert abs(out_error(x, w, ours, s) - out_error(x, w, ref, s)) < 1e-3


def test_gptq_lowers_the_output_error_of_plain_rounding_and_a_diagonal_hessian_changes_nothing():
    torch.manual_seed(2)
    w, x = torch.randn(64, 128), inputs(400, 128, 3)
    s = ssz_scale(w)
    plain = int4_codes(w, s)
    gptq = gptq_codes(w, s, input_gram(x), QMIN4, QMAX4)
    assert out_error(x, w, gptq, s) < 0.7 * out_error(x, w, plain, s)
    assert int(gptq.min()) >= QMIN4 and int(gptq.max()) <= QMAX4
    # with H = c I the inverse is diagonal: no error is carried to other columns, so GPTQ is plain rounding
    assert torch.equal(gptq_codes(w, s, 5.0 * torch.eye(128, dtype=torch.float64), QMIN4, QMAX4), plain)


def test_inputs_that_never_fire_are_rounded_plainly():
    torch.manual_seed(4)
    w, x = torch.randn(16, 32), inputs(100, 32, 5)
    x[:, 7] = 0.0
    codes = gptq_codes(w, ssz_scale(w), input_gram(x), QMIN4, QMAX4)
    assert codes.dtype == torch.int8 and codes.shape == w.shape


def test_w4a8_gptq_without_tokens_is_ssz_and_with_them_uses_the_gram():
    from dist_quant import schemes

    torch.manual_seed(6)
    w, x = torch.randn(32, 64), inputs(150, 64, 7)
    scheme = schemes.get("W4A8_DYNAMIC")
    spec = lambda method, gram=None: schemes.LinearSpec(  # noqa: E731
        weight=schemes.QSpec("per_channel", "int4", True, method), input_gram=gram)
    ssz = scheme.quantize(w, None, spec("ssz"))
    assert all(torch.equal(t, ssz[r]) for r, t in scheme.quantize(w, None, spec("gptq")).items())
    gptq = scheme.quantize(w, None, spec("gptq", input_gram(x)))
    assert torch.equal(gptq["weight_scale"], ssz["weight_scale"]) and not torch.equal(gptq["weight"], ssz["weight"])
    assert scheme.needs_input_gram(spec("gptq").weight) and not scheme.needs_input_gram(spec("ssz").weight)
