"""Hostile numbers and shapes: weights the schemes' float32 and int32 math would overflow on, calibration statistics
that overflowed, expert shapes W4A8 cannot pack, and a save_path on a read-only file system. Each is one error that
names the linear (or the path), raised before the scheme's work; the bounds are tested just under and just over.
"""

import contextlib
import math
import re
from pathlib import Path

import pytest
import torch

from dist_quant.algorithms.gptq import Hessian
from dist_quant.algorithms.int4 import ssz_scale
from dist_quant.errors import CalibrationError, CheckpointError, OutputError, RecipeError
from dist_quant.schemes import SCHEMES, LinearSpec
from dist_quant.schemes.base import QSpec
from dist_quant.synthetic import make_tiny_model
from helpers import Q_PROJ, ascend_roles, mounted_tmpfs, refused, rewrite_tensor

F32_MAX = 3.4028234663852886e38  # (2 - 2**-23) * 2**127
BF16_MAX = 3.3895313892515355e38  # (2 - 2**-7) * 2**127
W4A8_RECIPE = Path(__file__).parents[1] / "dist_quant" / "configs" / "qwen3_vl_moe_w4a8.yaml"
NAME = "model.language_model.layers.0.mlp.experts.3.gate_proj"


def f32_below(x: float) -> float:
    """The largest float32 below x (x itself not a float32)."""
    value = torch.tensor(x, dtype=torch.float32)
    return float(value if float(value) < x else torch.nextafter(value, torch.tensor(0.0)))


def f32_above(x: float) -> float:
    value = torch.tensor(x, dtype=torch.float32)
    return float(value if float(value) > x else torch.nextafter(value, torch.tensor(math.inf)))


def spec_for(scheme: str, **fields) -> LinearSpec:
    s = SCHEMES[scheme]
    return LinearSpec(**{"name": NAME, "act": s.act, "weight": s.weight,
                         "input_range": (-1.0, 1.0) if s.needs_input_range else None, **fields})


def weight_with_peak(peak: float, out: int = 8, inputs: int = 64, seed: int = 0) -> torch.Tensor:
    """A Gaussian float32 weight scaled so that its largest magnitude is ``peak`` (one entry exactly)."""
    w = torch.randn(out, inputs, generator=torch.Generator().manual_seed(seed))
    w = w / w.abs().max() * 0.5
    w[0, 0] = peak
    return w


# --- non-finite weights: what rotation or smoothing can make of a finite source weight ------------------------------

