"""What each unit of a plan writes, before any unit runs: (key, dtype, shape) of every tensor, in order.

The unit's pieces are built on fake tensors (no data, no forward) from the checkpoint's headers and emitted through
the worker's own ``Emitter``, with a quantizer that quantizes each kind of linear once: the dtypes and shapes of what
a scheme makes depend only on the weight's shape and dtype, the bias, the qconfig and the source dtype. The writer
places every tensor in its part file from this (checkpoint/writer.py ``set_layout``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dist_quant import schemes
from dist_quant.recipe import Recipe
from dist_quant.runtime.emit import Emitter
from dist_quant.runtime.plan import Kind, Unit, carried_share

Entry = tuple[str, torch.dtype, tuple[int, ...]]


class _Recorder:
    """A sink that only notes what it is given."""

    def __init__(self):
        self.entries: list[Entry] = []

    def add(self, key: str, tensor: torch.Tensor, quant_type: str) -> None:
        self.entries.append((key, tensor.dtype, tuple(tensor.shape)))


class _AnyRanges:
    """Input ranges for fake pieces: a range of any value gives the same tensors' dtypes and shapes."""

    @staticmethod
    def tensor_range(name: str) -> tuple[float, float]:
        return -1.0, 1.0


class _KindShapes:
    """A quantizer for fake weights: runs the scheme once per kind of linear (under the fake mode: no data) and
    answers empty tensors of the dtypes and shapes it gave."""

    def __init__(self):
        self._kinds: dict[tuple, schemes.QuantizedLinear] = {}

    def __call__(self, scheme: schemes.Scheme, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 spec: schemes.LinearSpec) -> schemes.QuantizedLinear:
        kind = (scheme.name, tuple(weight.shape), weight.dtype, bias is None, spec.act, spec.weight, spec.model_dtype,
                spec.input_split)
        if kind not in self._kinds:
            self._kinds[kind] = scheme.quantize(weight, bias, spec)
        return self._kinds[kind].map(lambda t: torch.empty(t.shape, dtype=t.dtype))


def unit_entries(family, reader, config, recipe: Recipe, plan: list[Unit],
                 compute_dtype: torch.dtype = torch.float32) -> list[tuple[str, list[Entry]]]:
    """[(unit id, [(key, dtype, shape), ...]), ...]: what each unit of ``plan`` writes, in the order it writes them,
    for a checkpoint (``reader``, its checked ``config``, its ``family`` module) and a recipe."""
    recorder = _Recorder()
    emit = Emitter(family, recipe, reader.dtype(family.EMBED_KEY), recorder, _KindShapes(),
                   stored_dtype=reader.stored_dtype)
    layout = []
    carried = family.carried(reader, config) if any(u.kind is Kind.CARRIED for u in plan) else []
    with FakeTensorMode():
        def read(key: str, shape: Optional[tuple[int, ...]] = None) -> torch.Tensor:
            reader.check(key, shape)
            return torch.empty(reader.shape(key), dtype=compute_dtype)

        for unit in plan:
            recorder.entries = []
            if unit.kind is Kind.VISION:
                emit.module(family.VISUAL, family.build_vision(config, read, compute_dtype), _AnyRanges())
            elif unit.kind is Kind.EMBED:
                emit.float(family.EMBED_KEY, read(family.EMBED_KEY))
            elif unit.kind is Kind.LAYER:
                layer = family.build_layer(config, unit.layer, read, compute_dtype)
                emit.module(family.layer_prefix(unit.layer), layer, _AnyRanges())
            elif unit.kind is Kind.EXPERTS:
                shapes = family.expert_shapes(config)
                for expert in range(unit.first_expert, unit.stop_expert):
                    emit.expert(unit.layer, expert, tuple(torch.empty(s, dtype=compute_dtype) for s in shapes))
            elif unit.kind is Kind.HEAD:
                emit.head(read(family.NORM_KEY), read(family.LM_HEAD_KEY))
            elif unit.kind is Kind.CARRIED:
                for index in carried_share([entry.params for entry in carried], unit.share, unit.shares):
                    entry = carried[index]
                    emit.carry(entry.keys, tuple(torch.empty(s, dtype=entry.dtype) for s in entry.shapes))
            layout.append((unit.id, recorder.entries))  # Kind.IMAGES writes nothing
    return layout
