"""QuaRot weight transforms: fold RMSNorm weights into linears and rotate the residual stream offline.

Convention: activations are row vectors and the rotated stream is ``x' = x @ R`` with R orthogonal. Weights are in
nn.Linear orientation, ``W [out, in]`` with ``y = x @ W^T + b``. Every function returns new tensors in the dtype it
is given (pass float32, or float64 where cheap); nothing rotates at inference.
"""

from __future__ import annotations

from typing import Union

import torch


class BlockRotation:
    """``R = blockdiag(B, ..., B)`` of size ``n``, applied block by block: O(n * b) per vector instead of O(n^2).

    msModelSlim's rotation repeats one random Hadamard block over the hidden size, so a 4096-wide model's
    rotations cost 128x less than with a dense R. Products are computed in the operand's precision (at least
    float32; float64 operands stay float64), so weights are never copied to a wider type just to be rotated.
    """

    def __init__(self, block: torch.Tensor, size: int):
        if size % block.shape[0]:
            raise ValueError(f"rotation block {block.shape[0]} does not divide the width {size}")
        self.block, self.size = block, size

    def to(self, device: torch.device) -> "BlockRotation":
        """float64 stays on CPU; accelerators get float32 (NPUs have no float64 matmul)."""
        dtype = torch.float64 if torch.device(device).type == "cpu" else torch.float32
        return BlockRotation(self.block.to(device, dtype), self.size)

    def dense(self) -> torch.Tensor:
        return torch.block_diag(*[self.block] * (self.size // self.block.shape[0]))

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.to(torch.promote_types(x.dtype, torch.float32))

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ R`` over the last dimension (any leading dimensions)."""
        block = self._block(x)
        b = block.shape[0]
        y = x.to(block.dtype).reshape(*x.shape[:-1], self.size // b, b) @ block
        return y.reshape(x.shape).to(x.dtype)

    def left_t(self, w: torch.Tensor) -> torch.Tensor:
        """``R^T @ w`` over the first dimension."""
        block = self._block(w)
        b = block.shape[0]
        y = block.T @ w.to(block.dtype).reshape(self.size // b, b, -1)
        return y.reshape(w.shape).to(w.dtype)


Rotation = Union[torch.Tensor, BlockRotation]


def _right(x: torch.Tensor, r: Rotation) -> torch.Tensor:
    return r.right(x) if isinstance(r, BlockRotation) else x @ r


def _left_t(w: torch.Tensor, r: Rotation) -> torch.Tensor:
    return r.left_t(w) if isinstance(r, BlockRotation) else r.T @ w


def fuse_norm_into_linears(norm_weight: torch.Tensor, linear_weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """``W[:, j] * g[j]`` for each linear reading the output of an RMSNorm with weight ``g``.

    ``RMSNorm(x) = g * x / rms(x)`` and ``rms`` is invariant under rotation while a per-channel ``g`` is not, so ``g``
    moves into the readers and the norm weight becomes ones.
    """
    return [weight * norm_weight for weight in linear_weights]


def rotate_reader(weight: torch.Tensor, r: Rotation) -> torch.Tensor:
    """``W' = W @ R`` for a linear that reads the rotated stream: ``x' @ W'^T = x @ R @ R^T @ W^T = x @ W^T``."""
    return _right(weight, r)


def rotate_embedding(embedding: torch.Tensor, r: Rotation) -> torch.Tensor:
    """``E' = E @ R``: each embedding row is a token's first stream vector, so it must enter the stream rotated."""
    return _right(embedding, r)


def rotate_writer(
    weight: torch.Tensor, bias: torch.Tensor | None, r: Rotation
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W' = R^T @ W``, ``b' = R^T b`` for a linear that adds to the stream, so that its output arrives rotated:
    ``(h @ W^T + b) @ R = h @ (R^T W)^T + b @ R``."""
    return _left_t(weight, r), None if bias is None else _right(bias, r)


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
