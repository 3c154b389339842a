"""--resume: a run killed at a random unit continues and gives exactly the checkpoint of an uninterrupted run;
resuming with another recipe or calibration set is refused."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import assert_same_checkpoint, read_checkpoint

from dist_quant.cli import main
from dist_quant.synthetic import make_calibration_set, make_tiny_model

JOURNAL = Path(".dist_quant_staging") / "run" / "journal.jsonl"
GROUP = ["--expert_group_size", "4"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("resume") / "model", num_layers=8, num_experts=16, top_k=2,
                           hidden_size=128, moe_intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=32)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return make_calibration_set(tmp_path_factory.mktemp("resume_calib") / "images", num_images=3)


def args(model, calib, save, *extra):
    return ["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu", "--dataset",
            str(calib), "--quiet", *GROUP, *extra]


@pytest.fixture(scope="module")
def clean(model, calib, tmp_path_factory):
    save = tmp_path_factory.mktemp("clean") / "q"
    assert main(args(model, calib, save)) == 0
    return read_checkpoint(save)


def kill_after_units(cmd: list[str], journal: Path, units: int) -> int:
    """Run the CLI in a child process and SIGKILL it once ``units`` units are journaled; returns how many were."""
    log = journal.parent.parent.parent.with_name("child.log")
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) - 1 >= units:
            os.kill(child.pid, signal.SIGKILL)
            break
        time.sleep(0.001)
    child.wait()
    assert child.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {log.read_text()[-3000:]}"
    return len(journal.read_text().splitlines()) - 1


def test_single_card_run_killed_at_a_random_unit_resumes_to_the_same_checkpoint(model, calib, clean, tmp_path):
    save = tmp_path / "q"
    units = random.Random().randint(8, 35)  # of 2 + 8 * (1 + 4) + 1 = 43; layer 0's output is saved after unit 7
    cmd = [sys.executable, "-m", "dist_quant.cli", *args(model, calib, save)]
    finished = kill_after_units(cmd, save / JOURNAL, units)
    assert finished >= units and not (save / "quant_model_description.json").exists()
    assert main(args(model, calib, save, "--resume")) == 0
    assert_same_checkpoint(save, clean)
    log = (save / "quant_run.log").read_text()
    assert "resuming after layer" in log and "resuming after layer none" not in log
    assert not (save / ".dist_quant_staging").exists()


def test_resume_with_another_recipe_or_calibration_set_is_refused(model, calib, tmp_path, capsys):
    save = tmp_path / "q"
    kill_after_units([sys.executable, "-m", "dist_quant.cli", *args(model, calib, save)], save / JOURNAL, 5)
    other = Path(__file__).parent / "data" / "plain_w8a8.yaml"
    assert main(args(model, calib, save, "--resume", "--config_path", str(other))) == 2
    assert "recipe differ" in capsys.readouterr().err
    other_calib = make_calibration_set(tmp_path / "other", num_images=2, seed=9)
    assert main(args(model, other_calib, save, "--resume")) == 2
    assert "calibration differ" in capsys.readouterr().err
    assert (save / JOURNAL).exists()  # the interrupted run is still there to resume


def test_resume_without_an_interrupted_run(model, calib, tmp_path, capsys):
    assert main(args(model, calib, tmp_path / "q", "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.ray
def test_ray_run_killed_at_a_random_unit_resumes_to_the_same_checkpoint(model, calib, clean, tmp_path):
    """The driver (with its 2 actors) is killed; a new driver resumes on the same cluster."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        save = tmp_path / "q"
        ray_args = ["--workers", "2", "--ray_address", cluster.address]
        units = random.Random().randint(9, 30)  # layer 0's output is saved when layer 1's attention starts
        kill_after_units([sys.executable, "-m", "dist_quant.cli", *args(model, calib, save, *ray_args)],
                         save / JOURNAL, units)
        assert not (save / "quant_model_description.json").exists()
        assert main(args(model, calib, save, *ray_args, "--resume")) == 0
        assert_same_checkpoint(save, clean)
        log = (save / "quant_run.log").read_text()
        assert "resuming after layer" in log and "resuming after layer none" not in log
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
