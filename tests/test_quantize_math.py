"""Int8 primitives against hand-written arithmetic on small, fully worked examples."""

import torch

from dist_quant.algorithms.quantize import (
    activation_range_params,
    dynamic_w8a8_linear,
    quantize_weight_per_channel,
    static_w8a8_linear,
)
from dist_quant.checkpoint.formats.ascendv1 import linear_entries
from dist_quant.checkpoint.formats.ascendv1_encoding import deq_scale_values
from dist_quant.schemes import LinearSpec, w8a8, w8a8_dynamic
from helpers import ascend_roles


def test_weight_per_channel_worked_example():
    w = torch.tensor([[1.27, -0.635, 0.0], [0.0, 0.0, 0.0], [-2.54, 1.0, 0.5]])
    codes, scale = quantize_weight_per_channel(w)
    torch.testing.assert_close(scale, torch.tensor([0.01, 1.0, 0.02]))
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[127, -64, 0], [0, 0, 0], [-127, 50, 25]]  # -63.5 rounds half to even


def test_weights_from_bf16_never_hit_minus_128():
    w = torch.randn(64, 256).to(torch.bfloat16)
    codes, _ = quantize_weight_per_channel(w)
    assert int(codes.min()) >= -127


def test_activation_range_includes_zero_and_guards_empty_range():
    scale, offset = activation_range_params(0.5, 2.55)  # min clamped to 0
    torch.testing.assert_close(scale, torch.tensor([0.01]))
    assert offset.item() == -128.0
    scale, offset = activation_range_params(-1.0, 1.55)
    torch.testing.assert_close(scale, torch.tensor([0.01]))
    assert offset.item() == round(1.0 / scale.item()) - 128
    scale, offset = activation_range_params(0.0, 0.0)
    assert scale.item() == 1.0 and offset.item() == -128.0


def test_static_linear_matches_hand_computation():
    w = torch.tensor([[0.5, -0.25], [0.1, 0.2]])
    bias = torch.tensor([0.3, -0.1])
    t = ascend_roles(w8a8.SCHEME, w, bias, LinearSpec(input_range=(-1.0, 1.55), model_dtype=torch.bfloat16))
    s = 2.55 / 255
    o = round(1.0 / s) - 128
    assert t["input_offset"].item() == o == -28
    ws = [0.5 / 127, 0.2 / 127]
    assert t["weight"].tolist() == [[127, -64], [64, 127]]
    torch.testing.assert_close(t["deq_scale"], torch.tensor([s * ws[0], s * ws[1]]))
    assert t["quant_bias"].dtype == torch.int32
    for n, row in enumerate(t["weight"].tolist()):
        expected = round(bias[n].item() / (s * ws[n]) - o * sum(row))
        assert abs(t["quant_bias"][n].item() - expected) <= 1  # float32 vs float64 of the hand computation
    assert t["bias"].dtype == torch.float32


def test_fp16_models_store_deq_scale_as_int64_bits():
    """docs/FORMAT.md: the ascendv1 format stores deq_scale as its float32 bits in int64 for every model not in
    bfloat16 (msModelSlim's rule; vLLM Ascend's W8A8 ``get_perchannel_param``: float32 for bfloat16 serving, int64
    for float16, the dtype vLLM serves a float32 model in by default)."""
    w = torch.randn(8, 16)

    def stored_deq_scale(dtype):
        spec = LinearSpec(input_range=(-1, 1), model_dtype=dtype)
        entries = linear_entries("l", "W8A8", w8a8.SCHEME.quantize(w, None, spec), spec)
        return next(tensor for key, tensor, _ in entries if key == "l.deq_scale")

    fp16, bf16 = stored_deq_scale(torch.float16), stored_deq_scale(torch.bfloat16)
    assert fp16.dtype == torch.int64 and bf16.dtype == torch.float32
    assert torch.equal(stored_deq_scale(torch.float32), fp16)
    assert torch.equal(deq_scale_values(fp16), bf16)
    assert int(fp16[0]) == int.from_bytes(bf16[0].numpy().tobytes(), "little")


def test_static_runtime_equals_integer_arithmetic():
    torch.manual_seed(0)
    w, bias, x = torch.randn(5, 7), torch.randn(5), torch.randn(3, 7)
    t = ascend_roles(w8a8.SCHEME, w, bias, LinearSpec(input_range=(float(x.min()), float(x.max())),
                                                model_dtype=torch.bfloat16))
    y = static_w8a8_linear(x, t["weight"], t["quant_bias"], t["deq_scale"], t["input_scale"], t["input_offset"])
    s, o = t["input_scale"].item(), t["input_offset"].item()
    for i in range(3):
        xq = [max(-128, min(127, round(v / s + o))) for v in x[i].tolist()]
        for n in range(5):
            acc = sum(a * b for a, b in zip(xq, t["weight"][n].tolist())) + int(t["quant_bias"][n])
            assert abs(y[i, n].item() - acc * t["deq_scale"][n].item()) <= 1e-6 * max(1.0, abs(acc))
    reference = torch.nn.functional.linear(x, w, bias)
    assert float((y - reference).norm() / reference.norm()) < 0.05


def test_dynamic_runtime_equals_integer_arithmetic():
    torch.manual_seed(1)
    w, x = torch.randn(4, 6), torch.randn(2, 6)
    t = ascend_roles(w8a8_dynamic.SCHEME, w, None, LinearSpec())
    assert t["weight_scale"].shape == (4, 1) and torch.equal(t["weight_offset"], torch.zeros(4, 1))
    y = dynamic_w8a8_linear(x, t["weight"], t["weight_scale"])
    for i in range(2):
        a_s = max(abs(v) for v in x[i].tolist()) / 127
        xq = [round(v / a_s) for v in x[i].tolist()]
        for n in range(4):
            acc = sum(a * b for a, b in zip(xq, t["weight"][n].tolist()))
            assert abs(y[i, n].item() - acc * a_s * t["weight_scale"][n, 0].item()) < 1e-5
