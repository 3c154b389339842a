"""The plan from config.json alone, on the real 235B and 30B configs of Qwen3-VL-MoE and of the text-only Qwen3-MoE
(no weights exist in these tests, except the tiny models of the output estimate)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

from dist_quant.cli import main
from dist_quant.models.family import sizes_config_of
from dist_quant.models.qwen3_vl_moe import load_config
from dist_quant.recipe import DEFAULT_RECIPE, load_recipe
from dist_quant.runtime.plan import (
    OBJECT_STORE_STREAMS,
    RUNTIME_OVERHEAD,
    GiB,
    Kind,
    Unit,
    assign_units,
    build_plan,
    image_share,
    plan_units,
    unit_peak_bytes,
)
from dist_quant.runtime.runner import can_see
from helpers import FAMILY_TYPES, text_calibration_set

DATA = Path(__file__).parent / "data"
RECIPES = DEFAULT_RECIPE.parent
PARAMS = {"Qwen3-VL-235B-A22B": 235.67e9, "Qwen3-VL-30B-A3B": 31.07e9,  # public parameter counts (the model cards)
          "Qwen3-235B-A22B-Instruct-2507": 235e9, "Qwen3-30B-A3B": 30.5e9}  # the text family's


def config_of(name):
    """The config of a reference model as the plan reads it (Qwen3-VL-MoE: transformers' config, whose vision tower
    the test builds; the text family: its torch-free sizes config, as `dist-quant plan` reads every family)."""
    raw = json.loads((DATA / f"{name}.config.json").read_text())
    return config_of_raw(raw), raw


def config_of_raw(raw: dict):
    return load_config(raw) if raw["model_type"] == "qwen3_vl_moe" else sizes_config_of(raw)


@pytest.mark.parametrize("name", sorted(PARAMS))
@pytest.mark.parametrize("workers", [1, 3, 8])
def test_plan_counts_every_byte_once(name, workers):
    """Every source byte is read once, except the vision tower: once by each actor (its share of the images); a
    text-only model has no images or vision units, and every byte is read once."""
    config, raw = config_of(name)
    vision = raw["model_type"] == "qwen3_vl_moe"
    plan = build_plan(config, raw, workers, recipe=load_recipe(RECIPES / f"{raw['model_type']}_w8a8.yaml"))
    tc = config.get_text_config()
    kinds = [u.kind for u in plan.units]
    assert kinds.count(Kind.LAYER) == tc.num_hidden_layers
    assert kinds.count(Kind.EXPERTS) == tc.num_hidden_layers * (tc.num_experts // 16)
    assert kinds.count(Kind.EMBED) == kinds.count(Kind.HEAD) == 1
    assert kinds.count(Kind.VISION) == vision and kinds.count(Kind.IMAGES) == workers * vision
    tower = 0
    if vision:
        assert all(plan.actors[s].units[0] == Unit(Kind.IMAGES, share=s, shares=workers) for s in range(workers))
        with torch.device("meta"):  # the tower as transformers builds it
            tower = sum(p.numel() for p in Qwen3VLMoeVisionModel._from_config(config.vision_config).parameters()) * 2
    assert sum(a.read_bytes for a in plan.actors) == plan.source_bytes + (workers - 1) * tower
    assert plan.source_bytes == pytest.approx(PARAMS[name] * 2, rel=0.005)  # bf16
    assert all(plan.fits(a) for a in plan.actors)
    groups = [sum(u.kind is Kind.EXPERTS for u in a.units) for a in plan.actors]
    assert max(groups) - min(groups) <= 1 + tc.num_hidden_layers // 8  # balanced to within a few groups


def test_expert_groups_of_each_layer_spread_over_all_actors():
    config, _ = config_of("Qwen3-VL-235B-A22B")
    units = plan_units(config)
    owners = assign_units(units, 8)
    for layer in range(3):
        assert sorted(o for u, o in zip(units, owners) if u.kind is Kind.EXPERTS and u.layer == layer) == list(range(8))


@pytest.mark.parametrize("name", ["Qwen3-VL-235B-A22B", "Qwen3-235B-A22B-Instruct-2507"])
def test_plan_command_reads_only_the_config(tmp_path, capsys, name):
    shutil.copy(DATA / f"{name}.config.json", tmp_path / "config.json")
    assert main(["plan", "--model_path", str(tmp_path), "--workers", "8"]) == 0
    out = capsys.readouterr().out
    assert "94 layers, 128 experts (top-8)" in out and "752 experts" in out and out.count(" yes ") == 8
    model_type = json.loads((DATA / f"{name}.config.json").read_text())["model_type"]
    assert f"recipe {model_type}_w8a8.yaml" in out  # the preset of the config's family
    assert main(["plan", "--model_path", str(tmp_path), "--workers", "1", "--card_memory_gb", "4"]) == 1
    assert " NO " in capsys.readouterr().out


def test_memory_estimate_is_units_not_model():
    config, raw = config_of("Qwen3-VL-235B-A22B")
    plan = build_plan(config, raw, 1)
    assert plan.actors[0].peak_bytes < 16 * GiB < plan.source_bytes


def test_memory_estimate_counts_what_a_unit_holds():
    """The estimate's parts, counted by hand at 235B width (docs/benchmarks.md, "Real width", has the measurements
    they were checked against): an expert group holds its float32 weights and activations, plus the larger of the next
    group being read (bf16 and float32 at once) and its own output beside that group's float32; a Ray actor's layer
    and expert units also map the object store's pages, its first units (the images) do not."""
    config, raw = config_of("Qwen3-VL-235B-A22B")
    tokens, hidden, group = 2839, 4096, 16 * 3 * 4096 * 1536
    single = build_plan(config, raw, 1, calib_tokens=tokens)
    peaks = dict(zip(single.actors[0].units, single.actors[0].unit_peaks))
    experts = Unit(Kind.EXPERTS, 0, 16, 32)
    output = group * 1 + 16 * (2 * 1536 + 4096) * 2 * 4  # int8 codes; per-channel scale and offset (float32)
    by_hand = group * 4 + 5 * tokens * hidden * 4 + max(group * (4 + 2), group * 4 + output)
    assert abs(peaks[experts] - by_hand) < 0.01 * by_hand
    mapped = OBJECT_STORE_STREAMS * tokens * hidden * 4
    for unit in (Unit(Kind.IMAGES, share=0, shares=2), Unit(Kind.LAYER, 0), experts):
        args = (config, unit, 10**9, 10**8, 2, tokens, group)
        extra = mapped if unit.kind is not Kind.IMAGES else 0
        assert unit_peak_bytes(*args, object_store=True) - unit_peak_bytes(*args) == extra
    assert single.actors[0].peak_bytes == max(single.actors[0].unit_peaks) + RUNTIME_OVERHEAD


