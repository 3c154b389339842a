"""The launch/ scripts, run for real: a Ray head on 127.0.0.1 with a fake NPU count, a second node joining it, a
quantization through launch/quant_cluster.sh that matches the single-card checkpoint tensor by tensor, the scoped
stop leaving no process behind, the clear errors, a mocked Slurm job that fails and still stops Ray, and shellcheck
on every script.

Every Ray instance started here uses its own temp dir and is stopped through it (launch/stop.sh --temp-dir), so
other Ray runtimes on the machine are left alone; a finalizer stops them even when a test fails."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import (
    BASH,
    LAUNCH,
    PATH,
    RAY,
    ROOT,
    assert_same_checkpoint,
    free_port,
    read_checkpoint,
    run_script,
    short_temp_dir,
)

SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(BASH is None, reason="bash is not installed: the launch scripts are bash"),
    pytest.mark.skipif(RAY is None, reason="the 'ray' command is not installed (pip install 'ray[default]')"),
]


SCRIPT_TMP: list[str] = []  # TMPDIR of the scripts (their `ray start` logs), removed after the module


@pytest.fixture(scope="module", autouse=True)
def script_tmp():
    SCRIPT_TMP.append(tempfile.mkdtemp(prefix="dqlaunch", dir="/tmp"))
    yield
    shutil.rmtree(SCRIPT_TMP.pop(), ignore_errors=True)


def script_env(**extra) -> dict:
    env = dict(os.environ, PATH=PATH, DIST_QUANT_TIMEOUT="60")
    if SCRIPT_TMP:
        env["TMPDIR"] = SCRIPT_TMP[-1]
    for key in ("DIST_QUANT_NPUS", "DIST_QUANT_PORT", "DIST_QUANT_NODE_IP", "DIST_QUANT_ADDRESS", "RAY_ADDRESS"):
        env.pop(key, None)
    env.update(extra)
    return env


def run(script: str, *args, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run launch/SCRIPT with bash (in script_env() unless ``env``); stdout and stderr together in .stdout."""
    return run_script(script, *args, timeout=timeout, env=env or script_env())


def ray_status(address: str) -> str:
    """`ray status` with the same authentication choice as the scripts (launch/common.sh dq_setup_auth)."""
    cmd = 'source "$1"; dq_setup_auth; exec ray status --address "$2"'
    result = subprocess.run([BASH, "-c", cmd, "_", str(LAUNCH / "common.sh"), address], env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-2000:]
    return result.stdout


def total(status: str, resource: str) -> float:
    """The total of RESOURCE in `ray status` output ('0.0/2.0 NPU' -> 2.0; 0 when absent)."""
    usage = status.split("Total Usage:", 1)[1].split("\n\n", 1)[0]
    for line in usage.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == resource:
            return float(parts[0].split("/")[1])
    return 0.0


def processes_naming(text: str) -> list[str]:
    """Command lines of running processes that contain TEXT."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


class Cluster:
    def __init__(self):
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = short_temp_dir("dqhead")
        self.worker_temp_dir = short_temp_dir("dqwork")
        self.start: subprocess.CompletedProcess | None = None

    def start_head(self) -> subprocess.CompletedProcess:
        return run("start_head.sh", "--node-ip", "127.0.0.1", "--port", self.port, "--dashboard-port",
                   self.dashboard_port, "--npus", 2, "--num-cpus", 2, "--temp-dir", self.temp_dir)

    def stop_all(self):
        for temp_dir in (self.worker_temp_dir, self.temp_dir):
            run("stop.sh", "--force", "--temp-dir", temp_dir, timeout=60)
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(request):
    c = Cluster()
    request.addfinalizer(c.stop_all)  # runs even when start_head.sh or a test fails
    c.start = c.start_head()
    assert c.start.returncode == 0, c.start.stdout
    return c


GROUP = "2"  # experts per unit: 8 experts -> 4 groups per layer, more than top-k


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Top-3 of 8 experts (in 4 groups of 2): a token's MoE output adds up to 3 nonzero group partials, so adding them
    in another order than the plan's changes bits (with top-2, a + b == b + a and no order can show)."""
    out = tmp_path_factory.mktemp("launch") / "model"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(out), "--top-k", "3"],
                   check=True, cwd=ROOT, capture_output=True, timeout=120)
    return out


