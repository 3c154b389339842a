"""The evaluator: its int8 linears equal hand-written integer arithmetic exactly, an all-FLOAT checkpoint evaluates
as identical to the float model, and a W8A8 checkpoint is close but not identical."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from dist_quant.calib.dataset import load_samples
from dist_quant.calib.inputs import build_model_inputs
from dist_quant.checkpoint.formats import ascendv1
from dist_quant.cli import main
from dist_quant.evaluate import ServedModel, checkpoint_fingerprint, evaluate, logit_metrics
from dist_quant.models.family import load_checked
from dist_quant.schemes import LinearSpec, w8a8, w8a8_dynamic
from helpers import LAYERS, PLAIN_RECIPE, ascend_roles, ascend_served, float_only, moe_layers, quantize, text_config


def test_static_linear_equals_integer_arithmetic_exactly():
    torch.manual_seed(0)
    w, b, x = torch.randn(6, 40), torch.randn(6), torch.randn(5, 40) * 3
    spec = LinearSpec(input_range=(float(x.min()), float(x.max())), model_dtype=torch.bfloat16)
    t = ascend_roles(w8a8.SCHEME, w, b, spec)
    y = ascend_served(w8a8.NAME, t)(x)
    s, o = t["input_scale"].item(), t["input_offset"].item()
    for i in range(5):
        xq = [max(-128, min(127, int(torch.round(torch.tensor(v) / s + o)))) for v in x[i].tolist()]
        for n in range(6):
            acc = sum(a * c for a, c in zip(xq, t["weight"][n].tolist())) + int(t["quant_bias"][n])
            expected = torch.tensor(acc * t["deq_scale"][n].double().item(), dtype=torch.float64).float()
            assert y[i, n].item() == expected.item()


def test_dynamic_linear_equals_integer_arithmetic_exactly():
    torch.manual_seed(1)
    w, x = torch.randn(4, 33), torch.randn(3, 33)
    t = ascend_roles(w8a8_dynamic.SCHEME, w, None, LinearSpec())
    y = ascend_served(w8a8_dynamic.NAME, t)(x)
    for i in range(3):
        a_s = (x[i].abs().max() / 127).item()
        xq = [int(torch.round(torch.tensor(v) / torch.tensor(a_s))) for v in x[i].tolist()]
        for n in range(4):
            acc = sum(a * c for a, c in zip(xq, t["weight"][n].tolist()))
            expected = torch.tensor(acc * a_s * t["weight_scale"][n, 0].double().item(), dtype=torch.float64)
            assert y[i, n].item() == expected.float().item()


def family_inputs(family_model):
    """The calibration inputs of the family's tiny model, images or text as its family reads them."""
    images = family_model.model_type == "qwen3_vl_moe"  # the text family reads text only
    return build_model_inputs(family_model.model, load_samples(family_model.dataset, images=images), images=images)


def test_all_float_checkpoint_evaluates_as_the_float_model(family_model, tmp_path, monkeypatch):
    """quant refuses a recipe that quantizes nothing (a user's typo); this checkpoint is made that way on purpose,
    with that one refusal lifted in this process, to show that identical weights compare as identical."""
    from dist_quant.runtime import assignments

    monkeypatch.setattr(assignments, "check_linear_quants_apply", lambda *args: None)
    model = family_model.model
    save = quantize(model, family_model.dataset, tmp_path / "q", float_only(PLAIN_RECIPE, tmp_path))
    report = evaluate(str(model), str(save), family_inputs(family_model))
    assert report.kl_divergence == pytest.approx(0.0, abs=1e-12) and report.top1_agreement == 1.0
    assert all(row.rel_error == 0.0 for row in report.rows)