def test_shared_filesystem_probe(tmp_path):
    probe = tmp_path / "probe"
    probe.write_text("token")
    assert can_see(str(probe), "token")
    assert not can_see(str(probe), "other")
    assert not can_see(str(tmp_path / "missing"), "token")


def test_time_projection_scales_with_cards_and_bandwidth():
    from dist_quant.runtime.cost import Hardware, project

    config, raw = config_of("Qwen3-VL-235B-A22B")

    def projected(workers, hw=None, **plan_options):
        plan = build_plan(config, raw, workers, **plan_options)
        return project(plan, config, raw, 16384, hw or Hardware(), compute_threads=1)

    times = {n: projected(n).seconds for n in (1, 8, 32)}
    assert times[1] > times[8] >= times[32]  # 8 expert groups of 16 per layer: at most 8 cards share a layer
    small_groups = projected(32, group_size=4).seconds
    assert small_groups < times[32]  # 32 groups of 4 per layer keep 32 cards busy
    slow_disk = projected(8, Hardware(storage_read_gbps=0.5))
    assert slow_disk.seconds > times[8] and slow_disk.read_s > 4 * projected(8).read_s * 0.99
    # reading 439 GiB once at 2 GiB/s per node is a hard floor for one node
    assert times[8] > 470e9 / 2e9