@pytest.mark.parametrize("scheme", ["FLOAT", "W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weight_is_refused_naming_the_linear(scheme, bad):
    weight = weight_with_peak(1.0)
    weight[3, 5] = bad
    with pytest.raises(CheckpointError) as error:
        ascend_roles(SCHEMES[scheme], weight, None, spec_for(scheme))
    assert str(error.value).startswith(f"linear {NAME}: its weight holds NaN or Inf after rotation and smoothing")


# --- FLOAT: a weight is stored in the source dtype ------------------------------------------------------------------

def test_float_refuses_a_weight_beyond_the_source_dtype():
    """bfloat16's largest value is kept as it is; the next float32 above it would be stored as Inf."""
    spec = spec_for("FLOAT", model_dtype=torch.bfloat16)
    kept = ascend_roles(SCHEMES["FLOAT"], weight_with_peak(BF16_MAX), None, spec)["weight"]
    assert kept.dtype == torch.bfloat16 and float(kept[0, 0]) == BF16_MAX
    over = f32_above(BF16_MAX)
    message = f"linear {NAME}: its largest weight magnitude {over:.9g} is above {BF16_MAX:.9g}, the most FLOAT can take"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        ascend_roles(SCHEMES["FLOAT"], weight_with_peak(over), None, spec)


# --- int8 schemes: any finite weight; static W8A8's integer math ------------------------------------------------

@pytest.mark.parametrize("scheme", ["W8A8", "W8A8_DYNAMIC"])
def test_int8_schemes_take_the_largest_float32_weight(scheme):
    """``max|W| / 127`` is finite for every finite weight: the codes are exact, the scale is peak / 127."""
    quantized = SCHEMES[scheme].quantize(weight_with_peak(F32_MAX), None, spec_for(scheme))
    assert quantized.codes[0, 0] == 127 and math.isclose(float(quantized.scale[0]), F32_MAX / 127, rel_tol=1e-6)
    roles = ascend_roles(SCHEMES[scheme], weight_with_peak(F32_MAX), None, spec_for(scheme))  # and it is stored
    assert torch.equal(roles["weight"], quantized.codes)


@pytest.mark.parametrize("input_range", [(-math.inf, 1.0), (0.0, math.nan)])
def test_w8a8_refuses_an_overflowed_input_range(input_range):
    """What a 3e38 weight upstream made: the calibration inputs of the next static linear reached Inf, which gave a
    NaN input_offset that crashed at publish."""
    spec = LinearSpec(NAME, SCHEMES["W8A8"].act, SCHEMES["W8A8"].weight, input_range)
    with pytest.raises(CalibrationError, match=rf"linear {NAME}: its calibrated input range overflowed float32"):
        ascend_roles(SCHEMES["W8A8"], weight_with_peak(1.0), None, spec)


def test_w8a8_refuses_an_input_scale_beyond_float32():
    """A finite range wider than float32's largest value: ``(max - min) / 255`` is Inf, and so is deq_scale."""
    spec = LinearSpec(NAME, SCHEMES["W8A8"].act, SCHEMES["W8A8"].weight, (-3e38, 3e38))
    with pytest.raises(CheckpointError, match=rf"linear {NAME}: its deq_scale \(input_scale \* weight_scale\) leaves"):
        ascend_roles(SCHEMES["W8A8"], weight_with_peak(1.0), None, spec)


@pytest.mark.parametrize("sign", [1, -1])
def test_w8a8_quant_bias_is_refused_just_beyond_int32(sign):
    """One row [127, 0, 0, 0]: weight_scale 1, codes [127, 0, 0, 0]. Input range [0, 255/256]: input_scale 2^-8,
    input_offset -128. So quant_bias = 256 b + 128 * 127: b = 8388544 gives 2147483520 and b = -8388671 gives
    -2147483520, within int32; one more (in magnitude) and it is past int32, where the cast would wrap it."""
    weight = torch.tensor([[127.0, 0.0, 0.0, 0.0]])
    spec = LinearSpec(NAME, SCHEMES["W8A8"].act, SCHEMES["W8A8"].weight, (0.0, 255 / 256))
    inside = 8388544.0 if sign > 0 else -8388671.0
    roles = ascend_roles(SCHEMES["W8A8"], weight, torch.tensor([inside]), spec)
    assert int(roles["quant_bias"][0]) == sign * 2147483520
    outside = inside + sign
    assert not -2**31 <= 256 * outside + 16256 <= 2**31 - 1
    with pytest.raises(CheckpointError, match=rf"linear {NAME}: its quant_bias .* beyond int32 .* W8A8_DYNAMIC"):
        ascend_roles(SCHEMES["W8A8"], weight, torch.tensor([outside]), spec)


# --- W4A8_DYNAMIC: ssz's float32 sums ---------------------------------------------------------------------------------

def w4a8_limit(inputs: int) -> float:
    """Independent of the scheme's code: a scale is at most max|W|, codes in [-8, 7], so a residual is at most
    9 max|W| and a row's sum of squared residuals at most 81 * inputs * max|W|^2 <= float32's largest value."""
    return math.sqrt(F32_MAX / (81 * inputs))


@pytest.mark.parametrize("method", ["ssz", "minmax"])
def test_w4a8_weight_bound_just_under_and_just_over(method):
    spec = spec_for("W4A8_DYNAMIC", weight=QSpec("per_channel", "int4", True, method))
    limit = w4a8_limit(64)
    roles = ascend_roles(SCHEMES["W4A8_DYNAMIC"], weight_with_peak(f32_below(limit)), None, spec)
    assert all(bool(torch.isfinite(t).all()) for t in roles.values() if t.is_floating_point())
    tail = re.escape(f"is above {limit:.9g}, the most W4A8_DYNAMIC can take for a [8, 64] weight")
    with pytest.raises(CheckpointError, match=rf"linear {NAME}: its largest weight magnitude \S+ {tail}"):
        ascend_roles(SCHEMES["W4A8_DYNAMIC"], weight_with_peak(f32_above(limit)), None, spec)


def test_w4a8_under_the_bound_is_exactly_the_scaled_result():
    """Scaling a weight by a power of two scales every float32 step exactly, so below the bound ssz's scale is the
    scaled scale of the small weight and the codes are the same. Far above it, its squared residuals overflow and it
    silently keeps the min/max scale: the bound is what makes the answer the right one."""
    small = weight_with_peak(1.0)
    power = 2.0 ** math.floor(math.log2(w4a8_limit(64)))
    spec = spec_for("W4A8_DYNAMIC")
    scaled = ascend_roles(SCHEMES["W4A8_DYNAMIC"], small * power, None, spec)
    assert torch.equal(scaled["weight_scale"][:, 0], ssz_scale(small) * power)
    assert torch.equal(scaled["weight"], ascend_roles(SCHEMES["W4A8_DYNAMIC"], small, None, spec)["weight"])
    huge = small * 2.0 ** 100
    assert not torch.equal(ssz_scale(huge), ssz_scale(small) * 2.0 ** 100)
    with pytest.raises(CheckpointError):
        ascend_roles(SCHEMES["W4A8_DYNAMIC"], huge, None, spec)


def test_w4a8_gptq_refuses_an_overflowed_gram_matrix_before_cholesky():
    gram = torch.eye(64, dtype=torch.float64)
    gram[2, 2] = math.inf  # X^T X accumulated in float32 from inputs above ~1.8e19
    spec = spec_for("W4A8_DYNAMIC", weight=QSpec("per_channel", "int4", True, "gptq"), hessian=Hessian(gram))
    with pytest.raises(CalibrationError, match=rf"linear {NAME}: the Gram matrix of its calibration inputs "
                                               "overflowed float32"):
        ascend_roles(SCHEMES["W4A8_DYNAMIC"], weight_with_peak(1.0), None, spec)


# --- W4A8_DYNAMIC: shapes it cannot pack or vLLM Ascend cannot load ---------------------------------------------------

@pytest.mark.parametrize("shape, input_split, problem", [
    ((48, 64), False, None),
    ((64, 48), True, None),  # the tiny model's down_proj: 48 inputs, three per scale_bias chunk
    ((64, 40), False, None),  # gate/up: the input is not split
    ((64, 40), True, "needs an input size that is a multiple of 16 for a row-parallel linear"),
    ((41, 64), False, "needs an output size that is a multiple of 8"),  # odd: cannot be packed two per byte
    ((12, 64), False, "needs an output size that is a multiple of 8"),  # even, but not whole int32 words
])
def test_w4a8_check_shape(shape, input_split, problem):
    found = SCHEMES["W4A8_DYNAMIC"].check_shape(NAME, shape, input_split)
    assert found is None if problem is None else (found.startswith(f"{NAME} {list(shape)}: W4A8_DYNAMIC ")
                                                  and problem in found)
    for other in ("FLOAT", "W8A8", "W8A8_DYNAMIC"):
        assert SCHEMES[other].check_shape(NAME, shape, input_split) is None


@pytest.mark.parametrize("shape, input_split", [((41, 64), False), ((64, 40), True)])
def test_w4a8_quantize_refuses_what_check_shape_refuses(shape, input_split):
    """Before the fix: a ValueError from deep in the packing (odd rows) or in scale_bias (the 16 chunks)."""
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RecipeError, match=rf"{NAME} \[{shape[0]}, {shape[1]}\]: W4A8_DYNAMIC needs"):
        ascend_roles(SCHEMES["W4A8_DYNAMIC"], weight, None, spec_for("W4A8_DYNAMIC", input_split=input_split))


# --- through the CLI: one line, nothing finished ----------------------------------------------------------------------

def test_cli_refuses_w4a8_experts_it_cannot_pack(capsys, tmp_path, calib_index):
    """moe_intermediate_size 40: down_proj's 40 inputs do not split into scale_bias's 16 chunks. Refused by the
    layout pass, before any unit runs (nothing is kept for a resume)."""
    model = make_tiny_model(tmp_path / "model", num_layers=2, vision_depth=2, deepstack=(0,),
                            moe_intermediate_size=40)
    err = refused(capsys, model, tmp_path / "out", calib_index, "--config_path", str(W4A8_RECIPE))
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "model.language_model.layers.0.mlp.experts.0.down_proj [64, 40]: W4A8_DYNAMIC needs an input size that " \
           "is a multiple of 16" in err
    assert not (tmp_path / "out").exists()  # refused with the recipe, before the save folder is made


def test_cli_refuses_a_weight_of_3e38_naming_the_linear_it_overflows(capsys, model, tmp_path, calib_index):
    """The issue's case: q_proj holds one 3e38 (finite in float32): the attention's output overflows and the next
    static linear's input range is Inf. Before the fix the NaN input_offset crashed the loader check at publish."""
    def poison(t):
        t.view(-1)[7] = 3e38
        return t
    rewrite_tensor(model, Q_PROJ, poison)
    err = refused(capsys, model, tmp_path / "out", calib_index)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "linear model.language_model.layers.0.self_attn.o_proj: its calibrated input range overflowed " \
           "float32" in err


# --- save_path on a read-only file system ----------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(name, options)``: a folder on a real tmpfs mounted with ``options`` (the test skips where this machine
    cannot mount: that needs root with CAP_SYS_ADMIN), unmounted after the test."""
    with contextlib.ExitStack() as mounts:
        def mount(name: str, options: str) -> Path:
            folder = mounts.enter_context(mounted_tmpfs(tmp_path / name, options))
            if folder is None:
                pytest.skip("cannot mount a tmpfs here")
            return folder
        yield mount


@pytest.fixture
def read_only_folder(tmpfs):
    """An existing folder on a read-only file system: permissions do not stop root, a read-only file system does."""
    return tmpfs("ro", "ro,size=1m")


def test_save_lock_on_a_read_only_file_system(read_only_folder):
    from dist_quant.checkpoint.save_lock import SaveLock
    with pytest.raises(OutputError) as error:
        SaveLock(read_only_folder)
    assert str(error.value) == (f"cannot create the lock file {read_only_folder / '.dist_quant.lock'}: Read-only "
                                "file system; choose a save_path you can write to")


def test_cli_save_path_on_a_read_only_file_system(capsys, tiny_model, read_only_folder, calib_index):
    err = refused(capsys, tiny_model, read_only_folder, calib_index)
    assert err == (f"dist-quant: error: cannot create the lock file {read_only_folder / '.dist_quant.lock'}: "
                   "Read-only file system; choose a save_path you can write to\n")


@pytest.fixture
def small_folder(tmpfs):
    """An empty folder on a 1 MiB file system: nearly full."""
    return tmpfs("small", "size=1m")


def test_a_save_path_without_the_space_for_the_checkpoint_is_refused_before_any_unit(capsys, tiny_model, small_folder,
                                                                                      calib_index):
    """The part files' size is known once the layout is: a file system with less free space is refused before
    any unit runs (part files are sparse, so the full disk would otherwise show only hours later)."""
    err = refused(capsys, tiny_model, small_folder / "out", calib_index)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(r"the checkpoint needs \d+\.\d\d GiB more on the file system of .*out, which has 0\.00 GiB "
                     r"free: free some space or choose another --save_path", err), err
    assert not list(small_folder.rglob("*.safetensors"))
