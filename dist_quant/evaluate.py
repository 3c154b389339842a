"""``dist-quant eval``: run a quantized checkpoint with the integer math vLLM Ascend executes, next to the float model.

Both models are built piece by piece from their own checkpoints (the quantized one is self-contained: its FLOAT
tensors are the rotated/smoothed ones), unit by unit of the same plan a quantization walks (runtime/interpret.py),
with bounded memory, on the same calibration-style inputs.
Per layer it reports how far the quantized hidden states are from the float ones (cosine similarity, relative error;
a QuaRot-rotated stream is rotated back first), and at the end the KL divergence of the final logits and the top-1
agreement.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from dist_quant.calib.inputs import ModelInputs
from dist_quant.checkpoint.fingerprint import checkpoint_fingerprint
from dist_quant.checkpoint.formats import ascendv1
from dist_quant.checkpoint.reader import CheckpointReader
from dist_quant.errors import CalibrationError, CheckpointError, show
from dist_quant.models.family import family_for, load_checked
from dist_quant.recipe import Recipe
from dist_quant.runtime.device import resolve_device
from dist_quant.runtime.driver import resolve_dataset
from dist_quant.runtime.interpret import finish_layer, interpret, running_sum, sample_contexts, sample_outputs
from dist_quant.runtime.plan import DEFAULT_EXPERT_GROUP_SIZE, Kind, Unit, plan_units, samples_of
from dist_quant.runtime.worker import MoeInput


def is_calibration_set(dataset: Path, recipe: Recipe, images: bool = True) -> bool:
    """Whether ``dataset`` is the set the recipe calibrates on (its ``dataset``, or the bundled photos or texts):
    evaluating on it measures the fit, not the accuracy on other samples."""
    try:
        return dataset.resolve() == resolve_dataset(None, recipe, images).resolve()
    except CalibrationError:  # the recipe's set is not on this machine: another set was given
        return False


def check_quantized_matches_float(checkpoint: ascendv1.Checkpoint, reader: CheckpointReader, config) -> None:
    """Refuse, from config.json files and safetensors headers alone, a quantized checkpoint made from another model
    (other layer count, widths, experts...): compared layer by layer it would still print a table of numbers.
    Also finds up front a tensor the served model would need and the checkpoint lacks."""
    family = family_for(config.model_type)
    quant_type = checkpoint.reader.config.get("model_type")
    if quant_type != config.model_type:
        raise CheckpointError(f"{checkpoint.path} is a quantization of a {show(quant_type)} model, not of the "
                              f"{config.model_type!r} model {reader.model_dir}; evaluate a checkpoint against the "
                              "float model it was made from")
    quant_config = family.load_config(checkpoint.reader.config, str(checkpoint.path / "config.json"))
    differences = family.config_differences(quant_config, config)
    if differences:
        more = f" (and {len(differences) - 2} more)" if len(differences) > 2 else ""
        raise CheckpointError(f"{checkpoint.path} is not a quantization of {reader.model_dir}: "
                              f"{'; '.join(differences[:2])}{more}; evaluate a checkpoint against the float model it "
                              "was made from")
    expected = family.served_shapes(config, reader)
    held = set(checkpoint.reader.keys())
    missing = sorted(set(expected) - held)
    if missing:
        raise CheckpointError(f"{checkpoint.path} has no tensor {missing[0]} ({len(missing)} missing), which the float "
                              f"model {reader.model_dir} has; the checkpoint is incomplete or of another model")
    def stored(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:  # packed weights (int4 in int8) by their type
        if not key.endswith(".weight"):
            return shape
        return ascendv1.stored_shape(checkpoint.description.get(key), tuple(shape))

    wrong = [k for k, shape in expected.items() if tuple(checkpoint.reader.shape(k)) != stored(k, shape)]
    if wrong:
        key = wrong[0]
        raise CheckpointError(f"tensor {key} in {checkpoint.reader.file_of(key)} has shape "
                              f"{checkpoint.reader.shape(key)}, but {expected[key]} in the float model "
                              f"{reader.model_dir}; evaluate a checkpoint against the float model it was made from")
    allowed = set(expected) | {f"{key[:-len('weight')]}{suffix}" for key in expected if key.endswith(".weight")
                               for suffix in ascendv1.role_suffixes()}
    extra = sorted(held - allowed)
    if extra:
        raise CheckpointError(f"{checkpoint.path} holds {len(extra)} tensor(s) the float model {reader.model_dir} "
                              f"has no place for ({', '.join(extra[:3])}); evaluate a checkpoint against the float "
                              "model it was made from")
    for key in expected:
        quant_type = checkpoint.description.get(key)
        base = key[:-len(".weight")]
        needed = [f"{base}.{role}" for role in ascendv1.needed_roles(quant_type) if f"{base}.{role}" not in held]
        if needed:
            raise CheckpointError(f"{checkpoint.path} has no tensor {needed[0]}, which its {quant_type} linear "
                                  f"{base} needs; the checkpoint is incomplete: quantize again")


# --- the two models, piece by piece ---------------------------------------------------------------------------------

class FloatModel:
    """The source model, built one piece at a time from its checkpoint, on ``device``."""

    def __init__(self, reader: CheckpointReader, config, dtype: torch.dtype,
                 device: torch.device = torch.device("cpu")):
        self.reader, self.config, self.dtype, self.device = reader, config, dtype, device
        self.family = family_for(config.model_type)  # a module of dist_quant/models/

    def read(self, key: str, shape: Optional[tuple[int, ...]] = None) -> torch.Tensor:
        return self.reader.get(key, dtype=self.dtype, shape=shape).to(self.device)

    def vision(self) -> nn.Module:  # moved: the tower's rotary table is built on the CPU
        return self.family.build_vision(self.config, self.read, self.dtype).to(self.device)

    def layer(self, layer_idx: int) -> nn.Module:
        return self.family.build_layer(self.config, layer_idx, self.read, self.dtype)

    def experts(self, layer_idx: int, first: int, stop: int) -> list[Callable]:
        weights = self.family.read_experts(self.reader, self.config, layer_idx, first, stop, self.dtype)
        act_fn = self.family.activation(self.config)
        return [self.family.float_expert(*(t.to(self.device) for t in w), act_fn) for w in weights]


EXACT_FLOAT64_DEVICES = ("cpu", "cuda")  # float64 matmuls in IEEE double: the served int32 sums stay exact there


class HostMath(nn.Module):
    """A served linear whose integer math runs on the CPU, for a device without exact float64 matmuls (an NPU's cube
    units multiply in 16/32-bit floats): the int32 sums the engine computes would otherwise round."""

    def __init__(self, served: nn.Module):
        super().__init__()
        self.served = served

    def _apply(self, fn, recurse=True):  # ``module.to(device)`` of a piece holding it leaves its math on the CPU
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.served(x.cpu()).to(x.device)


class ServedModel(FloatModel):
    """The quantized checkpoint as vLLM Ascend serves it: the integer math of each scheme's linears."""

    def __init__(self, checkpoint: ascendv1.Checkpoint, config, dtype: torch.dtype,
                 device: torch.device = torch.device("cpu")):
        super().__init__(checkpoint.reader, config, dtype, device)
        self.checkpoint = checkpoint

    def linear(self, name: str) -> nn.Module:
        """The served linear ``name`` on the evaluation device (its integer math on the CPU where that device would
        round it)."""
        served = self.checkpoint.linear(name)
        return served.to(self.device) if self.device.type in EXACT_FLOAT64_DEVICES else HostMath(served)

    def vision(self) -> nn.Module:
        return self.family.build_vision(self.config, None, self.dtype,
                                        load=lambda visual: self.served_module(visual, self.family.VISUAL)
                                        ).to(self.device)

    def layer(self, layer_idx: int) -> nn.Module:
        layer = self.family.meta_layer(self.config, layer_idx)
        return self.served_module(layer, self.family.layer_prefix(layer_idx)).eval()

    def served_module(self, module: nn.Module, prefix: str) -> nn.Module:
        """Replace every nn.Linear of a meta-device module by its served form, then load the rest (norms...)."""
        for name, child in list(module.named_modules()):
            if isinstance(child, nn.Linear):
                module.set_submodule(name, self.linear(f"{prefix}.{name}"))
        return self.family.materialize(module, lambda key, shape=None: self.checkpoint.float_tensor(key, shape).to(
            self.device), prefix, self.dtype)

    def experts(self, layer_idx: int, first: int, stop: int) -> list[Callable]:
        act_fn = self.family.activation(self.config)
        experts = []
        for e in range(first, stop):
            gate, up, down = (self.linear(self.family.expert_key(layer_idx, e, p)) for p in self.family.EXPERT_PROJS)
            experts.append(lambda x, g=gate, u=up, d=down: d(act_fn(g(x)) * u(x)))
        return experts


