"""Per-channel min/max of linear inputs during a calibration forward.

Per-channel ranges are all that static W8A8 needs (the per-tensor range is their min/max) and all that smoothing
needs (its scales are per input channel), so one forward per layer serves both.
"""

from __future__ import annotations

import torch
from torch import nn


class InputRanges:
    """Records, while active, the per-channel min and max of the inputs of the given modules (by forward pre-hooks)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self._modules = modules
        self._handles: list = []
        self.channel_min: dict[str, torch.Tensor] = {}
        self.channel_max: dict[str, torch.Tensor] = {}

    def _observe(self, name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if flat.shape[0] == 0:
            return
        self._extend(name, flat.amin(dim=0), flat.amax(dim=0))

    def _extend(self, name: str, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if name in self.channel_min:
            lo = torch.minimum(lo, self.channel_min[name])
            hi = torch.maximum(hi, self.channel_max[name])
        self.channel_min[name], self.channel_max[name] = lo, hi

    def __enter__(self) -> "InputRanges":
        for name, module in self._modules.items():
            hook = lambda _module, args, name=name: self._observe(name, args[0])  # noqa: E731
            self._handles.append(module.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @classmethod
    def merged(cls, parts: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]) -> "InputRanges":
        """The ranges of several forwards' (channel_min, channel_max) taken together: the same values, bit for bit,
        as one forward over all of their inputs (min and max are exact in any order)."""
        ranges = cls({})
        for channel_min, channel_max in parts:
            for name in channel_min:
                ranges._extend(name, channel_min[name], channel_max[name])
        return ranges

    def rescale(self, name: str, divisor: torch.Tensor) -> None:
        """The ranges a linear sees once its input channels are divided by ``divisor`` (> 0), e.g. by smoothing."""
        if name in self.channel_min:
            divisor = divisor.to(self.channel_min[name])
            self.channel_min[name] = self.channel_min[name] / divisor
            self.channel_max[name] = self.channel_max[name] / divisor

    def tensor_range(self, name: str) -> tuple[float, float]:
        """The per-tensor (min, max) of a module's input over everything observed."""
        if name not in self.channel_min:
            raise KeyError(f"no calibration input reached {name}")
        return float(self.channel_min[name].min()), float(self.channel_max[name].max())
