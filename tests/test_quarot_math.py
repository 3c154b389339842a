"""QuaRot transforms against hand-written float64 forwards: rotating the weights must not change any output."""

import pytest
import torch

from dist_quant.algorithms.hadamard import block_random_hadamard, head_rotation, random_hadamard
from dist_quant.algorithms.quarot import (
    fuse_norm_into_linears,
    rotate_embedding,
    rotate_reader,
    rotate_v_o_heads,
    rotate_writer,
)
from helpers import gqa_attention, randn, relative_error, rms_norm

HIDDEN = 64
# the float64 references (rms_norm, gqa_attention, ...) are in helpers.py: tests/test_smooth_math.py uses them too


def test_unit_rms_norm_commutes_with_an_orthogonal_rotation():
    x, r = randn(10, HIDDEN), random_hadamard(HIDDEN, seed=1)
    ones = torch.ones(HIDDEN, dtype=torch.float64)
    assert relative_error(rms_norm(x @ r, ones), rms_norm(x, ones) @ r) < 1e-12


def test_fused_and_rotated_readers_see_the_same_normed_stream():
    x, g, r = randn(10, HIDDEN), randn(HIDDEN), block_random_hadamard(HIDDEN, 32)
    readers = [randn(24, HIDDEN), randn(8, HIDDEN)]
    expected = [rms_norm(x, g) @ w.T for w in readers]
    fused = fuse_norm_into_linears(g, readers)
    actual = [rms_norm(x @ r, torch.ones_like(g)) @ rotate_reader(w, r).T for w in fused]
    for a, e in zip(actual, expected):
        assert relative_error(a, e) < 1e-10


def test_writer_output_arrives_rotated():
    h, w, b, r = randn(10, 48), randn(HIDDEN, 48), randn(HIDDEN), random_hadamard(HIDDEN, seed=2)
    w_rot, b_rot = rotate_writer(w, b, r)
    assert relative_error(h @ w_rot.T + b_rot, (h @ w.T + b) @ r) < 1e-12
    assert rotate_writer(w, None, r)[1] is None


def test_rotated_residual_block_keeps_the_logits():
    """embed -> norm -> MLP (reader, writer) added to the residual -> final norm -> lm_head."""
    vocab, inter = 50, 96
    tokens = torch.randint(0, vocab, (12,))
    embed, lm_head = randn(vocab, HIDDEN), randn(vocab, HIDDEN)
    g_mlp, g_final = randn(HIDDEN), randn(HIDDEN)
    up, down, down_bias = randn(inter, HIDDEN), randn(HIDDEN, inter), randn(HIDDEN)

    def forward(embed, g_mlp, up, down, down_bias, g_final, lm_head):
        h = embed[tokens]
        h = h + torch.nn.functional.silu(rms_norm(h, g_mlp) @ up.T) @ down.T + down_bias
        return rms_norm(h, g_final) @ lm_head.T

    expected = forward(embed, g_mlp, up, down, down_bias, g_final, lm_head)
    r = block_random_hadamard(HIDDEN, 32, seed=9)
    ones = torch.ones(HIDDEN, dtype=torch.float64)
    (up_fused,) = fuse_norm_into_linears(g_mlp, [up])
    (lm_fused,) = fuse_norm_into_linears(g_final, [lm_head])
    down_rot, down_bias_rot = rotate_writer(down, down_bias, r)
    actual = forward(
        rotate_embedding(embed, r), ones, rotate_reader(up_fused, r), down_rot, down_bias_rot, ones,
        rotate_reader(lm_fused, r),
    )
    assert relative_error(actual, expected) < 1e-10


def test_v_o_head_rotation_keeps_gqa_attention_output():
    num_heads, num_kv_heads, head_dim = 4, 2, 16
    x = randn(9, HIDDEN)
    wq, wk = randn(num_heads * head_dim, HIDDEN), randn(num_kv_heads * head_dim, HIDDEN)
    wv, bv = randn(num_kv_heads * head_dim, HIDDEN), randn(num_kv_heads * head_dim)
    wo = randn(HIDDEN, num_heads * head_dim)
    head_rot = head_rotation(head_dim, block_size=32)
    expected = gqa_attention(x, wq, wk, wv, bv, wo, num_heads, num_kv_heads, head_dim)
    wv_rot, bv_rot, wo_rot = rotate_v_o_heads(wv, bv, wo, head_rot, num_kv_heads, num_heads, head_dim)
    actual = gqa_attention(x, wq, wk, wv_rot, bv_rot, wo_rot, num_heads, num_kv_heads, head_dim)
    assert relative_error(actual, expected) < 1e-10
    assert not torch.allclose(wv_rot, wv) and not torch.allclose(wo_rot, wo)


def test_v_o_head_rotation_without_bias_and_with_mismatched_shapes():
    wv, wo, head_rot = randn(32, HIDDEN), randn(HIDDEN, 64), head_rotation(16, block_size=16)
    assert rotate_v_o_heads(wv, None, wo, head_rot, 2, 4, 16)[1] is None
    with pytest.raises(ValueError, match="4 kv heads"):
        rotate_v_o_heads(wv, None, wo, head_rot, 4, 4, 16)
