"""The same checkpoint, bit for bit, whatever ran it: any intra-op thread count of the processes, single card or 3
Ray workers (2: tests/test_distributed.py), interrupted and resumed or not.

The model is wide enough (hidden 512, 8 experts top-3 in groups of 2) for torch to split its GEMMs and reductions
across threads, and for the order of the partial sums to matter: without a fixed compute thread count, a 1-thread
and a 2-thread single-card run of it differ in some scales (measured on the code before --compute_threads).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_quant.cli import main
from dist_quant.synthetic import make_calibration_set, make_tiny_model, make_tiny_text_model
from helpers import assert_same_checkpoint, read_checkpoint

GROUP = ["--expert_group_size", "2"]
ENV = {k: v for k, v in os.environ.items() if k not in ("DIST_QUANT_KILL_AT", "OMP_NUM_THREADS")}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("wide") / "model", num_layers=3, num_experts=8, top_k=3,
                           hidden_size=512, num_heads=8, num_kv_heads=2, head_dim=64, moe_intermediate_size=192,
                           vision_hidden=128, vision_heads=2, deepstack=(0, 1), dtype="bfloat16")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return make_calibration_set(tmp_path_factory.mktemp("wide_calib") / "images", num_images=3)


def args(model, calib, save, *extra):
    return ["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu", "--dataset",
            str(calib), "--quiet", *GROUP, *extra]


def run_cli(cmd, threads: int, kill_at: str = "") -> int:
    """A fresh process whose torch starts with ``threads`` intra-op threads (OMP_NUM_THREADS)."""
    env = {**ENV, "OMP_NUM_THREADS": str(threads), **({"DIST_QUANT_KILL_AT": kill_at} if kill_at else {})}
    return subprocess.run([sys.executable, "-m", "dist_quant.cli", *cmd], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=600).returncode


@pytest.fixture(scope="module")
def reference(model, calib, tmp_path_factory):
    save = tmp_path_factory.mktemp("ref") / "q"
    assert run_cli(args(model, calib, save), threads=1) == 0
    return read_checkpoint(save)


@pytest.mark.parametrize("threads", [2, 4])
def test_single_card_with_any_thread_count(model, calib, reference, tmp_path, threads):
    assert run_cli(args(model, calib, tmp_path / "q"), threads) == 0
    assert_same_checkpoint(tmp_path / "q", reference)


def test_embeddings_and_lm_head_in_row_chunks_of_any_size(model, calib, reference, tmp_path, monkeypatch):
    """The vocabulary-sized tensors are read, rotated and converted a chunk of rows at a time: 7 chunks of 100 rows
    (and a last short one) give the checkpoint that one chunk gives, the calibration stream included."""
    from dist_quant.runtime import worker

    monkeypatch.setattr(worker, "ROW_CHUNK", 100)
    assert main(args(model, calib, tmp_path / "q")) == 0
    assert_same_checkpoint(tmp_path / "q", reference)


def test_resumed_in_another_process_with_other_threads(model, calib, reference, tmp_path):
    save = tmp_path / "q"
    assert run_cli(args(model, calib, save), threads=4, kill_at="unit:9") == -9
    assert main(args(model, calib, save, "--resume")) == 0  # this (pytest) process, whatever its thread count
    assert_same_checkpoint(save, reference)


@pytest.mark.ray
@pytest.mark.parametrize("workers", [3])  # 2 workers against 3: tests/test_distributed.py
def test_ray_workers_match_single_card(model, calib, reference, cluster, tmp_path, workers):
    """Each actor gets one CPU from Ray (OMP_NUM_THREADS=1 in its process) while the driver has 2 threads."""
    save = tmp_path / "q"
    assert run_cli(args(model, calib, save, "--workers", str(workers), "--ray_address", cluster.address),
                   threads=2) == 0
    assert_same_checkpoint(save, reference)


@pytest.mark.ray
def test_another_compute_thread_count_is_the_same_everywhere_too(model, calib, cluster, tmp_path):
    """--compute_threads 2: single card in a 1-thread process and 2 Ray actors agree with each other."""
    single, distributed = tmp_path / "single", tmp_path / "ray"
    assert run_cli(args(model, calib, single, "--compute_threads", "2"), threads=1) == 0
    assert run_cli(args(model, calib, distributed, "--compute_threads", "2", "--workers", "2", "--ray_address",
                        cluster.address), threads=4) == 0
    assert_same_checkpoint(distributed, read_checkpoint(single))


W4A8_RECIPE = Path(__file__).resolve().parent.parent / "dist_quant" / "configs" / "qwen3_vl_moe_w4a8.yaml"


@pytest.mark.ray
@pytest.mark.parametrize("method", ["ssz", "gptq"])
def test_w4a8_experts_are_the_same_on_ray_and_with_any_thread_count(model, calib, cluster, tmp_path, method):
    """The W4A8 preset's recipe (GPTQ rounding: matrix products over each expert's routed tokens), and with ssz's
    data-free rounding (its iterations stop when no channel improves, a test on values): a 1-thread single card, a
    4-thread single card and 2 Ray actors under a 2-thread driver write the same checkpoint."""
    recipe = tmp_path / "w4a8.yaml"
    preset = W4A8_RECIPE.read_text()
    assert preset.count('method: "gptq"') == 1  # the experts' weight method, replaced below
    recipe.write_text(preset.replace('method: "gptq"', f'method: "{method}"'))
    w4a8 = ["--config_path", str(recipe)]
    single = tmp_path / "single"
    assert run_cli(args(model, calib, single, *w4a8), threads=1) == 0
    reference = read_checkpoint(single)
    assert {t for k, t in reference[1].items() if ".experts." in k} == {"W4A8_DYNAMIC"}
    assert run_cli(args(model, calib, tmp_path / "four", *w4a8), threads=4) == 0
    assert_same_checkpoint(tmp_path / "four", reference)
    assert run_cli(args(model, calib, tmp_path / "ray", *w4a8, "--workers", "2", "--ray_address", cluster.address),
                   threads=2) == 0
    assert_same_checkpoint(tmp_path / "ray", reference)


MXFP8_RECIPE = Path(__file__).resolve().parent / "data" / "msmodelslim" / "qwen3_vl_moe_w8a8_mxfp8.yaml"


@pytest.mark.ray
def test_mxfp8_is_the_same_on_two_ray_workers(model, calib, cluster, tmp_path):
    """msModelSlim's W8A8_MXFP8 recipe as it is (QuaRot, smoothing, every linear in MXFP8, experts included): a
    1-thread single card and 2 Ray actors under a 2-thread driver write the same checkpoint."""
    mxfp8 = ["--config_path", str(MXFP8_RECIPE)]
    single = tmp_path / "single"
    assert run_cli(args(model, calib, single, *mxfp8), threads=1) == 0
    reference = read_checkpoint(single)
    assert {t for k, t in reference[1].items() if ".experts." in k} == {"W8A8_MXFP8"}
    assert run_cli(args(model, calib, tmp_path / "ray", *mxfp8, "--workers", "2", "--ray_address", cluster.address),
                   threads=2) == 0
    assert_same_checkpoint(tmp_path / "ray", reference)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """The text-only family at the same width (per-expert keys, 1-D positions), one dense layer."""
    return make_tiny_text_model(tmp_path_factory.mktemp("wide_text") / "model", num_layers=3, num_experts=8,
                                top_k=3, hidden_size=512, num_heads=8, num_kv_heads=2, head_dim=64,
                                moe_intermediate_size=192, mlp_only_layers=(1,), dtype="bfloat16")


@pytest.fixture(scope="module")
def text_calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("wide_text_calib") / "calib.jsonl"
    texts = [" ".join(f"sentence {i} of sample {n}, with numbers {i * n} and words." for i in range(12))
             for n in range(3)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.mark.ray
def test_text_family_with_its_preset_is_the_same_on_any_thread_count_and_on_ray(text_model, text_calib, cluster,
                                                                              tmp_path):
    """Qwen3-MoE with its bundled W8A8 recipe (QuaRot and smoothing through the family's tables): a 1-thread and a
    4-thread single card and 2 Ray actors under a 2-thread driver write the same checkpoint."""
    preset = ["--quant_type", "w8a8"]  # --model_type from config.json: the text family's preset
    single = tmp_path / "single"
    assert run_cli(args(text_model, text_calib, single, *preset), threads=1) == 0
    reference = read_checkpoint(single)
    assert reference[1]["model.layers.0.self_attn.q_proj.weight"] == "W8A8"
    assert reference[1]["model.layers.0.mlp.experts.7.down_proj.weight"] == "W8A8_DYNAMIC"
    assert run_cli(args(text_model, text_calib, tmp_path / "four", *preset), threads=4) == 0
    assert_same_checkpoint(tmp_path / "four", reference)
    assert run_cli(args(text_model, text_calib, tmp_path / "ray", *preset, "--workers", "2", "--ray_address",
                        cluster.address), threads=2) == 0
    assert_same_checkpoint(tmp_path / "ray", reference)
