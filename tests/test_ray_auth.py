"""Ray token authentication, for real: `dist-quant quant --ray_address HOST:PORT` joins a head started with a token
(token authentication on, what `ray start --head` does once ~/.ray/auth_token exists) and a head started without one
(authentication off) with nothing set by the user, and a missing or wrong token is a one-line error saying what to
set; a head without tokens leaves RAY_AUTH_MODE alone.

Every head gets its own HOME (so ~/.ray/auth_token is the test's, never the user's) and its own temp dir, and is
stopped through that temp dir (launch/stop.sh --temp-dir, not a machine-wide `ray stop`) even when a test fails."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dist_quant.errors import DistQuantError
from helpers import BASH, PATH, RAY, ROOT, free_port, run_script, short_temp_dir

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(BASH is None, reason="bash is not installed: launch/stop.sh is bash"),
    pytest.mark.skipif(RAY is None, reason="the 'ray' command is not installed (pip install 'ray[default]')"),
]

AUTH_ON = "Token authentication is enabled for this Ray cluster"  # what `ray start --head` logs (Ray's own words)
AUTH_OFF = "Token authentication is disabled for this Ray cluster"


def make_home(root: Path, token: str | None) -> Path:
    """A HOME whose ~/.ray/auth_token holds TOKEN (none when None)."""
    home = root / ("home-" + (token[:8] if token else "none"))
    (home / ".ray").mkdir(parents=True)
    if token is not None:
        (home / ".ray" / "auth_token").write_text(token)
    return home


def clean_env(home: Path, **extra) -> dict:
    """The environment of a user who set nothing for Ray: no RAY_AUTH_MODE, no RAY_AUTH_TOKEN[_PATH], no RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=PATH, DIST_QUANT_TIMEOUT="60", **extra)
    return env


class Head:
    """`ray start --head` on 127.0.0.1 with HOME=home: token authentication is on exactly when home has a token."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = short_temp_dir("dqauth")
        self.output = ""

    def start(self) -> None:
        result = subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                                 "--num-cpus", "2", "--temp-dir", self.temp_dir, "--include-dashboard", "false",
                                 "--disable-usage-stats"], env=clean_env(self.home), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=120)
        self.output = result.stdout
        assert result.returncode == 0, result.stdout[-3000:]

    def stop(self) -> None:
        run_script("stop.sh", "--force", "--temp-dir", self.temp_dir, timeout=60, env=clean_env(self.home))
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(request, home: Path) -> Head:
    head = Head(home)
    request.addfinalizer(head.stop)  # runs even when `ray start` or a test fails
    head.start()
    return head


@pytest.fixture(scope="module")
def homes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("auth")
    return {"head": make_home(root, secrets.token_hex(32)), "other": make_home(root, secrets.token_hex(32)),
            "none": make_home(root, None)}


@pytest.fixture(scope="module")
def token_head(request, homes) -> Head:
    head = start_head(request, homes["head"])
    assert AUTH_ON in head.output, head.output[-3000:]  # the case under test: `ray start` turned tokens on by itself
    return head


@pytest.fixture(scope="module")
def open_head(request, homes) -> Head:
    head = start_head(request, homes["none"])
    assert AUTH_OFF in head.output, head.output[-3000:]
    return head


def quant(model: Path, calib: Path, save: Path, address: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_quant.cli", "quant", "--model_path", str(model),
                           "--save_path", str(save), "--device", "cpu", "--workers", "2", "--ray_address", address,
                           "--dataset", str(calib), "--quiet"], cwd=ROOT, env=clean_env(home),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)


def assert_published(result: subprocess.CompletedProcess, save: Path) -> None:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "quantized" in result.stdout and (save / "quant_model_description.json").is_file()


def test_quant_joins_a_head_with_token_auth(token_head, homes, tiny_model, calib_index, tmp_path):
    """The user's shell has the head's token in ~/.ray/auth_token and no RAY_AUTH_MODE."""
    save = tmp_path / "out"
    assert_published(quant(tiny_model, calib_index, save, token_head.address, homes["head"]), save)


def test_quant_joins_a_head_without_token_auth(open_head, homes, tiny_model, calib_index, tmp_path):
    """The user's machine has a token of its own (any earlier local Ray run leaves one), the head has none."""
    save = tmp_path / "out"
    assert_published(quant(tiny_model, calib_index, save, open_head.address, homes["other"]), save)


