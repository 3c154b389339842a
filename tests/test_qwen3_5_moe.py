"""Qwen3.5-MoE end to end (transformers 5 only): a tiny model built by transformers 5's own classes, with an MTP head's
tensors added to its files, quantized with msModelSlim's Qwen3.5 W8A8 recipe unchanged (``group`` processor
included) on one card and on 2 Ray workers to identical checkpoints; types follow the recipe, every expert's codes
are within half a step of the float weights read from the source files, the MTP tensors equal the source byte for
byte, ``check`` accepts it. The family's pieces chained reproduce transformers' forward (hybrid linear and full
attention, shared expert, mRoPE with an image); experts stored fused give the same checkpoint as per expert."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("transformers.models.qwen3_5_moe", reason="Qwen3.5-MoE needs transformers 5")

from transformers import Qwen3_5MoeForConditionalGeneration  # noqa: E402

from dist_quant.calib.dataset import CalibSample, load_samples  # noqa: E402
from dist_quant.calib.inputs import build_model_inputs  # noqa: E402
from dist_quant.check import check_checkpoint, format_report  # noqa: E402
from dist_quant.cli import main  # noqa: E402
from dist_quant.errors import RecipeError  # noqa: E402
from dist_quant.models.family import load_checked  # noqa: E402
from dist_quant.presets import find_preset  # noqa: E402
from dist_quant.recipe import load_recipe  # noqa: E402
from dist_quant.runtime.assignments import check_recipe_for_model  # noqa: E402
from dist_quant.runtime.ray_driver import quantize_distributed  # noqa: E402
from dist_quant.synthetic import make_calibration_set, make_tiny_qwen3_5_model  # noqa: E402
from helpers import read_checkpoint  # noqa: E402

MSMODELSLIM = Path(__file__).parent / "data" / "msmodelslim"
W8A8 = MSMODELSLIM / "qwen3_5_235B_w8a8.yaml"  # verified on Qwen3.5-397B-A17B: vision blocks too
W4A8_PRESET = find_preset("Qwen3.5-397B-A17B", "w4a8").recipe  # GPTQ: codes depend on the calibration forward
TEXT = "model.language_model"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(per-expert model, the same model with its experts fused, calibration set)."""
    root = tmp_path_factory.mktemp("qwen3_5")
    return (make_tiny_qwen3_5_model(root / "model"), make_tiny_qwen3_5_model(root / "fused", fused_experts=True),
            make_calibration_set(root / "calib", num_images=2))


def quant(model, calib, save, *extra, recipe=W8A8) -> Path:
    assert main(["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu", "--dataset",
                 str(calib), "--quiet", "--config_path", str(recipe), "--expert_group_size", "4", *extra]) == 0
    return save


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory):
    return quant(tiny[0], tiny[2], tmp_path_factory.mktemp("q35_single") / "q")