# --- metrics --------------------------------------------------------------------------------------------------------

@dataclass
class Comparison:
    name: str
    cosine: float  # mean over tokens of the cosine similarity of quantized and float vectors
    rel_error: float  # ||quantized - float|| / ||float|| over all tokens


@dataclass
class EvalReport:
    """What ``dist-quant eval --output`` writes. ``quant_path`` and ``checkpoint_fingerprint`` bind it to the
    checkpoint it measured; ``dataset`` names the images and ``held_out`` says whether they are other than the
    calibration set (figures on the calibration images are optimistic)."""
    float_path: str
    quant_path: str  # absolute
    samples: int
    tokens: int
    checkpoint_fingerprint: str = ""  # checkpoint_fingerprint(quant_path) when it was measured
    dataset: str = ""
    held_out: bool = False
    rows: list[Comparison] = field(default_factory=list)
    kl_divergence: float = 0.0  # mean over tokens of KL(float || quantized) of the next-token distributions
    top1_agreement: float = 0.0
    logits_rel_error: float = 0.0  # ||logits_q - logits_f|| / ||logits_f||

    def table(self) -> str:
        lines = [f"{'piece':<18} {'cosine':>9} {'rel. error':>11}"]
        lines += [f"{row.name:<18} {row.cosine:>9.5f} {row.rel_error:>11.5f}" for row in self.rows]
        lines.append(f"final logits: KL(float || quantized) = {self.kl_divergence:.6f} nats/token, "
                     f"top-1 agreement = {100 * self.top1_agreement:.2f}% over {self.tokens} tokens")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def compare(name: str, reference: list[torch.Tensor], other: list[torch.Tensor],
            rotation: Optional[torch.Tensor] = None) -> Comparison:
    """Compare token vectors; ``other`` lives in the rotated basis when a rotation is given (rotated back first)."""
    ref = torch.cat([r.reshape(-1, r.shape[-1]).cpu() for r in reference]).to(torch.float64)
    got = torch.cat([o.reshape(-1, o.shape[-1]).cpu() for o in other]).to(torch.float64)
    if rotation is not None:
        got = got @ rotation.T
    cosine = torch.nn.functional.cosine_similarity(got, ref, dim=-1, eps=1e-12).mean()
    return Comparison(name, float(cosine), float((got - ref).norm() / ref.norm().clamp_min(1e-30)))


