"""Smoothing scales on worked examples, and each smoothing transform against a hand-written float64 forward."""

import pytest
import torch

from dist_quant.algorithms.smooth import (
    column_absmax,
    ov_scales,
    smooth_norm_linear,
    smooth_ov,
    smooth_scales,
    smooth_up_down,
)
from helpers import gqa_attention, randn, relative_error, rms_norm


def test_scale_formula_worked_example():
    act = torch.tensor([16.0, 1.0, 0.0, 4.0])
    weight = torch.tensor([4.0, 1.0, 2.0, 0.0])  # the last column is all zero: w clamped to 1e-5
    s = smooth_scales(act, weight, alpha=0.5, scale_min=1e-5)
    expected = torch.tensor([16**0.5 / 4**0.5, 1.0, 1e-5, 4**0.5 / 1e-5**0.5])  # a = 0 -> 0, clamped to scale_min
    torch.testing.assert_close(s, expected)
    assert s.dtype == torch.float32


def test_scales_from_bf16_statistics_are_float32():
    s = smooth_scales(torch.ones(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16), 0.9, 1e-5)
    assert s.dtype == torch.float32


def test_column_absmax_is_taken_over_all_linears():
    a = torch.tensor([[1.0, -5.0], [-3.0, 2.0]])
    b = torch.tensor([[-4.0, 0.5]])
    assert column_absmax([a, b]).tolist() == [4.0, 5.0]


def test_smoothing_flattens_an_outlier_channel():
    x = randn(256, 32)
    x[:, 3] *= 80.0
    x[:, 17] *= 30.0
    w = randn(48, 32)
    act_absmax = x.abs().amax(dim=0)
    s = smooth_scales(act_absmax, column_absmax([w]), alpha=0.9, scale_min=1e-5)

    def spread(channel_absmax):
        return (channel_absmax.max() / channel_absmax.min()).item()

    assert spread((x / s).abs().amax(dim=0)) < spread(act_absmax) / 10


def test_norm_linear_smoothing_keeps_outputs():
    x, g = randn(10, 32), randn(32)
    readers = [randn(16, 32), randn(8, 32)]
    s = smooth_scales(randn(32).abs(), column_absmax(readers), alpha=0.9, scale_min=1e-5)
    g_smooth, readers_smooth = smooth_norm_linear(g, readers, s)
    for w, w_smooth in zip(readers, readers_smooth):
        assert relative_error(rms_norm(x, g_smooth) @ w_smooth.T, rms_norm(x, g) @ w.T) < 1e-10


@pytest.mark.parametrize("with_bias", [True, False])
def test_ov_smoothing_keeps_gqa_attention_output(with_bias):
    num_heads, num_kv_heads, head_dim, hidden = 4, 2, 16, 64
    x = randn(9, hidden)
    wq, wk = randn(num_heads * head_dim, hidden), randn(num_kv_heads * head_dim, hidden)
    wv, wo = randn(num_kv_heads * head_dim, hidden), randn(hidden, num_heads * head_dim)
    bv = randn(num_kv_heads * head_dim) if with_bias else None
    act_absmax = randn(num_heads * head_dim).abs() * 10
    s_v = ov_scales(act_absmax, wo, 0.9, 1e-5, num_heads, num_kv_heads, head_dim)
    wv_s, bv_s, wo_s = smooth_ov(wv, bv, wo, s_v, num_heads, num_kv_heads, head_dim)
    zero = torch.zeros(num_kv_heads * head_dim, dtype=torch.float64)
    expected = gqa_attention(x, wq, wk, wv, zero if bv is None else bv, wo, num_heads, num_kv_heads, head_dim)
    actual = gqa_attention(x, wq, wk, wv_s, zero if bv_s is None else bv_s, wo_s, num_heads, num_kv_heads, head_dim)
    assert relative_error(actual, expected) < 1e-10
    assert (bv_s is None) == (bv is None)


def test_ov_scales_average_the_q_heads_of_each_kv_group():
    num_heads, num_kv_heads, head_dim = 4, 2, 2
    act = torch.tensor([1.0, 4.0, 9.0, 16.0, 25.0, 36.0, 49.0, 64.0])  # q heads 0,1 -> kv 0; q heads 2,3 -> kv 1
    wo = torch.ones(3, num_heads * head_dim)  # w = 1, so alpha = 0.5 gives s = sqrt(a)
    s = ov_scales(act, wo, 0.5, 1e-5, num_heads, num_kv_heads, head_dim)
    torch.testing.assert_close(s, torch.tensor([(1 + 3) / 2, (2 + 4) / 2, (5 + 7) / 2, (6 + 8) / 2]))


def test_up_down_smoothing_keeps_the_gated_mlp_output():
    x = randn(10, 32)
    gate, up, down = randn(48, 32), randn(48, 32), randn(32, 48)
    down_input = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    s = smooth_scales(down_input.abs().amax(dim=0), column_absmax([down]), 0.9, 1e-5)
    up_s, down_s = smooth_up_down(up, down, s)
    expected = down_input @ down.T
    actual = (torch.nn.functional.silu(x @ gate.T) * (x @ up_s.T)) @ down_s.T
    assert relative_error(actual, expected) < 1e-10