def source_tensors(model: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for part in sorted(model.glob("*.safetensors")):
        with safe_open(str(part), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def test_types_follow_msmodelslims_recipe(single, tiny):
    """Full attention's q/k/v and the vision blocks' qkv, proj and fc1 are W8A8_DYNAMIC, routed experts too; o_proj,
    the linear attention, the shared expert and its gate, the router, linear_fc2, the merger and the MTP head stay
    FLOAT."""
    _, description, _ = read_checkpoint(single)
    _, _, config = load_checked(tiny[0])
    types = config.text_config.layer_types
    full, linear = f"{TEXT}.layers.{types.index('full_attention')}", f"{TEXT}.layers.{types.index('linear_attention')}"
    dynamic = [f"{full}.self_attn.{p}_proj" for p in "qkv"] + [f"{linear}.mlp.experts.3.down_proj",
                                                               "model.visual.blocks.0.attn.qkv",
                                                               "model.visual.blocks.1.mlp.linear_fc1",
                                                               "model.visual.blocks.0.attn.proj"]
    floats = [f"{full}.self_attn.o_proj", f"{linear}.linear_attn.in_proj_qkv", f"{linear}.linear_attn.out_proj",
              f"{linear}.mlp.shared_expert.gate_proj", f"{linear}.mlp.shared_expert_gate", f"{linear}.mlp.gate",
              "model.visual.blocks.0.mlp.linear_fc2", "model.visual.merger.linear_fc1", "mtp.fc",
              "mtp.layers.0.self_attn.q_proj", "mtp.layers.0.mlp.experts.0.gate_proj"]
    assert {n: description[f"{n}.weight"] for n in dynamic} == dict.fromkeys(dynamic, "W8A8_DYNAMIC")
    assert {n: description[f"{n}.weight"] for n in floats} == dict.fromkeys(floats, "FLOAT")
    assert description[f"{linear}.linear_attn.A_log"] == description[f"{linear}.linear_attn.conv1d.weight"] == "FLOAT"


def test_every_expert_is_within_half_a_step_of_the_float_weight(single, tiny):
    """Codes against the source file's weights (read here, per expert) and a scale computed here from them."""
    tensors, description, _ = read_checkpoint(single)
    source = source_tensors(tiny[0])
    experts = [k for k, t in description.items() if ".mlp.experts." in k and k.endswith(".weight")
               and t == "W8A8_DYNAMIC"]
    assert len(experts) == 4 * 8 * 3
    for key in experts:
        weight = source[key].to(torch.float64)
        scale = weight.abs().amax(dim=1, keepdim=True) / 127  # per output channel, symmetric: computed here
        stored = tensors[f"{key[:-len('.weight')]}.weight_scale"].to(torch.float64).reshape(-1, 1)
        assert torch.allclose(stored, scale, rtol=1e-6, atol=0), key
        assert bool(((tensors[key].to(torch.float64) * scale - weight).abs() <= scale / 2 * (1 + 1e-5)).all()), key


def test_the_mtp_head_is_carried_byte_for_byte_and_described(single, tiny):
    tensors, description, _ = read_checkpoint(single)
    source = {k: v for k, v in source_tensors(tiny[0]).items() if k.startswith("mtp.")}
    assert source and {k: v for k, v in tensors.items() if k.startswith("mtp.")}.keys() == source.keys()
    for key, tensor in source.items():
        assert tensors[key].dtype == tensor.dtype and torch.equal(tensors[key].view(torch.uint8),
                                                                  tensor.view(torch.uint8)), key
        assert description[key] == "FLOAT", key


def test_check_accepts_it(single):
    report = check_checkpoint(single)
    assert report.ok, format_report(report)


def test_a_float32_a_log_in_a_bfloat16_model_is_written_in_float32(single, tiny, tmp_path):
    """A norm or ``A_log`` stored in float32 beside bfloat16 weights keeps its float32 values (vLLM creates A_log in
    float32 whatever the model dtype and copies the checkpoint's values in); the bfloat16 ones stay bfloat16."""
    import shutil

    from safetensors.torch import save_file

    model = tmp_path / "mixed"
    shutil.copytree(tiny[0], model)
    key = f"{TEXT}.layers.0.linear_attn.A_log"
    part = model / json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][key]
    with safe_open(str(part), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    a_log = torch.linspace(-1.3, 2.9, tensors[key].numel(), dtype=torch.float32)  # values bfloat16 cannot hold
    assert not torch.equal(a_log.to(torch.bfloat16).float(), a_log)
    tensors[key] = a_log
    save_file(tensors, str(part), metadata={"format": "pt"})
    out = quant(model, tiny[2], tmp_path / "q")
    written, before = read_checkpoint(out)[0], read_checkpoint(single)[0]
    assert written[key].dtype == torch.float32 and torch.equal(written[key], a_log)
    dt_bias = f"{TEXT}.layers.0.linear_attn.dt_bias"
    assert written[dt_bias].dtype == torch.bfloat16 and torch.equal(written[dt_bias], before[dt_bias])
    assert all(torch.equal(t, before[k]) for k, t in written.items() if k != key)
    report = check_checkpoint(out)
    assert report.ok, format_report(report)


def test_fused_experts_are_read_in_qwen3_5s_layout_whatever_transformers_version_says(tiny, tmp_path):
    """With 2I == hidden the fused gate_up_proj's shape is the same in both layouts; a release's config.json naming a
    transformers 4.x (whose Qwen3-VL writes the Hub layout) must not change how Qwen3.5's experts are read: the
    checkpoint equals the one from the same experts stored per expert."""
    per_expert = make_tiny_qwen3_5_model(tmp_path / "per_expert", moe_intermediate_size=32)
    fused = make_tiny_qwen3_5_model(tmp_path / "fused", moe_intermediate_size=32, fused_experts=True)
    config = json.loads((fused / "config.json").read_text())
    (fused / "config.json").write_text(json.dumps({**config, "transformers_version": "4.57.1"}))
    one, other = quant(per_expert, tiny[2], tmp_path / "q1"), quant(fused, tiny[2], tmp_path / "q2")
    for name in [*sorted(p.name for p in one.glob("*.safetensors")), "quant_model_description.json"]:
        assert (one / name).read_bytes() == (other / name).read_bytes(), name


def test_the_mtp_head_in_many_carried_units_gives_the_same_bytes(single, tiny, cluster, tmp_path, monkeypatch):
    """The MTP head is carried by units of at most CARRIED_SHARE_PARAMS parameters (1 GiB of bfloat16 at 397B: 13
    units); cut in several, on one card and on 2 Ray workers, the checkpoint is the one-unit checkpoint."""
    from dist_quant.runtime import plan

    monkeypatch.setattr(plan, "CARRIED_SHARE_PARAMS", 16384)
    shares = plan.carried_shares(load_checked(tiny[0])[2])
    assert shares >= 3
    units = plan.plan_units(load_checked(tiny[0])[2])
    assert [u.id for u in units if u.kind is plan.Kind.CARRIED] == [f"carried-{i}-of-{shares}"
                                                                     for i in range(1, shares + 1)]
    one = quant(tiny[0], tiny[2], tmp_path / "one")
    ray = quant(tiny[0], tiny[2], tmp_path / "ray", "--workers", "2", "--ray_address", cluster.address)
    names = sorted(p.name for p in single.glob("*.safetensors")) + ["quant_model_description.json"]
    for folder in (one, ray):
        for name in names:
            assert (folder / name).read_bytes() == (single / name).read_bytes(), (folder, name)


def test_two_ray_workers_and_fused_experts_write_the_same_bytes(single, tiny, cluster, tmp_path):
    """2 workers on a Ray cluster, and the source with every expert fused (the released layout: the trunk's and
    the MTP head's), give the single card's checkpoint file for file."""
    ray = quant(tiny[0], tiny[2], tmp_path / "ray", "--workers", "2", "--ray_address", cluster.address)
    fused = quant(tiny[1], tiny[2], tmp_path / "fused")
    names = sorted(p.name for p in single.glob("*.safetensors")) + ["quant_model_description.json", "config.json"]
    for folder in (ray, fused):
        for name in names:
            assert (folder / name).read_bytes() == (single / name).read_bytes(), (folder, name)


def test_the_pieces_chained_reproduce_transformers_forward(tiny):
    """Vision tower, embeddings with the image placed, each hybrid layer (mixer and shared expert), the routed
    experts, the final (1 + w) norm and lm_head, against transformers' own forward in float32, for an image sample
    and a text-only one."""
    model_dir, _, calib = tiny
    family, reader, config = load_checked(model_dir)
    hf_model = Qwen3_5MoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    samples = load_samples(calib)
    inputs = build_model_inputs(model_dir, [samples[0], CalibSample(None, "Describe the weather in words.")])

    def read(key, shape=None):
        return reader.get(key, dtype=torch.float32, shape=shape)

    tc = config.text_config
    rotary = family.build_text_rotary(config)
    visual = family.build_vision(config, read, torch.float32)
    embed, norm, lm_head = read(family.EMBED_KEY), read(family.NORM_KEY), read(family.LM_HEAD_KEY)
    act = family.activation(config)
    compared = 0
    for sample in inputs:
        vision = None
        if sample.pixel_values is not None:
            vision = family.vision_forward(visual, sample.pixel_values, sample.image_grid_thw)
        with torch.no_grad():
            hidden = family.place_images(config, embed[sample.input_ids], sample.input_ids, vision)
            ctx = family.sample_context(config, rotary, sample, vision, torch.float32, "cpu")
            for layer_idx in range(tc.num_hidden_layers):
                block = family.build_layer(config, layer_idx, read, torch.float32)
                streams, x = family.layer_forward(block, [hidden], [ctx], True)
                ids, weights = family.route(family.router_logits(block, x), tc.num_experts_per_tok, x.dtype)
                experts = family.read_experts(reader, config, layer_idx, 0, tc.num_experts, torch.float32)
                routed = family.expert_group_forward(x, ids, weights, [family.float_expert(*e, act) for e in experts],
                                                     0)
                hidden = streams[0] + routed.reshape(streams[0].shape)
            logits = family.rms_norm(hidden, norm, tc.rms_norm_eps) @ lm_head.T
            kwargs = {"input_ids": sample.input_ids, "attention_mask": sample.attention_mask}
            if sample.pixel_values is not None:
                kwargs.update(pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw,
                              mm_token_type_ids=(sample.input_ids == config.image_token_id).to(torch.int32))
            expected = hf_model(**kwargs).logits
        assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4), (logits - expected).abs().max()
        compared += sample.pixel_values is not None
    assert compared == 1  # one sample with an image, one without


def test_msmodelslims_recipes_are_accepted_and_outlier_suppression_refused(tiny, tmp_path):
    _, _, config = load_checked(tiny[0])
    for name in ("qwen3_5_235B_w8a8.yaml", "qwen3_5_moe_w8a8.yaml", "qwen3.5_moe_w4a8.yaml"):
        check_recipe_for_model(load_recipe(MSMODELSLIM / name), config)
    # the bundled Qwen3-VL-MoE recipe runs QuaRot and smoothing: this family has no points for them
    with pytest.raises(RecipeError, match="Qwen3.5-MoE has no QuaRot or smoothing points"):
        check_recipe_for_model(load_recipe(Path(__file__).parents[1] / "dist_quant" / "configs"
                                           / "qwen3_vl_moe_w8a8.yaml"), config)


def _layer(tiny, kind: str) -> str:
    _, _, config = load_checked(tiny[0])
    return f"{TEXT}.layers.{config.text_config.layer_types.index(kind)}"


@pytest.mark.parametrize("rule, what, options", [
    ("R8", "the shared expert's gate quantized (vLLM builds it without a quant config)", {}),
    ("R10", "in_proj_qkv and in_proj_z (vLLM Ascend's in_proj_qkvz) split over two types", {}),
    ("R24", "an MTP tensor without its description entry", {}),
    ("R17", "a tensor-parallel size that does not divide the linear attention's 2 key heads", {"tp": 4}),
])
def test_a_qwen3_5_mutation_trips_its_rule(single, tiny, tmp_path, rule, what, options):
    from helpers import drop, mutate, set_types

    linear = _layer(tiny, "linear_attention")
    changes = {"R8": set_types(f"{linear}.mlp.shared_expert_gate", "W8A8_DYNAMIC"),
               "R10": set_types(f"{linear}.linear_attn.in_proj_z", "W8A8_DYNAMIC"),
               "R24": drop("mtp.layers.0.mlp.experts.5.up_proj.weight"), "R17": None}
    report = check_checkpoint(mutate(single, tmp_path, description=changes[rule]), **options)
    assert rule in report.failed(), f"{what}:\n{format_report(report)}"
    violations = next(v.violations for v in report.verdicts if v.rule.id == rule)
    expected = {"R8": "shared_expert_gate.weight: W8A8_DYNAMIC (no unquantized method)", "R10": "in_proj_z",
                "R24": "mtp.layers.0.mlp.experts.5.up_proj.weight", "R17": "linear_num_key_heads 2"}[rule]
    assert any(expected in line for line in violations), violations


def test_a_recipe_quantizing_the_shared_expert_gate_is_refused(tiny, tmp_path):
    import yaml

    doc = yaml.safe_load(W8A8.read_text())
    doc["spec"]["process"][0]["configs"][0]["include"].append("*mlp.shared_expert*")
    path = tmp_path / "gate.yaml"
    path.write_text(yaml.safe_dump(doc))
    _, _, config = load_checked(tiny[0])
    with pytest.raises(RecipeError, match=r"shared_expert_gate gets W8A8_DYNAMIC, but vLLM builds it without a quant "
                                          "config"):
        check_recipe_for_model(load_recipe(path), config)


def test_eval_runs_the_hybrid_model(single, tiny):
    """``dist-quant eval`` chains the vision tower, the hybrid layers with their shared expert and the routed experts
    on both sides, served with the card's integer math: every piece is compared, close but not equal."""
    from dist_quant.evaluate import evaluate

    inputs = build_model_inputs(tiny[0], load_samples(tiny[2]))
    report = evaluate(str(tiny[0]), str(single), inputs)
    assert 0 < report.kl_divergence < 1 and 0.5 < report.top1_agreement <= 1 and report.tokens > 0
    text = report.table()
    assert all(f"layer {i}" in text for i in range(4)) and "vision" in text


def test_a_model_resaved_without_its_mtp_head_is_refused_with_the_reason(tiny, tmp_path):
    """transformers drops mtp.* when it loads a model and writes mtp_num_hidden_layers back when it saves it."""
    import shutil

    from dist_quant.errors import CheckpointError

    model = tmp_path / "resaved"
    shutil.copytree(tiny[0], model)
    (model / "mtp.safetensors").unlink()
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("mtp.")}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="mtp_num_hidden_layers=1, but the weights hold no mtp.* tensor"):
        load_checked(model)


