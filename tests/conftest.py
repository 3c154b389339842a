import os
import sys
from contextlib import contextmanager
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


@contextmanager
def token_auth_off():
    """Pins Ray's auth mode to "disabled" (no token auth) while it is open, then puts the environment back.

    The head processes, this process and the CLI children all read RAY_AUTH_MODE. With it unset, a new local
    `ray.init()` turns token auth on by itself and a head does so when ~/.ray/auth_token exists, while this process's
    cached mode and token (RayConfig, Ray's token loader: tests/test_ray_auth.py swaps HOME under it) may say
    otherwise, and the head then refuses this process ("Authentication token is missing or incorrect")."""
    from ray._raylet import AuthenticationTokenLoader, Config

    def reread() -> None:  # Ray's own order (ray._private.authentication_test_utils.reset_auth_token_state)
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    reread()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
        reread()


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster with 3 CPUs for one test module; drivers join it with --ray_address cluster.address.

    Its auth mode is pinned (token_auth_off) for the module. Its address is kept out of /tmp/ray/ray_current_cluster,
    where other ray.init() calls on the machine would find it."""
    import ray
    from ray.cluster_utils import Cluster

    with token_auth_off(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
        patch.setattr(ray._common.utils, "reset_ray_address", lambda *args, **kwargs: None)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.fixture
def local_ray():
    """A private local Ray with 3 CPUs for one test ("local": never another session's cluster), auth pinned off."""
    import ray

    with token_auth_off():
        ray.init(address="local", num_cpus=3, include_dashboard=False)
        try:
            yield
        finally:
            ray.shutdown()