def test_w8a8_checkpoint_is_close_and_the_cli_writes_json(family_model, family_checkpoint, tmp_path, capsys):
    model, calib_index, save = family_model.model, family_model.dataset, family_checkpoint
    out = tmp_path / "report.json"
    assert main(["eval", "--model_path", str(model), "--quant_path", str(save), "--dataset", str(calib_index),
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    vision = ["vision (merger)"] if family_model.model_type == "qwen3_vl_moe" else []  # the text family has none
    layers = text_config(model)["num_hidden_layers"]
    assert [row["name"] for row in report["rows"]] == vision + [f"layer {i}" for i in range(layers)]
    assert all(0.99 < row["cosine"] < 1.0 and 0 < row["rel_error"] < 0.1 for row in report["rows"])
    assert 0 < report["kl_divergence"] < 0.01 and report["top1_agreement"] > 0.8
    printed = capsys.readouterr()
    assert "top-1 agreement" in printed.out
    assert report["quant_path"] == str(save.resolve())
    assert report["checkpoint_fingerprint"] == checkpoint_fingerprint(save)
    assert report["held_out"] is True and report["dataset"] == str(calib_index.resolve())  # the user's word


def test_fingerprint_binds_the_checkpoint_not_its_place(checkpoints, tmp_path):
    """A copy keeps it, a report written beside it keeps it; one changed scale byte or another quantization not."""
    import shutil

    save = checkpoints["W8A8_DYNAMIC"]
    copy = Path(shutil.copytree(save, tmp_path / "copy"))
    (copy / "eval.json").write_text("{}")
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(save) != checkpoint_fingerprint(
        checkpoints["W4A8_DYNAMIC"])
    part = next(copy.glob("*.safetensors"))
    data = bytearray(part.read_bytes())
    data[len(data) // 16] ^= 1  # a byte of tensor data inside the second sampled block
    part.write_bytes(bytes(data))
    assert checkpoint_fingerprint(copy) != checkpoint_fingerprint(save)


def test_eval_device_choices(tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--model_path", str(tiny_model), "--quant_path", str(tmp_path), "--device", "tpu"])
    assert "--device" in capsys.readouterr().err


def test_eval_of_something_that_is_not_a_checkpoint(tiny_model, tmp_path, calib_index, capsys):
    assert main(["eval", "--model_path", str(tiny_model), "--quant_path", str(tmp_path),
                 "--dataset", str(calib_index)]) == 2
    assert "quant_model_description.json" in capsys.readouterr().err


# --- eval's served paths against integer references written here from the checkpoint's own tensors ---------------

def raw_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read with safetensors itself (not dist-quant's reader)."""
    tensors = {}
    for part in folder.glob("*.safetensors"):
        with safe_open(str(part), "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FORMAT.md's dynamic activations: a per-token scale max|x| / 127 and int8 codes round(x / scale)."""
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    return torch.clamp(torch.round(x / scale), -128, 127).to(torch.int64), scale


def int_matmul(codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Exact int64 sums of code products (the engine's int32 accumulation)."""
    return (codes[:, None, :] * weight.to(torch.int64)[None, :, :]).sum(-1)


def static_reference(t: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """W8A8: x_q = clamp(round(x / s + o)), y = (x_q @ W^T + quant_bias) * deq_scale (int64 in a float32 model)."""
    s, o = t[f"{name}.input_scale"], t[f"{name}.input_offset"]
    codes = torch.clamp(torch.round(x / s + o), -128, 127).to(torch.int64)
    deq = t[f"{name}.deq_scale"]
    deq = deq.to(torch.int32).view(torch.float32) if deq.dtype == torch.int64 else deq
    acc = int_matmul(codes, t[f"{name}.weight"]) + t[f"{name}.quant_bias"].to(torch.int64)
    return (acc.double() * deq.double()).float()


def dynamic_reference(t: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """W8A8_DYNAMIC: int8 per-token activations, int8 weight codes, y = acc * a_s * w_s."""
    codes, scale = int8_per_token(x)
    return (int_matmul(codes, t[f"{name}.weight"]).double() * scale.double()
            * t[f"{name}.weight_scale"].double().T).float()


def w4a8_reference(t: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """W4A8_DYNAMIC as the A8W4 kernel computes it (docs/w4a8-loader-facts.md 4.2): int4 codes unpacked from the
    nibbles (low = even output row), each int8 activation split into x_hi = floor(x_q / 16) and x_lo = (x_q & 15) - 8,
    y = a_s * (16 w_s (x_hi @ W^T) + w_s (x_lo @ W^T) + scale_bias summed over its chunks)."""
    packed = t[f"{name}.weight"].to(torch.int64)
    low, high = packed & 0xF, (packed >> 4) & 0xF
    nibbles = torch.stack([low, high], dim=1).reshape(2 * packed.shape[0], packed.shape[1])
    weight = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    codes, scale = int8_per_token(x)
    x_hi, x_lo = torch.div(codes, 16, rounding_mode="floor"), (codes & 0xF) - 8
    ws = t[f"{name}.weight_scale"].double().T
    y = 16 * ws * int_matmul(x_hi, weight).double() + ws * int_matmul(x_lo, weight).double()
    return (scale.double() * (y + t[f"{name}.scale_bias"].double().sum(dim=1))).float()


REFERENCES = {"W8A8": static_reference, "W8A8_DYNAMIC": dynamic_reference, "W4A8_DYNAMIC": w4a8_reference}


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).norm() / expected.double().norm())


def served(tiny_model, save) -> ServedModel:
    _, _, config = load_checked(str(tiny_model))
    return ServedModel(ascendv1.Checkpoint(save, torch.float32), config, torch.float32)


def with_int4_experts(tmp_path) -> Path:
    """plain_w8a8.yaml with its experts in W4A8_DYNAMIC (int4 min/max weights)."""
    recipe = yaml.safe_load(PLAIN_RECIPE.read_text())
    recipe["spec"]["process"][1]["qconfig"]["weight"].update(dtype="int4", method="minmax")
    path = tmp_path / "plain_w4a8.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def checkpoints(family_model, family_checkpoint, tmp_path_factory):
    """The family's tiny model quantized with its preset (experts W8A8_DYNAMIC) and with int4 experts."""
    folder = tmp_path_factory.mktemp("served")
    return {"W8A8_DYNAMIC": family_checkpoint,
            "W4A8_DYNAMIC": quantize(family_model.model, family_model.dataset, folder / "w4a8",
                                     with_int4_experts(folder))}


TIGHT = 1e-6  # float32 rounding of the same exact sums; dropping the int8 activations moves outputs by ~1e-2


@pytest.mark.parametrize("experts", ["W8A8_DYNAMIC", "W4A8_DYNAMIC"])
def test_served_experts_are_the_engines_integer_math(family_model, checkpoints, experts):
    """Each routed expert eval runs is silu(gate(x)) * up(x) into down, every projection the scheme's integer math."""
    save = checkpoints[experts]
    t, model = raw_tensors(save), served(family_model.model, save)
    description = json.loads((save / "quant_model_description.json").read_text())
    torch.manual_seed(2)
    x = torch.randn(7, 64) * 2
    layers = moe_layers(family_model.model)
    for layer in (layers[0], layers[-1]):
        for e, expert in enumerate(model.experts(layer, 0, 8)):
            key = f"{LAYERS[family_model.model_type]}.{layer}.mlp.experts.{e}"
            assert {description[f"{key}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")} == {experts}
            gate, up = (REFERENCES[experts](t, f"{key}.{p}", x) for p in ("gate_proj", "up_proj"))
            expected = REFERENCES[experts](t, f"{key}.down_proj", torch.nn.functional.silu(gate) * up)
            assert relative(expert(x), expected) < TIGHT, key


def test_served_attention_and_vision_linears_are_static_w8a8(family_model, checkpoints):
    save = checkpoints["W8A8_DYNAMIC"]
    t, model = raw_tensors(save), served(family_model.model, save)
    torch.manual_seed(3)
    layer = model.layer(1)
    modules = [(layer, f"{LAYERS[family_model.model_type]}.1", 64)]
    if family_model.model_type == "qwen3_vl_moe":  # the vision tower's linears, of the family that has one
        modules.append((model.vision(), "model.visual", 32))
    for module, prefix, width in modules:
        names = ("self_attn.q_proj", "self_attn.o_proj") if module is layer else ("blocks.2.attn.qkv",
                                                                                 "blocks.2.mlp.linear_fc1")
        for name in names:
            linear = module.get_submodule(name)
            x = torch.randn(5, linear.weight.shape[1] if hasattr(linear, "weight") else width)
            assert relative(linear(x), static_reference(t, f"{prefix}.{name}", x)) < TIGHT, name


def test_kl_divergence_is_from_the_float_distribution():
    """KL(p || q), p the float model's: on p = (.5, .25, .25), q = (.1, .2, .7) it is 0.6031 nats, where KL(q || p)
    is 0.5152; the second token agrees (KL 0, same top-1), the first does not."""
    p, q = [0.5, 0.25, 0.25], [0.1, 0.2, 0.7]
    reference = torch.tensor([p, [0.2, 0.7, 0.1]], dtype=torch.float64).log()
    # logits: a shift changes no probability
    other = torch.tensor([q, [0.2, 0.7, 0.1]], dtype=torch.float64).log() + 3.0
    kl, agree = logit_metrics(reference, other)
    expected = 0.5 * math.log(0.5 / 0.1) + 0.25 * math.log(0.25 / 0.2) + 0.25 * math.log(0.25 / 0.7)
    assert kl == pytest.approx(expected / 2, rel=1e-12) and agree == 0.5
