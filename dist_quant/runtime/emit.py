"""The emitter: turns a unit's float pieces into the checkpoint's entries, tensor by tensor.

Each linear is quantized with the recipe's scheme for it and encoded by the output format (checkpoint/formats/);
everything else (norms, embeddings, the router under a FLOAT type) is written FLOAT in the model's dtype, or in the
dtype the source stores it in where that is a wider float (a float32 ``A_log`` in a bfloat16 release). The worker
emits real tensors through it; ``runtime/layout.py`` emits fake ones (shapes only) through the same code, so the
layout the writer plans and the tensors the worker writes cannot drift.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Protocol

import torch
from torch import nn

from dist_quant import schemes
from dist_quant.algorithms.gptq import Hessian
from dist_quant.calib.ranges import InputRanges
from dist_quant.checkpoint import formats
from dist_quant.recipe import Recipe
from dist_quant.runtime.timing import PhaseTimes

Quantize = Callable[[schemes.Scheme, torch.Tensor, Optional[torch.Tensor], schemes.LinearSpec],
                    schemes.QuantizedLinear]


class TensorSink(Protocol):
    def add(self, key: str, tensor: torch.Tensor, quant_type: str) -> None: ...


def scheme_quantize(scheme: schemes.Scheme, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    spec: schemes.LinearSpec) -> schemes.QuantizedLinear:
    """The scheme's own quantization of one linear (the emitter's default)."""
    return scheme.quantize(weight, bias, spec)


def wider_float(model_dtype: torch.dtype, stored: Optional[torch.dtype]) -> torch.dtype:
    """The dtype a FLOAT tensor is written in: the model's, unless the source stores it in a float type of more bits,
    then float32 (vLLM creates some parameters in float32 whatever the model dtype, Gated DeltaNet's ``A_log`` among
    them, and copies the checkpoint's values into them; float64 is no dtype a loader takes for a parameter)."""
    if stored is None or not stored.is_floating_point or stored.itemsize <= model_dtype.itemsize:
        return model_dtype
    return torch.float32


class Emitter:
    """Writes a unit's tensors to ``sink`` as the recipe and the output format say (``family``: a module of models/,
    for key names and which linears split their input in vLLM). ``quantize`` quantizes a linear with its scheme (the
    layout passes one that only works out the dtypes and shapes of what the scheme makes); ``times`` gets the
    "quantize" phase when given."""

    def __init__(self, family, recipe: Recipe, model_dtype: torch.dtype, sink: TensorSink,
                 quantize: Quantize = scheme_quantize, times: Optional[PhaseTimes] = None,
                 stored_dtype: Callable[[str], Optional[torch.dtype]] = lambda key: None):
        self.family, self.recipe, self.model_dtype, self.sink = family, recipe, model_dtype, sink
        self.output_format = formats.for_saver(recipe.saver)
        self._quantize, self._times, self._stored_dtype = quantize, times, stored_dtype

    def scheme(self, name: str) -> schemes.Scheme:
        return schemes.get(self.recipe.quant_type(name))

    def float(self, key: str, tensor: torch.Tensor) -> None:
        """A tensor written FLOAT: in the model's dtype, or in its stored dtype where that is wider (``stored_dtype``:
        the source's dtype of a key, None for a key the source does not have)."""
        self.sink.add(key, tensor.detach().to("cpu", wider_float(self.model_dtype, self._stored_dtype(key))),
                      schemes.FLOAT)

    def linear(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor], ranges: Optional[InputRanges],
               hessian: Optional[Hessian] = None) -> str:
        """Quantize one linear with the recipe's scheme for it and hand the format's tensors to the sink; returns the
        scheme's name. The scheme rounds where the weight is (the worker's compute device: a scheme does what needs
        float64 on the host itself); what it made comes to the host, where the format encodes it."""
        scheme, processor = self.scheme(name), self.recipe.linear_quant(name)
        weight, bias = weight.detach(), None if bias is None else bias.detach()
        spec = schemes.LinearSpec(name, processor and processor.act, processor and processor.weight,
                                  ranges.tensor_range(name) if scheme.needs_input_range else None, self.model_dtype,
                                  self.family.splits_input(name), hessian)
        with self._times.phase("quantize") if self._times is not None else contextlib.nullcontext():
            quantized = self._quantize(scheme, weight, bias, spec)
        quantized = quantized.map(lambda tensor: tensor.cpu())
        for key, tensor, quant_type in self.output_format.linear_entries(name, scheme.name, quantized, spec):
            self.sink.add(key, tensor, quant_type)
        return scheme.name

    def static_linears(self, prefix: str, module: nn.Module) -> dict[str, nn.Module]:
        """The linears of a piece whose scheme needs calibrated input ranges."""
        return {f"{prefix}.{name}": m for name, m in module.named_modules()
                if isinstance(m, nn.Linear) and self.scheme(f"{prefix}.{name}").needs_input_range}

    def module(self, prefix: str, module: nn.Module, ranges: Optional[InputRanges]) -> None:
        """Write every parameter of a piece: its linears per the recipe, everything else (norms, embeddings) FLOAT."""
        written = set()
        for name, m in module.named_modules():
            if isinstance(m, nn.Linear):
                self.linear(f"{prefix}.{name}", m.weight, m.bias, ranges)
                written |= {f"{name}.weight", f"{name}.bias"}
        for name, tensor in module.state_dict().items():
            if name not in written:
                self.float(f"{prefix}.{name}", tensor)

    def expert(self, layer_idx: int, expert: int, weights: tuple[torch.Tensor, ...],
               hessians: Optional[tuple[Optional[Hessian], ...]] = None) -> None:
        """One routed expert's projections (the family's EXPERT_PROJS order), each with its Hessian when given."""
        hessians = hessians or (None,) * len(weights)
        for proj, weight, hessian in zip(self.family.EXPERT_PROJS, weights, hessians):
            self.linear(self.family.expert_key(layer_idx, expert, proj), weight, None, None, hessian)

    def carry(self, keys: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
        """Source tensors the family carries unchanged (its ``carried``): FLOAT, in their own dtype."""
        for key, tensor in zip(keys, tensors):
            self.sink.add(key, tensor.detach().to("cpu"), schemes.FLOAT)

    def head(self, norm: torch.Tensor, lm_head: torch.Tensor) -> None:
        """The final norm and lm_head: never quantized (vLLM Ascend serves them in float)."""
        self.float(self.family.NORM_KEY, norm)
        self.float(self.family.LM_HEAD_KEY, lm_head)
