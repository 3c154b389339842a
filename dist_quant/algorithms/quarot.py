"""QuaRot weight transforms: fold RMSNorm weights into linears and rotate the residual stream offline.

Convention: activations are row vectors and the rotated stream is ``x' = x @ R`` with R orthogonal. Weights are in
nn.Linear orientation, ``W [out, in]`` with ``y = x @ W^T + b``. Every function returns new tensors in the dtype it
is given (pass float32, or float64 where cheap); nothing rotates at inference.
"""

from __future__ import annotations

import torch


def fuse_norm_into_linears(norm_weight: torch.Tensor, linear_weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """``W[:, j] * g[j]`` for each linear reading the output of an RMSNorm with weight ``g``.

    ``RMSNorm(x) = g * x / rms(x)`` and ``rms`` is invariant under rotation while a per-channel ``g`` is not, so ``g``
    moves into the readers and the norm weight becomes ones.
    """
    return [weight * norm_weight for weight in linear_weights]


def rotate_reader(weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``W' = W @ R`` for a linear that reads the rotated stream: ``x' @ W'^T = x @ R @ R^T @ W^T = x @ W^T``."""
    return weight @ r


def rotate_embedding(embedding: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``E' = E @ R``: each embedding row is a token's first stream vector, so it must enter the stream rotated."""
    return embedding @ r


def rotate_writer(
    weight: torch.Tensor, bias: torch.Tensor | None, r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W' = R^T @ W``, ``b' = R^T b`` for a linear that adds to the stream, so that its output arrives rotated:
    ``(h @ W^T + b) @ R = h @ (R^T W)^T + b @ R``."""
    return r.T @ weight, None if bias is None else bias @ r


def rotate_v_o_heads(
    v_weight: torch.Tensor,
    v_bias: torch.Tensor | None,
    o_weight: torch.Tensor,
    head_rot: torch.Tensor,
    num_kv_heads: int,
    num_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Rotate every head's value vectors by ``R_h`` and undo it in o_proj: ``(v', v_bias', o')``.

    Each kv head's v_proj rows become ``R_h^T @ rows`` (its values ``v @ R_h``); each q head's o_proj columns become
    ``cols @ R_h``. Attention mixes values linearly per head, so a q head's output is rotated by the same ``R_h`` as
    the kv head it reads (``h // (num_heads / num_kv_heads)``) and o_proj cancels it exactly. One ``R_h`` serves all
    heads, which is why the GQA mapping needs no care here.
    """
    if v_weight.shape[0] != num_kv_heads * head_dim or o_weight.shape[1] != num_heads * head_dim:
        raise ValueError(
            f"v_proj {tuple(v_weight.shape)} / o_proj {tuple(o_weight.shape)} do not match {num_kv_heads} kv heads, "
            f"{num_heads} heads of size {head_dim}"
        )
    v_rot = (head_rot.T @ v_weight.reshape(num_kv_heads, head_dim, -1)).reshape(v_weight.shape)
    bias_rot = None if v_bias is None else (v_bias.reshape(num_kv_heads, head_dim) @ head_rot).reshape(-1)
    o_rot = (o_weight.reshape(-1, num_heads, head_dim) @ head_rot).reshape(o_weight.shape)
    return v_rot, bias_rot, o_rot