def test_head_starts_with_the_fake_npus(cluster):
    out = cluster.start.stdout
    assert "Ray head is up: 2 CPU, 2 NPU" in out
    assert "launch/start_worker.sh --head" in out and f":{cluster.port}" in out
    assert f"http://127.0.0.1:{cluster.dashboard_port}" in out
    status = ray_status(cluster.address)
    assert total(status, "NPU") == 2
    assert total(status, "CPU") == 2


def test_start_head_twice_is_harmless(cluster):
    again = cluster.start_head()
    assert again.returncode == 0, again.stdout
    assert "already running" in again.stdout
    assert total(ray_status(cluster.address), "NPU") == 2


def test_quant_cluster_matches_single_card(cluster, tiny, tmp_path):

    dataset = tiny / "calib" / "index.jsonl"
    single = tmp_path / "single"
    reference = subprocess.run([sys.executable, "-m", "dist_quant.cli", "quant", "--model_path", str(tiny),
                                "--save_path", str(single), "--device", "cpu", "--workers", "1", "--dataset",
                                str(dataset), "--quiet", "--expert_group_size", GROUP], cwd=ROOT, env=script_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert reference.returncode == 0, reference.stdout[-4000:]

    save = tmp_path / "dist"
    result = run("quant_cluster.sh", "--model_path", tiny, "--save_path", save, "--device", "cpu", "--workers", 2,
                 "--address", cluster.address, "--dataset", dataset, "--quiet", "--", "--expert_group_size", GROUP,
                 timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"done: checkpoint in {save}" in result.stdout
    log = tmp_path / "dist.log"
    assert f"log: {log}" in result.stdout
    assert "--workers 2" in log.read_text() and "quantized" in log.read_text()

    assert_same_checkpoint(save, read_checkpoint(single))


def test_worker_joins_once(cluster):
    args = ("--head", cluster.address, "--npus", 1, "--num-cpus", 1, "--temp-dir", cluster.worker_temp_dir)
    joined = run("start_worker.sh", *args)
    assert joined.returncode == 0, joined.stdout
    assert "the cluster now has 2 node(s)" in joined.stdout
    status = ray_status(cluster.address)
    assert total(status, "NPU") == 3 and total(status, "CPU") == 3

    again = run("start_worker.sh", *args)
    assert again.returncode == 0, again.stdout
    assert "already belongs to the cluster" in again.stdout


def test_stop_leaves_no_ray_process(cluster):
    for temp_dir in (cluster.worker_temp_dir, cluster.temp_dir):
        stopped = run("stop.sh", "--grace", 3, "--temp-dir", temp_dir, timeout=90)
        assert stopped.returncode == 0, stopped.stdout
        assert "stopped: no Ray process uses" in stopped.stdout
        assert processes_naming(temp_dir) == []
    assert processes_naming(f"--gcs_server_port={cluster.port}") == []
    assert [p for p in processes_naming("ray.util.client.server") if f":{cluster.port} " in p] == []
    again = run("stop.sh", "--temp-dir", cluster.temp_dir)
    assert again.returncode == 0 and "nothing to stop" in again.stdout


def test_worker_with_unreachable_head_fails_clearly():
    port = free_port()  # nothing listens there
    result = run("start_worker.sh", "--head", f"127.0.0.1:{port}", "--npus", 0, timeout=30)
    assert result.returncode != 0
    assert f"cannot reach the Ray head at 127.0.0.1:{port}" in result.stdout


def test_quant_cluster_without_cluster_fails_clearly(tmp_path):
    port = free_port()
    result = run("quant_cluster.sh", "--model_path", tmp_path, "--save_path", tmp_path / "out", "--address",
                 f"127.0.0.1:{port}", timeout=30)
    assert result.returncode != 0
    assert f"no Ray head answers at 127.0.0.1:{port}" in result.stdout


def test_missing_ray_is_explained(tmp_path):
    env = script_env(PATH=f"{Path(BASH).parent}{os.pathsep}/usr/bin{os.pathsep}/bin")
    if shutil.which("ray", path=env["PATH"]):
        pytest.skip("a system-wide 'ray' is installed")
    result = run("start_head.sh", "--npus", 0, env=env, timeout=30)
    assert result.returncode != 0
    assert "the 'ray' command was not found" in result.stdout and "activate" in result.stdout


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_help(script):
    result = run(script, "--help", timeout=30)
    assert result.returncode == 0, result.stdout
    assert "Usage" in result.stdout or "sbatch" in result.stdout


@pytest.mark.slow
def test_slurm_job_stops_ray_when_it_fails(tmp_path):
    """slurm_quant.sbatch on one 'node' with a fake srun/scontrol: the head starts, the cluster is waited for, the
    quantization fails (no model), and the job's trap still stops Ray."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $# -gt 0 && $1 == -* ]]; do\n'
                               '    case $1 in -w | -N | -n) shift 2 ;; *) shift ;; esac\ndone\nexec "$@"\n')
    (fake / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    temp_dir = short_temp_dir("dqslurm")
    env = script_env(PATH=f"{fake}{os.pathsep}{PATH}", SLURM_JOB_ID="1", SLURM_JOB_NODELIST="localhost",
                     SLURM_CPUS_ON_NODE="2", MODEL_PATH=str(tmp_path / "no_model"), SAVE_PATH=str(tmp_path / "out"),
                     NPUS_PER_NODE="2", RAY_PORT=str(free_port()), DEVICE="cpu", RAY_TEMP_DIR=temp_dir,
                     START_TIMEOUT="60", REPO_DIR=str(ROOT))
    try:
        result = subprocess.run([BASH, str(LAUNCH / "slurm_quant.sbatch")], cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=180)
        assert "cluster ready: 1 node(s), 2 NPU" in result.stdout, result.stdout[-4000:]
        assert result.returncode != 0 and "is not a directory" in result.stdout
        assert "stopping Ray on all nodes" in result.stdout
        assert processes_naming(temp_dir) == []
    finally:
        run("stop.sh", "--force", "--temp-dir", temp_dir, timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, *map(str, SCRIPTS)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def common(snippet: str, **env) -> subprocess.CompletedProcess:
    """Run SNIPPET in bash after sourcing launch/common.sh."""
    return subprocess.run([BASH, "-c", f'set -euo pipefail; source "$1"; {snippet}', "_", str(LAUNCH / "common.sh")],
                          env=script_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=30)


def test_npu_count_flag_env_and_npu_smi(tmp_path):
    assert common('dq_npu_count 4').stdout.strip() == "4 --npus"
    assert common('dq_npu_count ""', DIST_QUANT_NPUS="0").stdout.strip() == "0 DIST_QUANT_NPUS"
    assert common('dq_npu_count 4', DIST_QUANT_NPUS="8").stdout.strip() == "4 --npus"
    assert common('dq_npu_count x').returncode != 0
    if list(Path("/dev").glob("davinci[0-9]*")):
        pytest.skip("this machine has /dev/davinci devices: npu-smi is not consulted")
    fake = tmp_path / "npu-smi"
    fake.write_text("#!/usr/bin/env bash\nprintf '\\tTotal Count                    : 16\\n\\n\\tNPU ID : 0\\n'\n")
    fake.chmod(0o755)
    assert common('dq_npu_count ""', PATH=f"{tmp_path}{os.pathsep}{PATH}").stdout.strip() == "16 detected"


def test_cann_env_is_sourced(tmp_path):
    env_file = tmp_path / "set_env.sh"
    env_file.write_text('export DQ_TEST_CANN="loaded $UNSET_BY_CANN_SCRIPTS"\n')  # reads an unset variable
    result = common('dq_source_cann; echo "[$DQ_TEST_CANN]"', ASCEND_ENV=str(env_file))
    assert result.returncode == 0, result.stdout
    assert "CANN environment: " in result.stdout and "[loaded ]" in result.stdout


def test_start_head_refuses_a_busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("start_head.sh", "--node-ip", "127.0.0.1", "--port", port, "--no-dashboard", "--npus", 0,
                     timeout=60)
    assert result.returncode != 0
    assert f"port {port} (--port) is already in use" in result.stdout
