"""Torch tensors through Ray's object store as raw bytes (runtime/ray_tensors.py): every dtype and layout comes back
bit for bit, in memory of its own, and through a real Ray actor too."""

import pytest
import ray
import torch

from dist_quant.runtime import ray_tensors

CASES = {
    "bfloat16": torch.randn(5, 7).to(torch.bfloat16),
    "float32 scalar": torch.tensor(-0.0),
    "int64 strided": torch.arange(40).reshape(5, 8)[:, ::3],
    "transposed": torch.randn(6, 4).T,
    "empty": torch.empty(0, 3),
    "bool": torch.tensor([True, False, True]),
    "int8 3-D": torch.randint(-128, 127, (2, 3, 4), dtype=torch.int8),
}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Independent of the transport: dtype, shape and every element's bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.contiguous().reshape(-1).view(torch.uint8).numpy()) \
        == bytes(b.contiguous().reshape(-1).view(torch.uint8).numpy())


@pytest.mark.parametrize("name", list(CASES))
def test_raw_bytes_round_trip(name):
    tensor = CASES[name]
    back = ray_tensors.restore(ray_tensors.raw(tensor))
    assert same_bits(tensor, back)
    if back.numel():
        back.reshape(-1)[0] = back.reshape(-1)[1 % back.numel()]  # writable, and not the source's memory
        assert same_bits(tensor, CASES[name])


@ray.remote(num_cpus=1)
class Echo:
    def __init__(self):
        ray_tensors.register()

    def twice(self, tensors: dict) -> dict:
        """Returns what it was sent, and a tensor it made (the actor's own outputs go out as raw bytes too)."""
        return {**tensors, "made": torch.full((3, 2), 1.5, dtype=torch.bfloat16)}


@pytest.mark.ray
def test_through_a_ray_actor(local_ray):
    ray_tensors.register()
    sent = {name: t for name, t in CASES.items()}
    echo = Echo.remote()  # held: an actor whose last handle is dropped may be cancelled before it runs
    back = ray.get(echo.twice.remote(sent))
    assert all(same_bits(sent[name], back[name]) for name in sent)
    assert same_bits(back["made"], torch.full((3, 2), 1.5, dtype=torch.bfloat16))
    reduced = ray._private.worker.global_worker.get_serialization_context().serialize(CASES["bfloat16"])
    assert b"ray_tensors" in reduced.to_bytes()  # the registered raw form, not torch's pickle