def logit_metrics(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(mean KL(p_ref || p_other), top-1 agreement) over tokens: KL from the float model's next-token distribution
    p, i.e. sum p (log p - log q), large where the float model is confident and the quantized one is not."""
    reference, other = reference.cpu(), other.cpu()
    log_p = torch.log_softmax(reference.to(torch.float64), dim=-1)
    log_q = torch.log_softmax(other.to(torch.float64), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    agree = (reference.argmax(-1) == other.argmax(-1)).to(torch.float64).mean()
    return float(kl), float(agree)


# --- the side-by-side run -------------------------------------------------------------------------------------------

class ModelRunner:
    """``interpret.UnitCalls`` for one model: the float forward of each unit, nothing written. Results: the image
    embeddings (vision), the finished previous layer's hidden states (a layer unit that combines them), and
    ``(last layer's hidden states, logits)`` (head)."""

    def __init__(self, model: FloatModel, rotary: nn.Module):
        self.model, self.rotary, self.family = model, rotary, model.family

    @torch.no_grad()
    def images(self, unit: Unit, inputs: list[ModelInputs]):
        visual = self.model.vision()
        return {i: self.family.vision_forward(visual, inputs[i].pixel_values, inputs[i].image_grid_thw)
                for i in samples_of(unit, inputs, self.family, self.model.config)
                if inputs[i].pixel_values is not None}, None

    @torch.no_grad()
    def vision(self, unit: Unit, inputs: list[ModelInputs], *shares):
        vision = sample_outputs(shares, len(inputs))
        return vision, self.contexts(unit, inputs, vision), [v.image_embeds for v in vision if v is not None]

    def contexts(self, unit: Unit, inputs: list[ModelInputs], vision):
        """Each sample's positions and mask (``vision`` None: a family without a vision tower)."""
        return sample_contexts(self.family, self.model.config, self.rotary, inputs, vision, self.model.dtype,
                               self.model.device)

    gather = staticmethod(running_sum)

    @torch.no_grad()
    def embed(self, unit: Unit, inputs: list[ModelInputs], *shares):
        vision = sample_outputs(shares, len(inputs))
        embed = self.model.read(self.family.EMBED_KEY)
        return [self.family.place_images(self.model.config, nn.functional.embedding(ids, embed), ids, v)
                for ids, v in ((s.input_ids.to(embed.device), v) for s, v in zip(inputs, vision))], None

    @torch.no_grad()
    def layer(self, unit: Unit, contexts, hidden, *partials, combine: bool):
        if combine:
            hidden = finish_layer(self.family, unit.layer - 1, hidden, partials, contexts)
        block = self.model.layer(unit.layer)
        tc = self.model.config.get_text_config()
        streams, x = self.family.layer_forward(block, hidden, contexts, self.family.is_moe_layer(tc, unit.layer))
        if x is None:
            return streams, None, hidden if combine else None
        ids, weights = self.family.route(self.family.router_logits(block, x), tc.num_experts_per_tok, x.dtype)
        return streams, MoeInput(x, ids, weights), hidden if combine else None

    @torch.no_grad()
    def experts(self, unit: Unit, moe: MoeInput):
        experts = self.model.experts(unit.layer, unit.first_expert, unit.stop_expert)
        return self.family.expert_group_forward(moe.x, moe.topk_ids, moe.topk_weights, experts, unit.first_expert), None

    @torch.no_grad()
    def head(self, unit: Unit, contexts, hidden, *partials, combine: bool):
        tc = self.model.config.get_text_config()
        if combine:
            hidden = finish_layer(self.family, tc.num_hidden_layers - 1, hidden, partials, contexts)
        norm, lm_head = self.model.read(self.family.NORM_KEY), self.model.read(self.family.LM_HEAD_KEY)
        logits = torch.cat([(self.family.rms_norm(h, norm, tc.rms_norm_eps) @ lm_head.T).reshape(-1, lm_head.shape[0])
                            for h in hidden])
        return hidden, logits

    @staticmethod
    def carried(unit: Unit) -> None:
        """The carried tensors (Qwen3.5's MTP head) take no part in the model's forward."""
        return None


def evaluate(float_path: str, quant_path: str, inputs: list[ModelInputs],
             progress: Callable[[str], None] = lambda name: None,
             expert_group_size: int = DEFAULT_EXPERT_GROUP_SIZE, device: str = "cpu", dataset: str = "",
             held_out: bool = False) -> EvalReport:
    """Run the float and the served quantized model side by side, unit by unit of the plan, on ``device`` (cpu,
    cuda, npu), and compare them after the vision tower, after every layer and at the logits. ``dataset`` and
    ``held_out`` (the inputs' origin) are recorded in the report."""
    dtype = torch.float32
    where = resolve_device(device)
    family, reader, config = load_checked(float_path)
    checkpoint = ascendv1.Checkpoint(quant_path, dtype)
    check_quantized_matches_float(checkpoint, reader, config)
    rotary = family.build_text_rotary(config).to(where)
    rotation = checkpoint.rotation
    report = EvalReport(str(float_path), str(Path(quant_path).resolve()), len(inputs),
                        sum(s.input_ids.shape[1] for s in inputs), checkpoint_fingerprint(quant_path), dataset,
                        held_out)
    plan = plan_units(config, expert_group_size)
    runs = zip(interpret(plan, None, inputs, ModelRunner(FloatModel(reader, config, dtype, where), rotary)),
               interpret(plan, None, inputs, ModelRunner(ServedModel(checkpoint, config, dtype, where), rotary)))
    for (unit, reference), (_, served) in runs:
        compared = len(report.rows)
        if unit.kind is Kind.VISION and reference:  # text-only inputs have no image features to compare
            report.rows.append(compare("vision (merger)", reference, served, rotation))
        elif unit.kind is Kind.LAYER and reference is not None:
            report.rows.append(compare(f"layer {unit.layer - 1}", reference, served, rotation))
        elif unit.kind is Kind.HEAD:
            last = config.get_text_config().num_hidden_layers - 1
            report.rows.append(compare(f"layer {last}", reference[0], served[0], rotation))
            report.kl_divergence, report.top1_agreement = logit_metrics(reference[1], served[1])
            report.logits_rel_error = compare("logits", [reference[1]], [served[1]]).rel_error
        if len(report.rows) > compared:
            progress(report.rows[-1].name)
    return report