def test_wrong_token_is_a_one_line_error_naming_what_to_set(token_head, homes, tiny_model, calib_index, tmp_path):
    result = quant(tiny_model, calib_index, tmp_path / "out", token_head.address, homes["other"])
    assert result.returncode == 2, (result.stdout + result.stderr)[-4000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("dist-quant: error:")]
    assert len(error) == 1, result.stderr[-4000:]
    assert f"the Ray cluster at {token_head.address} refused this machine's token" in error[0]
    assert "set RAY_AUTH_TOKEN" in error[0] and str(homes["other"] / ".ray" / "auth_token") in error[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "quant_model_description.json").exists()


@pytest.fixture(autouse=True)
def ray_config_follows_the_environment():
    """Ray caches RAY_AUTH_MODE in its process-wide RayConfig and the token in its token loader: once monkeypatch has
    put the environment back (it is torn down before this autouse fixture), make Ray read both again, so later tests
    in this process see no leftover "disabled" or "token" mode and no token from this module's HOMEs (a cached token
    makes this process's own gRPC server demand it, and a head without tokens then finds the driver dead). The order
    is Ray's own (ray._private.authentication_test_utils.reset_auth_token_state): the config first."""
    yield
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def set_client(monkeypatch, home: Path, **env) -> None:
    for key in [k for k in os.environ if k.startswith("RAY_AUTH")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(home))
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_missing_token_and_explicit_disabled_mode_are_clear_errors(token_head, homes, monkeypatch):
    from dist_quant.runtime.ray_connect import prepare_auth

    set_client(monkeypatch, homes["none"])
    with pytest.raises(DistQuantError, match="uses token authentication and this machine has no token: set "
                                             "RAY_AUTH_TOKEN"):
        prepare_auth(token_head.address)
    set_client(monkeypatch, homes["head"], RAY_AUTH_MODE="disabled")
    with pytest.raises(DistQuantError, match="uses token authentication but RAY_AUTH_MODE=disabled here: unset"):
        prepare_auth(token_head.address)
    assert os.environ["RAY_AUTH_MODE"] == "disabled"  # the user's choice is kept, and explained


def test_token_from_ray_auth_token_is_checked_against_the_head(token_head, homes, monkeypatch):
    from dist_quant.runtime.ray_connect import prepare_auth

    set_client(monkeypatch, homes["none"], RAY_AUTH_TOKEN="not-the-head's")
    with pytest.raises(DistQuantError, match="refused this machine's token \\(from RAY_AUTH_TOKEN\\)"):
        prepare_auth(token_head.address)
    assert "RAY_AUTH_MODE" not in os.environ


@pytest.mark.parametrize("client", ["none", "other"])
def test_head_without_tokens_leaves_ray_auth_mode_unset(open_head, homes, monkeypatch, client):
    """An earlier fix set RAY_AUTH_MODE=token whenever ~/.ray/auth_token existed, which broke clusters without
    tokens: joining a head without authentication switches nothing on, whether this machine has a token or not."""
    import ray

    from dist_quant.runtime.ray_driver import start_ray

    set_client(monkeypatch, homes[client])
    assert not ray.is_initialized()
    try:
        assert start_ray(open_head.address, 2, "cpu") == (ray, True)
        assert "RAY_AUTH_MODE" not in os.environ
        assert ray.cluster_resources()["CPU"] == 2
    finally:
        ray.shutdown()
