import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dist_quant.synthetic import make_calibration_set, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random fp32 Qwen3-VL-MoE with one dense-MLP layer, built once per test session."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", mlp_only_layers=(2,))


@pytest.fixture(scope="session")
def calib_index(tmp_path_factory) -> Path:
    return make_calibration_set(tmp_path_factory.mktemp("calib") / "images", num_images=3)


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster with 3 CPUs for one test module; drivers join it with --ray_address cluster.address."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    yield cluster
    import ray

    ray.shutdown()
    cluster.shutdown()
