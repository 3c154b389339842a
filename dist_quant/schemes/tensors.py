"""The tensor side the schemes share: checks of a weight or calibration statistic before quantizing it, and the
served linear the formats' serving math builds. Imported when they run (schemes/base.py, which declares the
schemes, imports no torch)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from dist_quant.errors import CalibrationError, CheckpointError
from dist_quant.schemes.base import LinearSpec


def largest_magnitude(tensor: torch.Tensor) -> float:
    """``max |t|`` without a temporary, NaN if the tensor holds one (``torch.maximum`` propagates it)."""
    lo, hi = torch.aminmax(tensor)
    return float(torch.maximum(-lo, hi))


def check_weight(spec: LinearSpec, weight: torch.Tensor, scheme: str, limit: float, why: str) -> None:
    """Refuse, before any quantization work, a weight the scheme's math would overflow on: ``max |W| <= limit``
    (``why`` names the computation the limit protects). The reader refuses NaN and Inf in the source, so a
    non-finite weight here was made by QuaRot or smoothing from a source value near the float32 limit. The
    writer's layout pass quantizes fake tensors, which hold no values: nothing to check there."""
    if is_fake(weight) or weight.numel() == 0:
        return
    largest = largest_magnitude(weight)
    if not math.isfinite(largest):
        raise CheckpointError(f"linear {spec.name}: its weight holds NaN or Inf after rotation and smoothing (a "
                              "source weight near the float32 limit overflowed); check the checkpoint's values")
    if largest > limit:
        raise CheckpointError(f"linear {spec.name}: its largest weight magnitude {largest:.9g} is above {limit:.9g}, "
                              f"the most {scheme} can take for a {list(weight.shape)} weight ({why}); check the "
                              "checkpoint's values, or leave this linear out of that linear_quant")


def check_finite_inputs(spec: LinearSpec, what: str, tensor: torch.Tensor) -> None:
    """Refuse calibration statistics (an input range, a Gram matrix) that overflowed float32: they come from a
    calibration forward whose activations reached Inf, which only a weight of the model far beyond any trained
    value causes."""
    if tensor.numel() and not is_fake(tensor) and not math.isfinite(largest_magnitude(tensor)):
        raise CalibrationError(f"linear {spec.name}: {what} overflowed float32 in the calibration forward (a "
                               "weight before it is far too large); check the checkpoint's values")


class ServedLinear(nn.Module):
    """A linear as a serving engine runs it: ``math(x2d, roles)`` on the flattened tokens, output in x's dtype (the
    formats' serving math, e.g. checkpoint/formats/ascendv1_encoding.py, builds it for ``dist-quant eval``)."""

    def __init__(self, roles: dict[str, torch.Tensor], math: Callable[..., torch.Tensor]):
        super().__init__()
        self.math = math
        for name, tensor in roles.items():
            self.register_buffer(name, tensor, persistent=False)
        self.names = tuple(roles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.math(x.reshape(-1, x.shape[-1]), {name: getattr(self, name) for name in self.names})
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)
