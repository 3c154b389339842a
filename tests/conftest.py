"""The fixtures that more than one test module uses (a module's own fixtures stay in it); helpers that are not
fixtures are in helpers.py."""

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dist_quant.recipe import DEFAULT_RECIPE  # noqa: E402
from dist_quant.synthetic import make_calibration_set, make_tiny_model, make_tiny_text_model  # noqa: E402
from helpers import FAMILIES, FAMILY_TYPES, quantize, quantized  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random fp32 Qwen3-VL-MoE with one dense-MLP layer, built once per test session."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", mlp_only_layers=(2,))


@pytest.fixture(scope="session")
def calib_index(tmp_path_factory) -> Path:
    return make_calibration_set(tmp_path_factory.mktemp("calib") / "images", num_images=3)


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory) -> Path:
    """A tiny random fp32 Qwen3-MoE, the text-only family (per-expert keys, no vision tower): 3 layers, top-3 of 8
    experts (in groups of 2 the order partial sums are added in shows in the bits), layer 1 a dense MLP."""
    return make_tiny_text_model(tmp_path_factory.mktemp("tiny_text") / "model", num_layers=3, num_experts=8, top_k=3,
                                mlp_only_layers=(1,))


TEXT_SAMPLES = ("The quick brown fox jumps over the lazy dog near the river bank.",
                "def add(a, b):\n    return a + b  # adds two numbers")


@pytest.fixture(scope="session")
def text_calib(tmp_path_factory) -> Path:
    """Two text samples, as msModelSlim's text calibration sets hold them (one "text" and one
    "inputs_pretokenized" line of a .jsonl)."""
    path = tmp_path_factory.mktemp("text_calib") / "calib.jsonl"
    path.write_text(json.dumps({"text": TEXT_SAMPLES[0]}) + "\n"
                    + json.dumps({"inputs_pretokenized": TEXT_SAMPLES[1]}) + "\n", encoding="utf-8")
    return path


class FamilyModel(NamedTuple):
    """A tiny model of one family with what quantizes it: the family's bundled W8A8 recipe and a small calibration
    set of the family's kind (None would be quant's default, the bundled set of hundreds of samples: too slow here)."""

    model: Path
    recipe: Path
    dataset: Optional[Path]
    model_type: str


@pytest.fixture(scope="module", params=FAMILY_TYPES)
def family_model(request) -> FamilyModel:
    """Each family's tiny model in turn (the session's tiny_model and tiny_text_model), its W8A8 preset's recipe and
    a small calibration set of its kind (3 images; 2 texts), for tests whose property holds for every family.

    Module-scoped over session-scoped models: pytest groups the tests of a parametrized session fixture across
    modules, which would split a module's tests (and its module fixtures) in two."""
    model_type = request.param
    model, dataset = (("tiny_model", "calib_index") if model_type == "qwen3_vl_moe"
                      else ("tiny_text_model", "text_calib"))
    return FamilyModel(request.getfixturevalue(model), DEFAULT_RECIPE.parent / f"{model_type}_w8a8.yaml",
                       request.getfixturevalue(dataset), model_type)


_family_checkpoints: dict[str, Path] = {}


@pytest.fixture(scope="module")
def family_checkpoint(family_model, tmp_path_factory) -> Path:
    """family_model quantized by `dist-quant quant` with the model's preset (its family's W8A8 recipe, expert
    groups of the default size), once per session and family (the modules that read it do not change it)."""
    if family_model.model_type not in _family_checkpoints:
        save = tmp_path_factory.mktemp(f"{family_model.model_type}_w8a8") / "q"
        _family_checkpoints[family_model.model_type] = quantize(family_model.model, family_model.dataset, save)
    return _family_checkpoints[family_model.model_type]


@pytest.fixture
def model(tiny_model, tmp_path) -> Path:
    """A private copy of the session's tiny model, free to corrupt (the bad- and hostile-input tests)."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory) -> Path:
    """The tiny model's weights in 8 shards with an index (the bad- and hostile-input tests)."""
    return make_tiny_model(tmp_path_factory.mktemp("sharded") / "model", mlp_only_layers=(2,), shard_size="300KB")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Qwen3-VL-MoE's bfloat16 W8A8 checkpoint with a dense-MLP layer, quantized once per session (helpers.quantized;
    tests/test_check.py's family_good of this family is the same folder): the check tests mutate copies of it."""
    return quantized(tmp_path_factory, FAMILIES["qwen3_vl_moe"], "good")


@pytest.fixture(scope="module")
def report_model(tmp_path_factory):
    """16 experts, top-1, one image: some experts see no token (the report's map must mark them)."""
    return make_tiny_model(tmp_path_factory.mktemp("report") / "model", num_layers=3, num_experts=16, top_k=1,
                           dtype="bfloat16")


@pytest.fixture(scope="module")
def report_calib(tmp_path_factory):
    return make_calibration_set(tmp_path_factory.mktemp("report_calib") / "images", num_images=1)


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
def private_cluster(monkeypatch):
    """ray.cluster_utils.Cluster writes its address to /tmp/ray/ray_current_cluster, where every ray.init() on the
    machine (other sessions' tests included) would find and join it, and removes that file when it shuts down:
    keep both to this test."""
    import ray

    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *args, **kwargs: None)


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
