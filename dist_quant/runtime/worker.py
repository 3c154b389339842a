"""The worker: executes units of work (read, calibrate, quantize, write) on one device.

Plain Python with no Ray import: the single-card mode calls it directly and the Ray actor is a thin shell around it,
so the two modes cannot drift. A worker holds the weights of one unit at a time; its outputs are the float
activations the next unit needs, and its quantized tensors go straight to the sink.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode  # shapes without data: Worker.entries

from dist_quant import failpoints, schemes
from dist_quant.algorithms import hadamard, quarot
from dist_quant.algorithms.gptq import Hessian
from dist_quant.calib.inputs import ModelInputs
from dist_quant.calib.ranges import InputRanges
from dist_quant.checkpoint import formats
from dist_quant.checkpoint.reader import CheckpointReader
from dist_quant.errors import CalibrationError, RecipeError
from dist_quant.models import outliers
from dist_quant.models.family import VisionOutput, family_of
from dist_quant.recipe import Recipe
from dist_quant.runtime.assignments import check_recipe_for_model
from dist_quant.runtime.device import DEFAULT_COMPUTE_THREADS, set_compute_threads
from dist_quant.runtime.interpret import sample_contexts, sample_outputs
from dist_quant.runtime.plan import ROW_CHUNK, Kind, Unit
from dist_quant.runtime.timing import PhaseTimes


def stream_rotation(recipe: Recipe, config) -> Optional[quarot.BlockRotation]:
    """The recipe's rotation of the text residual stream (None without a quarot processor), checked orthogonal."""
    if recipe.quarot is None:
        return None
    hidden = config.get_text_config().hidden_size
    if hidden % recipe.quarot.block_size:
        raise RecipeError(f"recipe {recipe.path}: quarot block_size {recipe.quarot.block_size} does not divide the "
                          f"hidden size {hidden}")
    block = hadamard.random_hadamard(recipe.quarot.block_size, recipe.quarot.seed)
    hadamard.check_orthogonal(block, "the QuaRot rotation block")
    return quarot.BlockRotation(block, hidden)


def export_rotation(writer, recipe: Recipe, config) -> None:
    """QuaRot's rotation goes to the format's side file, when it has one, and the description points to it
    (docs/FORMAT.md)."""
    rotation = stream_rotation(recipe, config)
    side = writer.output_format.rotation_file(rotation.dense()) if rotation is not None else None
    if side is not None:
        path, tensors, optional = side
        writer.add_optional(path, tensors)
        writer.set_optional_description(optional)


def checkpoint_entries(model_path: str, recipe: Recipe, plan: list[Unit]) -> list[tuple[str, list]]:
    """[(unit id, [(key, dtype, shape), ...]), ...]: what each unit of ``plan`` writes, in order (Worker.entries)."""
    worker = Worker(model_path, recipe, _Recorder(), compute_threads=torch.get_num_threads())
    return [(unit.id, [entry[:3] for entry in worker.entries(unit)]) for unit in plan]


class TensorSink(Protocol):
    def add(self, key: str, tensor: torch.Tensor, quant_type: str) -> None: ...


class _Recorder:
    """A sink that only notes what it is given (Worker.entries)."""

    def __init__(self):
        self.entries: list[tuple[str, torch.dtype, tuple[int, ...], str]] = []

    def add(self, key: str, tensor: torch.Tensor, quant_type: str) -> None:
        self.entries.append((key, tensor.dtype, tuple(tensor.shape), quant_type))


class _UnitRanges:
    """Input ranges for Worker.entries: a range of any value gives the same tensors' dtypes and shapes."""

    @staticmethod
    def tensor_range(name: str) -> tuple[float, float]:
        return -1.0, 1.0


_UNIT_RANGES = _UnitRanges()


@dataclass
class ImagesOutput:
    """A share of the vision forward: the outputs of its samples (by sample index) and the per-channel input ranges
    the tower's static linears saw (merged across shares by min and max: exact, whatever the shares)."""

    outputs: dict[int, VisionOutput]
    channel_min: dict[str, torch.Tensor]
    channel_max: dict[str, torch.Tensor]


