"""What a run may do to save_path and what it says when stopped: one run per save_path (a second fails at once,
naming the first), --overwrite replaces only a checkpoint, save_path never overlaps the model or calibration set, no
debris after an early failure or a success, Ctrl-C and SIGTERM print one line with the command that continues."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from dist_quant.cli import main
from dist_quant.synthetic import make_calibration_set, make_tiny_model
from helpers import assert_same_checkpoint, read_checkpoint

PLAIN_RECIPE = Path(__file__).parent / "data" / "plain_w8a8.yaml"
STAGING = ".dist_quant_staging"
LOCK = ".dist_quant.lock"
ENV = {k: v for k, v in os.environ.items() if k != "DIST_QUANT_KILL_AT"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("safety") / "model", num_layers=6, num_experts=8, top_k=3)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return make_calibration_set(tmp_path_factory.mktemp("safety_calib") / "images", num_images=3)


def args(model, calib, save, *extra):
    return ["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu", "--dataset",
            str(calib), "--quiet", "--config_path", str(PLAIN_RECIPE), "--expert_group_size", "2", *extra]


@pytest.fixture(scope="module")
def clean(model, calib, tmp_path_factory):
    save = tmp_path_factory.mktemp("clean") / "q"
    assert main(args(model, calib, save)) == 0
    return read_checkpoint(save)


def start_child(cmd, log: Path, **env) -> subprocess.Popen:
    """The run in a child process that takes Ctrl-C: a shell starts a background job (``pytest ... &``) with SIGINT
    ignored, which a child inherits, and Python then installs no KeyboardInterrupt handler; a handled signal is
    reset to the default across exec, so handle it here while the child starts."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, "-m", "dist_quant.cli", *cmd], env={**ENV, **env},
                                stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    finally:
        signal.signal(signal.SIGINT, previous)


