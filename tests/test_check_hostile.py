"""`dist-quant check` on folders made to hurt it: each gives verdicts naming the file or tensor, in bounded time and
memory, never a traceback or a hang (issue 27)."""

import json
import os
import subprocess
import sys
import time

import torch

from dist_quant.check import check_checkpoint, format_report
from dist_quant.check.ascend import RULES
from helpers import DESCRIPTION, LAYER0, add, changed, deadline, mutate

O_PROJ = f"{LAYER0}.self_attn.o_proj"


def violations(report, rule):
    return next(v.violations for v in report.verdicts if v.rule.id == rule)


def test_a_fifo_named_safetensors_is_a_violation_and_never_opened(good, tmp_path):
    folder = mutate(good, tmp_path)
    os.mkfifo(folder / "extra.safetensors")  # no writer: opening it for reading would block for ever
    (folder / DESCRIPTION).unlink()
    os.mkfifo(folder / DESCRIPTION)
    with deadline(60):
        report = check_checkpoint(folder)
    assert report.failed() == ["R1", "R5"] and not report.ok
    assert violations(report, "R5") == ["extra.safetensors is unreadable (is a FIFO (named pipe), not a regular file)"]
    assert violations(report, "R1") == [f"{DESCRIPTION} is unreadable (is a FIFO (named pipe), not a regular file)"]


def test_a_folder_named_safetensors_is_a_violation(good, tmp_path):
    folder = mutate(good, tmp_path)
    (folder / "extra.safetensors").mkdir()
    assert violations(check_checkpoint(folder), "R5") == [
        "extra.safetensors is unreadable (is a directory, not a regular file)"]


def test_non_finite_input_offset_and_scale_are_violations_naming_the_tensor(good, tmp_path):
    for i, (role, value) in enumerate((("input_offset", float("nan")), ("input_offset", float("inf")),
                                       ("input_scale", float("nan")), ("input_scale", 0.0))):
        folder = mutate(good, tmp_path / str(i),
                        tensors=changed(f"{O_PROJ}.{role}", lambda t: torch.full_like(t, value)))
        report = check_checkpoint(folder)
        assert report.failed() == ["R12"], format_report(report)
        assert violations(report, "R12")[0].startswith(f"{O_PROJ}.{role} is {value}")


def test_a_deeply_nested_description_is_refused_naming_the_file(good, tmp_path):
    depth = 200_000
    folder = mutate(good, tmp_path)
    (folder / DESCRIPTION).write_text("[" * depth + "]" * depth)
    report = check_checkpoint(folder)
    assert violations(report, "R1") == [f"{DESCRIPTION} is unreadable (nested too deeply to parse)"]
    shallow = mutate(good, tmp_path / "b", description=add("kv_cache_type", json.loads("[" * 900 + "]" * 900)))
    report = check_checkpoint(shallow)  # parses, but repr() of it in a message would overflow the stack
    assert violations(report, "R1") == [f"{DESCRIPTION} is unreadable (nested more than 32 levels deep)"]


def test_a_config_claiming_millions_of_experts_is_refused_at_once(good, tmp_path):
    folder = mutate(good, tmp_path, config=lambda c: c["text_config"].update(num_hidden_layers=1024,
                                                                             num_experts=16384))
    start = time.monotonic()
    report = check_checkpoint(folder)
    assert time.monotonic() - start < 10  # before: ~40 min and ~35 GB (measured 76 s, +1.1 GB at 128 x 4096)
    # layer 2 has a dense MLP: 1023 MoE layers x 16384 experts x 3 projections
    assert violations(report, "R4")[0].startswith(
        f"config.json: 1023 MoE layers x 16384 experts, {1023 * 16384 * 3} expert linears for ")


def test_the_table_prints_every_rule_text_whole(good):
    out = format_report(check_checkpoint(good))
    for rule in RULES.values():
        assert f"| {rule.id}: {rule.text} |" in out
    assert max(len(r.text) for r in RULES.values()) > 90  # the old cut would have shown


def test_terminal_escapes_in_a_checkpoint_never_reach_the_terminal(good, tmp_path):
    """A key can hold any character: printed raw, ESC sequences would rewrite the table ("ALL GOOD") or the window
    title. They are shown as \\xNN."""
    hostile = "\x1b[2K\x1b[1A\x1b[32mALL GOOD\x1b[0m\x1b]0;pwned\x07"
    folder = mutate(good, tmp_path, description=lambda d: d.update({f"model.{hostile}.weight": "W8A8"}))
    out = format_report(check_checkpoint(folder))
    assert "\x1b" not in out and "\x07" not in out and "\\x1b[32mALL GOOD" in out


def test_a_huge_sparse_scale_is_not_read(good, tmp_path):
    """A part file may declare a 20M-element input_scale in a sparse file (8 KB on disk): the rules that read scale
    values read only a scale of the parameter's shape [1], so the check stays quick and small."""
    from safetensors.torch import save_file

    folder = mutate(good, tmp_path)
    big = folder / "big.safetensors"
    save_file({"x": torch.zeros(1)}, str(big))  # a header to rewrite
    header = json.dumps({f"{LAYER0}.self_attn.{p}.input_scale": {"dtype": "F32", "shape": [20_000_000],
                                                                  "data_offsets": [0, 80_000_000]}
                         for p in ("q_proj",)}).encode()
    with open(big, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 80_000_000)  # sparse
    child = ("import resource, sys; from dist_quant.check import check_checkpoint; "
             "report = check_checkpoint(sys.argv[1]); "
             "print(report.ok, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peaks = []
    for checked in (good, folder):
        run = subprocess.run([sys.executable, "-c", child, str(checked)], capture_output=True, text=True, timeout=120)
        ok, peak_kib = run.stdout.split()
        peaks.append(int(peak_kib))
    assert ok == "False" and peaks[1] - peaks[0] < 40_000, peaks  # KiB: reading the scale would be 80 MB more
