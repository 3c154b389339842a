"""Distributed quantization on real Ray runtimes: the checkpoint is identical tensor by tensor to the single-card one
for 2 and 3 workers, on a two-node cluster, through the object store, and after actor processes are killed."""

import os
import signal

import pytest
import ray
from ray.cluster_utils import Cluster

from dist_quant.errors import DistQuantError
from dist_quant.recipe import load_recipe
from dist_quant.runtime.local import quantize_single_card
from dist_quant.runtime.ray_driver import quantize_distributed
from dist_quant.synthetic import make_tiny_model
from helpers import assert_same_checkpoint, read_checkpoint

pytestmark = pytest.mark.ray
GROUP = 2  # 8 experts -> 4 groups per layer: several units per layer to spread, and more groups than top-k
TOP_K = 3  # a token's output adds up to 3 nonzero group partials, so the order they are added in shows in the bits


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Wide enough that each unit takes a little while, so an actor can be killed while it still has work; top-3 of
    8 experts in groups of 2, so that adding the groups' partial sums in another order than the plan's changes bits
    (with top-2 a token meets at most two nonzero partials, and a + b == b + a exactly)."""
    return make_tiny_model(tmp_path_factory.mktemp("dist") / "model", num_layers=4, hidden_size=128,
                           moe_intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=32, top_k=TOP_K)


@pytest.fixture(scope="module")
def reference(model, calib_index, tmp_path_factory):
    save = tmp_path_factory.mktemp("ref") / "quant"
    quantize_single_card(str(model), str(save), load_recipe(), dataset=str(calib_index), progress=False,
                         expert_group_size=GROUP)
    return read_checkpoint(save)


def run(model, calib_index, save, workers, **kwargs):
    return quantize_distributed(str(model), str(save), load_recipe(), workers=workers, dataset=str(calib_index),
                                progress=False, expert_group_size=GROUP, **kwargs)


@pytest.mark.parametrize("workers", [2, 3])
def test_same_checkpoint_with_2_and_3_workers(local_ray, model, calib_index, reference, tmp_path, workers):
    summary = run(model, calib_index, tmp_path / "out", workers)
    assert_same_checkpoint(tmp_path / "out", reference)
    assert [a.units > 0 for a in summary.actors] == [True] * workers
    assert sum(a.units for a in summary.actors) == summary.units
    assert sum(a.bytes_written for a in summary.actors) == summary.bytes_written


def test_results_through_the_object_store(local_ray, model, calib_index, reference, tmp_path):
    run(model, calib_index, tmp_path / "out", 2, ship_unit_files=True)
    assert_same_checkpoint(tmp_path / "out", reference)


def test_two_node_cluster(private_cluster, model, calib_index, reference, tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        summary = run(model, calib_index, tmp_path / "out", 2, ray_address=cluster.address)
        nodes = {node for actor in summary.actors for node in actor.node_ids}
        assert len(nodes) == 2, "actors were not placed on both nodes"
        assert_same_checkpoint(tmp_path / "out", reference)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_killed_actor_is_restarted_and_the_checkpoint_is_the_same(local_ray, model, calib_index, reference,
                                                                      tmp_path):
    killed = []

    def kill_actor_1_once(report):
        if report.actor == 1 and not killed:
            killed.append(report.pid)
            os.kill(report.pid, signal.SIGKILL)

    summary = run(model, calib_index, tmp_path / "out", 2, on_unit_done=kill_actor_1_once)
    assert killed
    assert len(summary.actors[1].pids) == 2, "no unit ran on the restarted actor"
    assert_same_checkpoint(tmp_path / "out", reference)
    restarts = [w for w in summary.warnings if "was restarted" in w]  # said once, in our words, and logged
    assert len(restarts) == 1 and f"actor 1 was restarted (pid {killed[0]} " in restarts[0]
    assert restarts[0] in (tmp_path / "out" / "quant_run.log").read_text()


def test_actor_that_keeps_dying_gives_a_clear_error_and_no_checkpoint(local_ray, model, calib_index, tmp_path):
    def kill_actor_1(report):
        if report.actor == 1:
            os.kill(report.pid, signal.SIGKILL)

    with pytest.raises(DistQuantError, match="nothing was published"):
        run(model, calib_index, tmp_path / "out", 2, max_restarts=1, on_unit_done=kill_actor_1)
    assert not (tmp_path / "out" / "quant_model_description.json").exists()
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_lost_node_its_actor_moves_to_another_node_and_the_checkpoint_is_the_same(private_cluster, model, calib_index,
                                                                                  reference, tmp_path):
    small = 300 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": small})
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=small) for _ in range(3)]
    cluster.wait_for_nodes()
    lost = []

    def lose_actor_1s_node(report):
        if report.actor == 1 and not lost:
            node = next(n for n in nodes if n.node_id == report.node_id)
            lost.append(node.node_id)
            cluster.remove_node(node)

    try:
        summary = run(model, calib_index, tmp_path / "out", 2, ray_address=cluster.address,
                      on_unit_done=lose_actor_1s_node)
        assert lost and lost[0] in summary.actors[1].node_ids and len(summary.actors[1].node_ids) == 2
        assert_same_checkpoint(tmp_path / "out", reference)
    finally:
        ray.shutdown()
        cluster.shutdown()