def wait_for(condition, child: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert child.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def journal_lines(save: Path) -> int:
    journal = save / STAGING / "run" / "journal.jsonl"
    return len(journal.read_text().splitlines()) if journal.exists() else 0


def test_second_run_into_the_same_save_path_fails_at_once_naming_the_first(model, calib, clean, tmp_path, capsys):
    save = tmp_path / "q"
    first = start_child(args(model, calib, save), tmp_path / "first.log")
    try:
        wait_for(lambda: journal_lines(save) >= 2, first, "the first run's first unit")
        os.kill(first.pid, signal.SIGSTOP)  # hold it mid-run
        started = time.monotonic()
        assert main(args(model, calib, save, "--overwrite")) == 2
        err = capsys.readouterr().err
        assert time.monotonic() - started < 30
        assert f"pid {first.pid}" in err and "in use by another dist-quant run" in err and "started" in err
        assert main(args(model, calib, save, "--resume")) == 2
        assert f"pid {first.pid}" in capsys.readouterr().err
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    assert_same_checkpoint(save, clean)  # the first run's checkpoint, untouched by the refused ones
    assert not (save / LOCK).exists() and not (save / STAGING).exists()


RAY = pytest.mark.ray
INTERRUPTS = [(signal.SIGTERM, 143, "SIGTERM", "single card"), (signal.SIGINT, 130, "Ctrl-C", "single card"),
              # Ray's own SIGTERM handler aborts the driver; Ctrl-C on Ray is the same KeyboardInterrupt path of the
              # driver skeleton as on a single card (left out to keep the suite short)
              pytest.param(signal.SIGTERM, 143, "SIGTERM", "ray", marks=RAY)]


@pytest.mark.parametrize("sig, code, name, where", INTERRUPTS)
def test_interrupt_prints_one_line_with_the_command_that_continues(model, calib, clean, tmp_path, request, sig, code,
                                                                   name, where):
    mode = ("--workers", "2", "--ray_address", request.getfixturevalue("cluster").address) if where == "ray" else ()
    save = tmp_path / "q"
    log = tmp_path / "child.log"
    child = start_child(args(model, calib, save, *mode), log)
    wait_for(lambda: journal_lines(save) >= 4, child, "two finished units (and the vision stream)")
    child.send_signal(sig)
    assert child.wait(timeout=120) == code
    err = log.read_text()
    assert "Traceback" not in err
    line = [line for line in err.strip().splitlines() if line.startswith("dist-quant:")][-1]
    match = re.fullmatch(rf"dist-quant: interrupted \({name}\): (\d+) finished unit\(s\) are kept in (.*); "
                         r"continue with: dist-quant (.*)", line)
    assert match, err
    assert int(match[1]) >= 2 and match[2] == str(save / STAGING)
    assert not (save / "quant_model_description.json").exists() and not (save / LOCK).exists()
    command = match[3].split(" ")  # the paths of this test have no spaces
    assert command == [*args(model, calib, save, *mode), "--resume"]
    resumed = subprocess.run([sys.executable, "-m", "dist_quant.cli", *command], env=ENV, capture_output=True,
                             text=True, timeout=600)  # what the user runs next: a new process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_checkpoint(save, clean)


def test_save_path_may_not_overlap_the_calibration_set(model, calib, tmp_path, capsys):
    folder = calib.parent
    before = sorted(p.name for p in folder.iterdir())
    for save in (folder, folder / "out", folder.parent):
        assert main(args(model, calib, save, "--overwrite")) == 2
        assert "calibration set" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == before
    assert not (folder / "out").exists()


def test_overwrite_replaces_only_a_checkpoint(model, calib, clean, tmp_path, capsys):
    unrelated = tmp_path / "project"
    (unrelated / ".git").mkdir(parents=True)
    (unrelated / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (unrelated / "notes.md").write_text("mine")
    assert main(args(model, calib, unrelated, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "not part of a quantized checkpoint" in err and ".git" in err and "notes.md" in err
    assert (unrelated / ".git" / "HEAD").exists() and (unrelated / "notes.md").exists()
    assert not (unrelated / STAGING).exists() and not (unrelated / LOCK).exists()

    save = tmp_path / "q"  # a checkpoint with a user's file dropped in: refused too, listing it
    assert main(args(model, calib, save)) == 0
    mine = ["my_eval_results.csv", "eval_report.json", "notes.txt", "serve.py", "my_sweep.yaml"]
    for name in mine:  # files of kinds a checkpoint holds too: only the checkpoint's own list may be deleted
        (save / name).write_text("keep me")
    assert main(args(model, calib, save, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in mine), err
    for name in mine:
        (save / name).unlink()
    assert main(args(model, calib, save, "--overwrite")) == 0  # a checkpoint alone is replaced
    assert_same_checkpoint(save, clean)


def test_no_debris_after_an_early_failure_or_a_success(model, calib, clean, tmp_path, capsys):
    broken = tmp_path / "broken_model"
    broken.mkdir()
    for path in model.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    key = next(k for k in tensors if k.startswith("model.visual.blocks.0.") and k.endswith("weight"))
    tensors[key][0] = float("nan")  # found by the first unit, after save_path was created
    save_file(tensors, broken / "model.safetensors")
    deep = tmp_path / "a" / "b" / "c"
    assert main(args(broken, calib, deep)) == 2
    capsys.readouterr()
    assert not (tmp_path / "a").exists()
    save = tmp_path / "q"
    assert main(args(model, calib, save)) == 0
    assert not (save / STAGING).exists() and not (save / LOCK).exists()


def test_a_dangling_symlink_as_save_path_is_refused(model, calib, tmp_path, capsys):
    link = tmp_path / "link"
    os.symlink(tmp_path / "nowhere", link)
    assert main(args(model, calib, link)) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and "does not exist" in err and "Traceback" not in err


def test_an_unreadable_journal_is_one_line(model, calib, tmp_path, capsys):
    save = tmp_path / "q"
    child = start_child(args(model, calib, save), tmp_path / "child.log", DIST_QUANT_KILL_AT="unit:3")
    assert child.wait(timeout=120) == -9
    (save / STAGING / "run" / "journal.jsonl").write_bytes(b"\xff\xfe{{{\n")
    assert main(args(model, calib, save, "--resume")) == 2
    err = capsys.readouterr().err
    assert "journal" in err and "unreadable" in err and err.count("\n") == 1