def test_a_killed_run_resumes_to_the_same_bytes_and_reports(single, tiny, tmp_path):
    """Killed in the middle of an expert group, then ``--resume``: the single card's checkpoint, and its report
    page and calibration coverage are written as for the first family."""
    save = tmp_path / "killed"
    cmd = ["quant", "--model_path", str(tiny[0]), "--save_path", str(save), "--device", "cpu", "--dataset",
           str(tiny[2]), "--quiet", "--config_path", str(W8A8), "--expert_group_size", "4"]
    env = {**{k: v for k, v in os.environ.items() if k != "DIST_QUANT_KILL_AT"}, "DIST_QUANT_KILL_AT": "experts:5"}
    child = subprocess.run([sys.executable, "-m", "dist_quant.cli", *cmd], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=600)
    assert child.returncode == -9 and not (save / "quant_model_description.json").exists()
    assert main([*cmd, "--resume"]) == 0
    for name in [*sorted(p.name for p in single.glob("*.safetensors")), "quant_model_description.json"]:
        assert (save / name).read_bytes() == (single / name).read_bytes(), name
    coverage = json.loads((save / "calibration_coverage.json").read_text())
    assert coverage and (save / "report.html").exists()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(model, calibration set): hidden 512, so that torch splits its GEMMs and reductions over threads; top-3 of 8
    experts in groups of 2, so that the order the groups' partial sums are added in shows in the bits; 4 layers, 3
    Gated DeltaNet and one full attention."""
    root = tmp_path_factory.mktemp("qwen3_5_wide")
    model = make_tiny_qwen3_5_model(root / "model", hidden_size=512, num_heads=8, num_kv_heads=2, head_dim=64, top_k=3,
                                    moe_intermediate_size=192, shared_expert_intermediate_size=256,
                                    linear_heads=(4, 8), linear_head_dim=64, vision_hidden=128)
    return model, make_calibration_set(root / "calib", num_images=2)


@pytest.mark.ray
def test_a_two_node_cluster_writes_the_single_cards_bytes(wide, private_cluster, tmp_path):
    """2 workers on a two-node ``ray.cluster_utils.Cluster`` (one CPU each) against a single card in a process whose
    torch starts with 2 threads: the same checkpoint file for file, with an actor on each node. With the W4A8 preset:
    GPTQ rounds each expert against the Gram matrix of its routed calibration tokens, so the bits depend on every
    forward before it (msModelSlim's W8A8 is all dynamic, its weights' codes data-free). On this model a single card
    at 1 and at 2 compute threads differ (measured), so the same bits here are not a matter of luck."""
    import ray
    from ray.cluster_utils import Cluster

    model, calib = wide
    single = tmp_path / "single"
    env = {**{k: v for k, v in os.environ.items() if k != "DIST_QUANT_KILL_AT"}, "OMP_NUM_THREADS": "2"}
    cmd = ["quant", "--model_path", str(model), "--save_path", str(single), "--device", "cpu", "--dataset",
           str(calib), "--quiet", "--config_path", str(W4A8_PRESET), "--expert_group_size", "2"]
    child = subprocess.run([sys.executable, "-m", "dist_quant.cli", *cmd], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=600)
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        summary = quantize_distributed(str(model), str(tmp_path / "ray"), load_recipe(W4A8_PRESET), workers=2,
                                       dataset=str(calib), progress=False, expert_group_size=2,
                                       ray_address=cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len({node for actor in summary.actors for node in actor.node_ids}) == 2, "actors were not on both nodes"
    names = [*sorted(p.name for p in single.glob("*.safetensors")), "quant_model_description.json"]
    for name in names:
        assert (tmp_path / "ray" / name).read_bytes() == (single / name).read_bytes(), name
