import os
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
    """A Ray cluster with 3 CPUs for one test module; drivers join it with --ray_address cluster.address.

    Its auth mode is pinned (no token auth) for the module: the head processes, this process and the CLI children
    all read RAY_AUTH_MODE, and Ray would otherwise turn token auth on for the head when ~/.ray/auth_token exists
    while this process's cached mode says otherwise. Its address is kept out of /tmp/ray/ray_current_cluster, where
    other ray.init() calls on the machine would find it."""
    import ray
    from ray._raylet import Config
    from ray.cluster_utils import Cluster

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    Config.initialize("")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
        patch.setattr(ray._common.utils, "reset_ray_address", lambda *args, **kwargs: None)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
            if saved is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = saved
            Config.initialize("")
