"""SmoothQuant-style smoothing (msModelSlim ``iter_smooth``): per-channel scales that move activation outliers into
the weights, and the exact weight transforms that apply them.

Dividing input channel j of a linear by ``s_j`` and multiplying its weight column j by ``s_j`` leaves the product
unchanged; the division is folded into whatever produces that input (a norm weight, v_proj or up_proj rows), so
nothing is added at inference. Weights are in nn.Linear orientation ``W [out, in]``; functions return new tensors.
"""

from __future__ import annotations

import torch

WEIGHT_ABSMAX_MIN = 1e-5  # msModelSlim's floor on w_j, so that an all-zero column cannot divide by zero


# --- scales ---------------------------------------------------------------------------------------------------------

def column_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """``w_j``: the largest ``|W[:, j]|`` over all the linears that read input channel j."""
    return torch.stack([weight.abs().amax(dim=0) for weight in weights]).amax(dim=0)


def smooth_scales(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float, scale_min: float
) -> torch.Tensor:
    """``s_j = clamp(a_j^alpha / max(w_j, 1e-5)^(1 - alpha), min=scale_min)``, in at least float32.

    ``alpha`` sets how much of the activation range moves into the weights. A channel that never fired (``a_j = 0``)
    follows the formula: ``0^alpha = 0``, clamped up to ``scale_min``; it scales its weight column down to almost
    nothing, which is harmless only because calibration saw no activation there.
    """
    dtype = torch.promote_types(act_absmax.dtype, torch.float32)
    a = act_absmax.to(dtype)
    w = weight_absmax.to(dtype).clamp(min=WEIGHT_ABSMAX_MIN)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=scale_min)


def ov_scales(
    act_absmax_o_input: torch.Tensor,
    o_weight: torch.Tensor,
    alpha: float,
    scale_min: float,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """The ``num_kv_heads * head_dim`` scales of the v -> o subgraph.

    o_proj's input has one channel per q-head position (``num_heads * head_dim``), but all q heads of a GQA group read
    the same v_proj output channel, which can carry only one scale. So: per-channel scales of o_proj's input from its
    abs-max and o_proj's column abs-max (:func:`smooth_scales`), then the mean over the q heads of each kv group
    (msModelSlim's choice), position by position.
    """
    per_q_channel = smooth_scales(act_absmax_o_input, column_absmax([o_weight]), alpha, scale_min)
    group = num_heads // num_kv_heads
    return per_q_channel.reshape(num_kv_heads, group, head_dim).mean(dim=1).reshape(-1)


# --- transforms -----------------------------------------------------------------------------------------------------

def smooth_norm_linear(
    norm_weight: torch.Tensor, linear_weights: list[torch.Tensor], s: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(g / s, [W * s])``: the norm emits ``x / s`` and every linear reading it has column j scaled by ``s_j``."""
    return norm_weight / s, [weight * s for weight in linear_weights]


def smooth_ov(
    v_weight: torch.Tensor,
    v_bias: torch.Tensor | None,
    o_weight: torch.Tensor,
    s_v: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(v', v_bias', o')`` with v_proj output channel c divided by ``s_v[c]`` and o_proj columns multiplied back.

    Attention is linear in V, so q head h's output at position d is scaled by the ``s_v`` of its kv head
    ``h // (num_heads / num_kv_heads)`` at position d; o_proj's column for (h, d) is multiplied by exactly that.
    """
    group = num_heads // num_kv_heads
    s_o = s_v.reshape(num_kv_heads, 1, head_dim).expand(num_kv_heads, group, head_dim).reshape(-1)
    v_bias = None if v_bias is None else v_bias / s_v
    return v_weight / s_v[:, None], v_bias, o_weight * s_o


def smooth_up_down(
    up_weight: torch.Tensor, down_weight: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up', down')`` with up_proj rows divided by ``s`` and down_proj columns multiplied by it.

    ``silu(gate) * up`` is linear in up's output, so down_proj's input channel j comes out divided by ``s_j``.
    """
    return up_weight / s[:, None], down_weight * s
