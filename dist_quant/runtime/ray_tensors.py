"""Torch tensors through Ray's object store as their raw bytes.

Ray pickles a torch tensor with torch's own reducer, which copies its storage through Python bytes: measured on the
development machine, handing a 23 MiB float32 tensor (the hidden states of 2839 tokens at 30B-A3B's width) to an
actor took 53 ms and returning one 159 ms, against 9 and 61 ms as a numpy byte array, which Ray moves as an
out-of-band (pickle protocol 5) buffer. Every unit takes or returns a few such tensors, so at 40 units an actor
lost ~0.45 s per unit (docs/benchmarks.md, "Real width"). The bytes are the tensor's, so nothing changes a bit.

``register`` is called in each process that puts tensors: the driver and every actor. Reading needs nothing: the
pickled form names ``restore``.
"""

from __future__ import annotations

import numpy as np
import torch


def raw(tensor: torch.Tensor) -> tuple[str, str, tuple[int, ...], np.ndarray]:
    """(device, dtype, shape, bytes): what ``restore`` takes; any dtype (bfloat16 too), any strides."""
    tensor = tensor.detach()
    data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return str(tensor.device), str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), data


def restore(state: tuple[str, str, tuple[int, ...], np.ndarray]) -> torch.Tensor:
    """The tensor ``raw`` describes, in memory of its own (the object store's pages are shared and read-only)."""
    device, dtype, shape, data = state
    dtype = getattr(torch, dtype)
    if data.size == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(data.copy()).view(dtype).reshape(shape).to(device)


def register() -> None:
    """Send this process's torch tensors through Ray as ``raw`` bytes."""
    import ray

    ray.util.register_serializer(torch.Tensor, serializer=raw, deserializer=restore)