# docs/benchmarks.md, "W4A8 rounding near its floor" and "Hessians one expert ahead": one host thread, per expert of
# 235B width (3 x 1536 x 4096)
SSZ_50_ITERATIONS_S = 5 * 0.51  # ssz's 50 iterations (0.51 s for 10 on gate, up and down, 2026-12-07)
GPTQ_LOOPS_S = 1.05  # after ssz's scale; the Gram matrices and factorisation run in the prefetch thread meanwhile


def w4a8_recipe(tmp_path, method, step=None):
    """The W4A8 preset with another weight method and ssz iteration count (``step``; None: the default, 50)."""
    text = (DEFAULT_RECIPE.parent / "qwen3_vl_moe_w4a8.yaml").read_text()
    assert 'method: "gptq"\n    ext:\n      step: 10\n' in text
    ext = f"\n    ext:\n      step: {step}\n" if step else "\n"
    path = tmp_path / f"{method}-{step}.yaml"
    path.write_text(text.replace('method: "gptq"\n    ext:\n      step: 10\n', f'method: "{method}"{ext}'))
    return path


@pytest.mark.parametrize("method, step, per_expert_s", [
    ("gptq", 10, 10 * SSZ_50_ITERATIONS_S / 50 + GPTQ_LOOPS_S),  # the preset: 1.56 s
    ("ssz", None, SSZ_50_ITERATIONS_S),  # msModelSlim's data-free default
    ("ssz", 10, 10 * SSZ_50_ITERATIONS_S / 50),
    ("minmax", None, 0.0),  # W8A8's rounding, counted in the elementwise passes
])
@pytest.mark.parametrize("workers, threads", [(4, 1), (16, 8)])
def test_projection_adds_the_measured_host_rounding_per_expert(tmp_path, method, step, per_expert_s, workers,
                                                               threads):
    """The W4A8 rounding on the critical path, by hand: each of the 94 layers' 128 experts costs the measured
    seconds of one thread; a layer's 8 groups of 16 spread over min(workers, 8) actors (the layers are a chain),
    and each actor rounds on its threads. Everything else is the W8A8-like projection of the same plan."""
    from dist_quant.recipe import load_recipe
    from dist_quant.runtime.cost import project

    config, raw = config_of("Qwen3-VL-235B-A22B")
    plan = build_plan(config, raw, workers, recipe=load_recipe(w4a8_recipe(tmp_path, method, step)))
    minmax = build_plan(config, raw, workers, recipe=load_recipe(w4a8_recipe(tmp_path, "minmax")))
    projection = project(plan, config, raw, 16384, compute_threads=threads)
    baseline = project(minmax, config, raw, 16384, compute_threads=threads)
    groups_per_actor = -(-8 // min(workers, 8))
    by_hand = 94 * groups_per_actor * 16 * per_expert_s / threads
    assert projection.round_s == pytest.approx(by_hand, rel=1e-9)
    assert projection.compute_s - baseline.compute_s == pytest.approx(by_hand, rel=1e-9)
    assert projection.seconds >= by_hand


def test_plan_takes_the_preset_flags_and_prints_the_rounding(tmp_path, capsys):
    shutil.copy(DATA / "Qwen3-VL-235B-A22B.config.json", tmp_path / "config.json")
    plan = ["plan", "--model_path", str(tmp_path), "--workers", "16"]
    assert main(plan) == 0
    w8a8 = capsys.readouterr().out
    assert "recipe qwen3_vl_moe_w8a8.yaml" in w8a8 and "rounding" not in w8a8
    assert main([*plan, "--quant_type", "w4a8"]) == 0  # the case: 6.8 min projected before, hours
    w4a8 = capsys.readouterr().out
    rounding = 94 * 16 * (10 * SSZ_50_ITERATIONS_S / 50 + GPTQ_LOOPS_S)  # seconds, under 1 h
    assert "recipe qwen3_vl_moe_w4a8.yaml" in w4a8
    assert f"of which host rounding {rounding / 60:.1f} min on 1 thread(s) per actor" in w4a8
    assert main([*plan, "--config_path", str(DEFAULT_RECIPE)]) == 0
    assert "recipe qwen3_vl_moe_w8a8.yaml" in capsys.readouterr().out
    assert main([*plan, "--quant_type", "w4a8", "--config_path", str(DEFAULT_RECIPE)]) == 2  # they contradict
    assert "the recipe decides, so drop --quant_type" in capsys.readouterr().err


def test_plan_prints_the_projection(tmp_path, capsys):
    shutil.copy(DATA / "Qwen3-VL-30B-A3B.config.json", tmp_path / "config.json")
    assert main(["plan", "--model_path", str(tmp_path), "--workers", "8", "--storage_read_gbps", "4"]) == 0
    assert "projected wall time on 8 card(s) (1 node(s))" in capsys.readouterr().out


@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_output_estimate_counts_each_linear_at_its_schemes_bytes(tmp_path, family):
    """The plan's output size is the published checkpoint's weights, each at its scheme's bytes (int8: 1, FLOAT: the
    source dtype), with biases counted in the source dtype and scales left out; an all-FLOAT recipe is the source."""
    from safetensors import safe_open

    from dist_quant.runtime.local import quantize_single_card
    from dist_quant.synthetic import make_calibration_set, make_tiny_model, make_tiny_text_model

    recipe_path = RECIPES / f"{family}_w8a8.yaml"
    if family == "qwen3_vl_moe":
        model = make_tiny_model(tmp_path / "model", num_layers=2, mlp_only_layers=(1,), dtype="bfloat16")
        dataset = make_calibration_set(tmp_path / "i", 1)
    else:
        model = make_tiny_text_model(tmp_path / "model", num_layers=2, mlp_only_layers=(1,), dtype="bfloat16")
        dataset = text_calibration_set(tmp_path / "t", texts=("Seven times eight is fifty-six.",))
    save = tmp_path / "q"
    quantize_single_card(str(model), str(save), load_recipe(recipe_path), dataset=str(dataset), progress=False)
    published = 0
    index = json.loads((save / "quant_model_weights.safetensors.index.json").read_text())
    for part in set(index["weight_map"].values()):
        with safe_open(save / part, "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                numel = math.prod(t.get_shape())
                published += numel * (1 if t.get_dtype() == "I8" else 2) if key.endswith((".weight", ".bias")) else 0
    raw = json.loads((model / "config.json").read_text())
    config = config_of_raw(raw)
    assert build_plan(config, raw, 1, recipe=load_recipe(recipe_path)).output_bytes == published
    float_only = tmp_path / "float.yaml"
    doc = yaml.safe_load(recipe_path.read_text())
    for processor in doc["spec"]["process"]:
        if processor["type"] == "linear_quant":
            processor["include"] = ["nothing"]
    float_only.write_text(yaml.safe_dump(doc))
    plan = build_plan(config, raw, 1, recipe=load_recipe(float_only))
    assert plan.output_bytes == plan.source_bytes


@pytest.mark.parametrize("patches", [[5, 5, 5, 5], [1, 1, 1, 10], [0, 3, 3, 0, 3, 3], [], [7], [0, 0],
                                     [1064, 988, 640, 1480, 1064, 576, 1024, 640, 322, 900, 1200, 450]])
@pytest.mark.parametrize("shares", [1, 2, 3, 5])
def test_image_shares_cover_every_sample_once_and_evenly(patches, shares):  # (costs: any numbers)
    """Each sample is in exactly one share; no share has more than an even split plus the largest image (the
    bound of placing each image on the least loaded share), so a share of the vision forward is never idle while
    another holds two of its images' worth more."""
    parts = [image_share(patches, s, shares) for s in range(shares)]
    assert sorted(i for part in parts for i in part) == list(range(len(patches)))
    assert all(part == sorted(part) for part in parts)
    loads = [sum(patches[i] for i in part) for part in parts]
    assert max(loads) <= sum(patches) / shares + max(patches, default=0)
    assert parts == [image_share(patches, s, shares) for s in range(shares)]  # the same on every actor


def test_input_ranges_of_shares_merge_to_those_of_one_forward():
    """Per-channel min/max recorded over shares of the inputs, merged, equal bit for bit the ranges of one pass over
    all of them (computed here independently, with amin/amax of the concatenation), in any order of the shares."""
    from torch import nn

    from dist_quant.calib.ranges import InputRanges

    torch.manual_seed(0)
    linear = nn.Linear(64, 8)
    inputs = [torch.randn(n, 64) * torch.rand(64) * 50 for n in (3, 17, 1, 40)]
    inputs[2][0, 5] = -0.0
    shares = []
    for part in (inputs[:1], inputs[1:3], inputs[3:]):
        with InputRanges({"x": linear}) as ranges:
            for x in part:
                linear(x)
        shares.append((ranges.channel_min, ranges.channel_max))
    everything = torch.cat(inputs)
    for order in (shares, shares[::-1]):
        merged = InputRanges.merged(order)
        assert torch.equal(merged.channel_min["x"], everything.amin(dim=0))
        assert torch.equal(merged.channel_max["x"], everything.amax(dim=0))
        assert merged.tensor_range("x") == (float(everything.min()), float(everything.max()))


def test_gptq_rounding_adds_its_gram_matrices_to_the_expert_groups_memory_only(tmp_path):
    from dist_quant.recipe import load_recipe
    from dist_quant.runtime.plan import HESSIAN_BYTES_PER_ENTRY

    config, raw = config_of("Qwen3-VL-235B-A22B")
    gptq = DEFAULT_RECIPE.parent / "qwen3_vl_moe_w4a8.yaml"  # the preset rounds with GPTQ
    ssz = tmp_path / "ssz.yaml"
    ssz.write_text(gptq.read_text().replace('method: "gptq"', 'method: "ssz"'))
    ssz_plan, gptq_plan = (build_plan(config, raw, 2, recipe=load_recipe(r)) for r in (ssz, gptq))
    extra = HESSIAN_BYTES_PER_ENTRY * 4096**2 + 16 * 1536**2
    for ssz_actor, gptq_actor in zip(ssz_plan.actors, gptq_plan.actors):
        for unit, a, b in zip(ssz_actor.units, ssz_actor.unit_peaks, gptq_actor.unit_peaks):
            assert b - a == (extra if unit.kind is Kind.EXPERTS else 0)


def test_plan_refuses_a_recipe_that_selects_nothing_as_quant_does(tmp_path, capsys):
    """plan checks the recipe against the model as quant does before any unit (torch-free): a typo is not an
    all-FLOAT projection."""
    shutil.copy(DATA / "Qwen3-VL-235B-A22B.config.json", tmp_path / "config.json")
    typo = tmp_path / "typo.yaml"
    doc = yaml.safe_load(DEFAULT_RECIPE.read_text())
    experts = next(p for p in doc["spec"]["process"] if p["type"] == "linear_quant" and p["include"] == ["*experts*"])
    experts["include"] = ["*exprts*"]
    typo.write_text(yaml.safe_dump(doc))
    assert main(["plan", "--model_path", str(tmp_path), "--config_path", str(typo)]) == 2
    assert "include ['*exprts*'] and exclude [] selects no linear of this model" in capsys.readouterr().err


def test_carried_shares_hold_every_tensor_once_in_order_and_evenly():
    """``carried_share``: consecutive tensors, each in exactly one share, no share more than an even cut plus one
    tensor; a share may be empty when one tensor spans several cuts."""
    from dist_quant.runtime.plan import carried_share

    sizes = [5, 100, 3, 3, 50, 1, 1, 70]
    for shares in (1, 2, 3, 5, 8, 12):
        got = [list(carried_share(sizes, share, shares)) for share in range(shares)]
        assert sum(got, []) == list(range(len(sizes)))
        assert all(sum(sizes[i] for i in share) <= sum(sizes) / shares + max(sizes) for share in got)
    assert list(carried_share([], 0, 1)) == []