@dataclass
class MoeInput:
    """The normalised MLP input of all calibration tokens (samples concatenated) and their routing."""

    x: torch.Tensor  # [T, H]
    topk_ids: torch.Tensor  # [T, k]
    topk_weights: torch.Tensor  # [T, k]


@dataclass
class LayerOutput:
    stream: list[torch.Tensor]  # post-attention residual stream per sample, (1, S, H); for a dense layer the output
    moe: Optional[MoeInput]  # None for a dense-MLP layer


class Worker:
    """Executes units on one device, reading only the source tensors each unit needs. The checkpoint is checked
    against its config once, by the driver (``models.family.load_checked``), before any worker starts."""

    def __init__(self, model_path, recipe: Recipe, sink: TensorSink, device: torch.device = torch.device("cpu"),
                 compute_dtype: torch.dtype = torch.float32, compute_threads: int = DEFAULT_COMPUTE_THREADS):
        set_compute_threads(compute_threads)  # the same count in every process: the same bits (see device.py)
        self.reader = CheckpointReader(model_path)
        self.family = family_of(self.reader.config, f"{model_path}/config.json")  # a module of models/
        self.config = self.family.load_config(self.reader.config, f"{model_path}/config.json")
        check_recipe_for_model(recipe, self.config)
        self.recipe = recipe
        self.output_format = formats.for_saver(recipe.saver)  # how a scheme's roles are written
        self.sink = sink
        self.device = device
        self.compute_dtype = compute_dtype
        self.model_dtype = self.reader.dtype(self.family.EMBED_KEY)
        self._rotary = self.family.build_text_rotary(self.config).to(device)
        self.rotation = stream_rotation(recipe, self.config)
        if self.rotation is not None:
            head_dim = self.family.heads(self.config.get_text_config())[2]
            self.head_rotation = hadamard.head_rotation(head_dim, recipe.quarot.block_size, recipe.quarot.seed)
            hadamard.check_orthogonal(self.head_rotation, "the QuaRot head rotation")
            self.rotation = self.rotation.to(device)
        self.times = PhaseTimes()  # seconds per phase (timing.PHASES)
        self.expert_tokens: dict[int, list[int]] = {}  # calibration tokens routed to each expert, per MoE layer
        self._reader_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._prefetched: dict[tuple[int, int, int], Future] = {}
        self._tower: Optional[nn.Module] = None  # the rotated vision tower, from ``images`` to ``vision``
        self.on_image: Optional[Callable[[int, int], None]] = None  # (done, of) after each image's vision forward
        self._faking = False  # while ``entries`` runs
        self._role_shapes: dict = {}  # what ``entries`` worked out for each kind of linear

    # --- helpers ----------------------------------------------------------------------------------------------------

    def _read(self, key: str, shape: Optional[tuple[int, ...]] = None) -> torch.Tensor:
        with self._loading():
            return self.reader.get(key, dtype=self.compute_dtype, shape=shape).to(self.device)

    def _loading(self):
        """Phases "read" (the reader's I/O in this thread) and "convert" (the rest) of loading weights."""
        return self.times.split("convert", "read", lambda: self.reader.io_seconds)

    def _float(self, key: str, tensor: torch.Tensor) -> None:
        self.sink.add(key, tensor.detach().to("cpu", self.model_dtype), schemes.FLOAT)

    def _emit_linear(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     ranges: Optional[InputRanges], hessian: Optional[Hessian] = None) -> str:
        """Quantize one linear with the recipe's scheme for it and hand the format's tensors to the sink."""
        scheme, processor = self._scheme(name), self.recipe.linear_quant(name)
        weight, bias = weight.detach().cpu(), None if bias is None else bias.detach().cpu()
        spec = schemes.LinearSpec(name, processor and processor.act, processor and processor.weight,
                                  ranges.tensor_range(name) if scheme.needs_input_range else None, self.model_dtype,
                                  self.family.splits_input(name), hessian)
        with self.times.phase("quantize"):
            roles = self._quantize(scheme, weight, bias, spec)
        for key, tensor, quant_type in self.output_format.linear_entries(name, scheme.name, roles, self.model_dtype):
            self.sink.add(key, tensor, quant_type)
        return scheme.name

    def _quantize(self, scheme: schemes.Scheme, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  spec: schemes.LinearSpec) -> dict[str, torch.Tensor]:
        """``scheme.quantize``; in ``entries`` (fake tensors) each kind of linear is worked out once: a scheme's roles'
        dtypes and shapes depend on the weight's shape and dtype, the bias, the qconfig and the source dtype only."""
        if not self._faking:
            return scheme.quantize(weight, bias, spec)
        kind = (scheme.name, tuple(weight.shape), weight.dtype, bias is None, spec.act, spec.weight, spec.model_dtype,
                spec.input_split)
        if kind not in self._role_shapes:
            self._role_shapes[kind] = {role: (t.dtype, tuple(t.shape))
                                       for role, t in scheme.quantize(weight, bias, spec).items()}
        return {role: torch.empty(shape, dtype=dtype) for role, (dtype, shape) in self._role_shapes[kind].items()}

    def _static_linears(self, prefix: str, module: nn.Module) -> dict[str, nn.Module]:
        """The linears of a piece whose scheme needs calibrated input ranges."""
        return {f"{prefix}.{name}": m for name, m in module.named_modules()
                if isinstance(m, nn.Linear) and self._scheme(f"{prefix}.{name}").needs_input_range}

    def _scheme(self, name: str) -> schemes.Scheme:
        return schemes.get(self.recipe.quant_type(name))

    def _emit_module(self, prefix: str, module: nn.Module, ranges: Optional[InputRanges]) -> None:
        """Write every parameter of a piece: its linears per the recipe, everything else (norms, embeddings) FLOAT."""
        written = set()
        for name, m in module.named_modules():
            if isinstance(m, nn.Linear):
                self._emit_linear(f"{prefix}.{name}", m.weight, m.bias, ranges)
                written |= {f"{name}.weight", f"{name}.bias"}
        for name, tensor in module.state_dict().items():
            if name not in written:
                self._float(f"{prefix}.{name}", tensor)

    # --- units ------------------------------------------------------------------------------------------------------

    def _vision_tower(self) -> nn.Module:
        """The vision tower with its stream writers rotated (QuaRot), kept from ``images`` when it ran here."""
        if self._tower is None:
            self._tower = self.family.build_vision(self.config, self._read, self.compute_dtype)
            if self.rotation is not None:
                with self.times.phase("rotate"):
                    outliers.rotate_vision_writers(self._tower, self.family.VISION_STREAM_WRITERS, self.rotation)
        return self._tower

    @torch.no_grad()
    def images(self, inputs: list[ModelInputs], indexes: list[int], keep_tower: bool) -> ImagesOutput:
        """Vision forward on those of the samples ``indexes`` that have an image, one at a time, recording the input
        ranges of the tower's static linears; ``keep_tower``: hold the tower for this worker's ``vision`` unit. A
        share without an image (more actors than images, text-only samples) builds no tower."""
        if not keep_tower and all(inputs[index].pixel_values is None for index in indexes):
            return ImagesOutput({}, {}, {})
        visual = self._vision_tower()
        outputs: dict[int, VisionOutput] = {}
        images = sum(inputs[index].pixel_values is not None for index in indexes)
        with InputRanges(self._static_linears(self.family.VISUAL, visual)) as ranges, self.times.phase("forward"):
            for index in indexes:
                sample = inputs[index]
                if sample.pixel_values is not None:
                    outputs[index] = self.family.vision_forward(visual, sample.pixel_values, sample.image_grid_thw)
                    failpoints.reach("vision")
                    if self.on_image is not None:
                        self.on_image(len(outputs), images)
        if not keep_tower:
            self._tower = None
        return ImagesOutput(outputs, ranges.channel_min, ranges.channel_max)

    @torch.no_grad()
    def vision(self, shares: list[ImagesOutput], samples: int) -> list[Optional[VisionOutput]]:
        """Static-quantize the tower's linears from the input ranges of every share of the images and write the
        tower; returns the vision outputs of the ``samples`` samples in order (None for a text-only one)."""
        visual = self._vision_tower()
        self._tower = None
        ranges = InputRanges.merged([(share.channel_min, share.channel_max) for share in shares])
        self._emit_module(self.family.VISUAL, visual, ranges)
        return sample_outputs([share.outputs for share in shares], samples)

    @torch.no_grad()
    def contexts(self, inputs: list[ModelInputs], vision: Optional[list[Optional[VisionOutput]]]) -> list:
        """Each sample's positions and mask from its vision output (``vision`` None: a family without a tower)."""
        return sample_contexts(self.family, self.config, self._rotary, inputs, vision, self.compute_dtype,
                               self.device)

    def _float_rows(self, key: str, transform: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """A vocabulary-sized float tensor (embeddings, lm_head) read, transformed (``transform(rows, first)``) and
        converted to the model dtype ROW_CHUNK rows at a time: memory holds its output and one chunk, never the whole
        of it in float32 (151936 x 4096 is 2.3 GiB per float32 copy)."""
        self.reader.check(key)
        shape = self.reader.shape(key)
        out = torch.empty(shape, dtype=self.model_dtype)
        for first in range(0, shape[0], ROW_CHUNK):
            stop = min(first + ROW_CHUNK, shape[0])
            with self._loading():
                rows = self.reader.get_slice(key, first, stop, dtype=self.compute_dtype).to(self.device)
            out[first:stop] = transform(rows, first).to("cpu", self.model_dtype)
        return out

    @torch.no_grad()
    def embed(self, inputs: list[ModelInputs], vision: list[Optional[VisionOutput]]) -> list[torch.Tensor]:
        """Input embeddings of every sample (image features scattered in); writes embed_tokens. The calibration
        stream starts from the float32 (rotated) rows of the tokens the samples use, kept as the chunks go by."""
        ids = [s.input_ids.to(self.device) for s in inputs]
        used = torch.unique(torch.cat([i.reshape(-1) for i in ids]))
        vocab = self.reader.shape(self.family.EMBED_KEY)[0]
        if len(used) and not 0 <= int(used[0]) <= int(used[-1]) < vocab:
            raise CalibrationError(f"token ids {int(used[0])}..{int(used[-1])} of the calibration samples are outside "
                                   f"the {vocab} rows of {self.family.EMBED_KEY}: "
                                   "the tokenizer does not match the model")
        table = torch.empty(len(used), self.config.get_text_config().hidden_size, dtype=self.compute_dtype,
                            device=self.device)

        def rotate_and_keep(rows: torch.Tensor, first: int) -> torch.Tensor:
            if self.rotation is not None:
                with self.times.phase("rotate"):
                    rows = quarot.rotate_embedding(rows, self.rotation)
            here = (used >= first) & (used < first + rows.shape[0])
            table[here] = rows[used[here] - first]
            return rows

        self._float(self.family.EMBED_KEY, self._float_rows(self.family.EMBED_KEY, rotate_and_keep))
        return [self.family.place_images(self.config, table[torch.searchsorted(used, i)], i, v)
                for i, v in zip(ids, vision)]

    @torch.no_grad()
    def layer(self, layer_idx: int, hidden: list[torch.Tensor], contexts: list) -> LayerOutput:
        """A decoder layer without its experts (attention, norms, router or dense MLP): calibrate, quantize, write;
        returns the post-attention stream (a dense layer's complete output) and the MoE input."""
        block = self.family.build_layer(self.config, layer_idx, self._read, self.compute_dtype)
        hidden = [h.to(self.device) for h in hidden]  # from another actor or a saved stream: may be on the CPU
        prefix = self.family.layer_prefix(layer_idx)
        tc = self.config.get_text_config()
        moe, kind = self.family.is_moe_layer(tc, layer_idx), self.family.layer_kind(tc, layer_idx)
        if self.rotation is not None:
            with self.times.phase("rotate"):
                outliers.rotate_block(block, self.family.LAYER_ROTATION[kind], self.rotation, self.head_rotation,
                                      self.family.heads(tc))
        observed = self._static_linears(prefix, block)
        for name in outliers.smoothing_inputs(prefix, self.recipe.smooth, self.family.LAYER_SMOOTHING[kind]):
            observed[name] = block.get_submodule(name[len(prefix) + 1:])
        with InputRanges(observed) as ranges, self.times.phase("forward"):
            streams, x = self.family.layer_forward(block, hidden, contexts, moe)
        if self.recipe.smooth is not None:
            with self.times.phase("smooth"):
                outliers.smooth_block(block, prefix, self.family.LAYER_SMOOTHING[kind], ranges, self.recipe.smooth,
                                      self.family.heads(tc))
        moe_input = None
        if moe:
            ids, weights = self.family.route(self.family.router_logits(block, x), tc.num_experts_per_tok, x.dtype)
            moe_input = MoeInput(x, ids, weights)
            self.expert_tokens[layer_idx] = torch.bincount(
                ids.reshape(-1), minlength=tc.num_experts).tolist()
        self._emit_module(prefix, block, ranges)
        return LayerOutput(streams, moe_input)

    def _read_experts(self, layer_idx: int, first: int, stop: int) -> list:
        with self._loading():
            experts = self.family.read_experts(self.reader, self.config, layer_idx, first, stop, self.compute_dtype)
            experts = [tuple(w.to(self.device) for w in e) for e in experts]
        if self.rotation is not None:
            post_norm = self._read(f"{self.family.layer_prefix(layer_idx)}.{self.family.EXPERT_READER_NORM}.weight")
            with self.times.phase("rotate"):
                outliers.rotate_experts(experts, post_norm, self.rotation)
        return experts

    def prefetch_next_experts(self, units: list, position: int) -> None:
        """Start reading the weights of the first expert group after ``units[position]`` in the background, so the
        read overlaps the units before it (a worker holds the unit it computes plus this one)."""
        upcoming = next((u for u in units[position + 1:] if u.kind is Kind.EXPERTS), None)
        if upcoming is None:
            return
        key = (upcoming.layer, upcoming.first_expert, upcoming.stop_expert)
        if key not in self._prefetched:
            self._prefetched[key] = self._reader_thread.submit(self._read_experts, *key)

    @torch.no_grad()
    def experts(self, layer_idx: int, first: int, stop: int, moe: MoeInput) -> torch.Tensor:
        """Experts ``first..stop-1`` of a layer: partial MoE output on their routed tokens, then quantize and write."""
        moe = MoeInput(moe.x.to(self.device), moe.topk_ids.to(self.device), moe.topk_weights.to(self.device))
        pending = self._prefetched.pop((layer_idx, first, stop), None)
        experts = pending.result() if pending is not None else self._read_experts(layer_idx, first, stop)
        act_fn = self.family.activation(self.config)
        with self.times.phase("forward"):
            partial = self.family.expert_group_forward(moe.x, moe.topk_ids, moe.topk_weights,
                                                       [self.family.float_expert(*e, act_fn) for e in experts], first)
        for expert, weights in zip(range(first, stop), experts):
            hessians = self._expert_hessians(layer_idx, expert, weights, moe, act_fn)
            self._emit_expert(layer_idx, expert, weights, hessians)
            del hessians
            failpoints.reach("experts")
        return partial

    def _expert_hessians(self, layer_idx: int, expert: int, weights: tuple[torch.Tensor, ...], moe: MoeInput,
                      act_fn) -> tuple[Optional[Hessian], ...]:
        """``X^T X`` of each projection's inputs over the tokens routed to the expert (gate and up: the tokens;
        down: ``act(gate x) * up x``), for a scheme that asks for them (GPTQ rounding); Nones otherwise, or when no
        token was routed to it. Gate and up share one object: its factorisation is done once."""
        projs = self.family.EXPERT_PROJS
        none = (None,) * len(projs)
        key = self.family.expert_key(layer_idx, expert, projs[0])
        processor = self.recipe.linear_quant(key)
        if not self._scheme(key).needs_hessian(processor and processor.weight):
            return none
        routed = (moe.topk_ids == expert).any(dim=-1)
        if not bool(routed.any()):
            return none
        with self.times.phase("forward"):
            x = moe.x[routed].to(torch.float32)
            gate, up, _ = (w.to(torch.float32) for w in weights)
            hidden = act_fn(x @ gate.T) * (x @ up.T)
            x_hessian, hidden_hessian = Hessian.of_inputs(x), Hessian.of_inputs(hidden)
        return x_hessian, x_hessian, hidden_hessian

    def _emit_expert(self, layer_idx: int, expert: int, weights: tuple[torch.Tensor, ...],
                     hessians: Optional[tuple[Optional[Hessian], ...]] = None) -> None:
        hessians = hessians or (None,) * len(weights)
        for proj, weight, hessian in zip(self.family.EXPERT_PROJS, weights, hessians):
            self._emit_linear(self.family.expert_key(layer_idx, expert, proj), weight, None, None, hessian)

    @torch.no_grad()
    def head(self) -> None:
        """Final norm and lm_head: never quantized (vLLM Ascend serves them in float)."""
        norm = self._read(self.family.NORM_KEY)

        def rotate(rows: torch.Tensor, first: int) -> torch.Tensor:
            if self.rotation is None:
                return rows
            with self.times.phase("rotate"):
                return outliers.rotate_head(norm, rows, self.rotation)

        lm_head = self._float_rows(self.family.LM_HEAD_KEY, rotate)
        self._emit_head(torch.ones_like(norm) if self.rotation is not None else norm, lm_head)

    def _emit_head(self, norm: torch.Tensor, lm_head: torch.Tensor) -> None:
        self._float(self.family.NORM_KEY, norm)
        self._float(self.family.LM_HEAD_KEY, lm_head)

    # --- what a unit writes, without running it ---------------------------------------------------------------------

    def entries(self, unit: Unit) -> list[tuple[str, torch.dtype, tuple[int, ...], str]]:
        """(key, dtype, shape, quant type) of every tensor ``unit`` writes, in the order it writes them, from the
        checkpoint's headers and the recipe alone: the unit's own emission code run on fake tensors (no data, no
        forward), so the writer can place each tensor in its part file before any unit runs."""
        recorder = _Recorder()
        sink, self.sink = self.sink, recorder
        self._faking = True
        family = self.family
        try:
            with FakeTensorMode():
                def read(key: str, shape: Optional[tuple[int, ...]] = None) -> torch.Tensor:
                    self.reader.check(key, shape)
                    return torch.empty(self.reader.shape(key), dtype=self.compute_dtype)

                if unit.kind is Kind.IMAGES:
                    pass  # writes nothing
                elif unit.kind is Kind.VISION:
                    self._emit_module(family.VISUAL, family.build_vision(self.config, read, self.compute_dtype),
                                      _UNIT_RANGES)
                elif unit.kind is Kind.EMBED:
                    self._float(family.EMBED_KEY, read(family.EMBED_KEY))
                elif unit.kind is Kind.LAYER:
                    self._emit_module(family.layer_prefix(unit.layer),
                                      family.build_layer(self.config, unit.layer, read, self.compute_dtype),
                                      _UNIT_RANGES)
                elif unit.kind is Kind.EXPERTS:
                    shapes = family.expert_shapes(self.config)
                    for expert in range(unit.first_expert, unit.stop_expert):
                        self._emit_expert(unit.layer, expert, tuple(torch.empty(s, dtype=self.compute_dtype)
                                                                    for s in shapes))
                else:
                    self._emit_head(read(family.NORM_KEY), read(family.LM_HEAD_KEY))
        finally:
            self.sink, self._faking = sink, False
        return recorder.entries
