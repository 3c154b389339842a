"""--resume from anywhere: a run killed (SIGKILL, no cleanup) at a seeded point of each phase continues and gives
exactly the checkpoint of an uninterrupted run, single card and on Ray; it recomputes only what was not kept; it
starts afresh when nothing had finished and answers at once when the checkpoint was already published; runs with
another recipe, calibration set or changed weights are refused; journal records cannot name files outside staging."""

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from dist_quant.cli import main
from dist_quant.recipe import DEFAULT_RECIPE, load_recipe
from dist_quant.runtime.local import quantize_single_card
from dist_quant.runtime.plan import plan_units
from dist_quant.synthetic import make_calibration_set, make_tiny_model
from helpers import assert_same_checkpoint, read_checkpoint

STAGING = ".dist_quant_staging"
JOURNAL = Path(STAGING) / "run" / "journal.jsonl"
GROUP = ["--expert_group_size", "2"]
SEED = 20261201
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "DIST_QUANT_KILL_AT"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """8 experts, top-3, groups of 2 (4 groups): the partial sums' order matters; 3 MoE layers."""
    return make_tiny_model(tmp_path_factory.mktemp("resume") / "model", num_layers=3, num_experts=8, top_k=3,
                           hidden_size=128, moe_intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=32,
                           deepstack=(0, 1), dtype="bfloat16")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return make_calibration_set(tmp_path_factory.mktemp("resume_calib") / "images", num_images=3)


def small_parts(recipe: Path, folder: Path) -> Path:
    """The recipe (QuaRot + smoothing) with parts of ~200 KB, so that assembly writes several parts."""
    raw = yaml.safe_load(recipe.read_text())
    raw["spec"]["save"][0]["part_file_size"] = 0.0002
    path = folder / "small_parts.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The bundled recipe with parts of ~200 KB."""
    return small_parts(Path(DEFAULT_RECIPE), tmp_path_factory.mktemp("recipe"))


def args(model, calib, recipe, save, *extra):
    return ["quant", "--model_path", str(model), "--save_path", str(save), "--device", "cpu", "--dataset",
            str(calib), "--quiet", "--config_path", str(recipe), *GROUP, *extra]


@pytest.fixture(scope="module")
def clean(model, calib, recipe, tmp_path_factory):
    save = tmp_path_factory.mktemp("clean") / "q"
    summary = quantize_single_card(str(model), str(save), load_recipe(recipe), dataset=str(calib), progress=False,
                                   expert_group_size=2)
    return read_checkpoint(save), summary


def killed(cmd: list[str], point: str, log: Path) -> None:
    """Run the CLI in a child that SIGKILLs itself at ``point`` (DIST_QUANT_KILL_AT, see dist_quant/failpoints.py)."""
    child = subprocess.run([sys.executable, "-m", "dist_quant.cli", *cmd],
                           env={**CLEAN_ENV, "DIST_QUANT_KILL_AT": point},
                           stdout=subprocess.DEVNULL, stderr=open(log, "wb"), timeout=600)
    assert child.returncode == -9, f"the run was not killed at {point}: {log.read_text()[-3000:]}"


def assert_resumed_like_clean(save: Path, clean_checkpoint) -> None:
    assert_same_checkpoint(save, clean_checkpoint)
    assert not (save / STAGING).exists() and not (save / ".dist_quant.lock").exists()


def nothing_finished_looking(save: Path) -> None:
    assert not (save / "quant_model_description.json").exists()


def units_of(model) -> list[str]:
    from dist_quant.models.qwen3_vl_moe import load_config

    return [u.id for u in plan_units(load_config(json.loads((model / "config.json").read_text())), 2)]


# 3 + 3 * (1 + 4) + 1 = 19 units; kill points in every phase, counts drawn from one seed
rng = random.Random(SEED)
SINGLE_CARD_POINTS = {
    "startup": "startup",
    "mid-vision": "vision:2",  # after the second image's forward, before the tower is written
    "mid-layer": f"experts:{rng.randint(3, 20)}",  # inside an expert-group unit (after its N-th expert)
    "between-units": f"unit:{rng.randint(3, 16)}",
    "publish": f"publish:{rng.randint(1, 5)}",
}


# Qwen3-MoE (conftest.py's tiny_text_model: 3 layers, layer 1 dense): no vision phase, so the resume point is a saved
# layer output alone; start-up and publish are the shared driver's and writer's (above), and tests/test_qwen3_moe.py
# kills it at two more points with the plain recipe
TEXT_POINTS = {
    "mid-layer": "experts:13",  # layer 2's fifth expert (layer 0 has 8, the dense layer 1 none): after a dense layer
}
KILL_POINTS = {"qwen3_vl_moe": SINGLE_CARD_POINTS, "qwen3_moe": TEXT_POINTS}


@pytest.fixture(scope="module")
def vl_run(model, calib, recipe, clean):
    """(model, calibration set, recipe, clean checkpoint) of this module's Qwen3-VL-MoE."""
    return model, calib, recipe, clean[0]


@pytest.fixture(scope="module")
def text_run(tiny_text_model, text_calib, tmp_path_factory):
    """(model, calibration set, recipe, clean checkpoint) of the text family: its bundled recipe with small parts."""
    recipe = small_parts(Path(DEFAULT_RECIPE).parent / "qwen3_moe_w8a8.yaml", tmp_path_factory.mktemp("text_recipe"))
    save = tmp_path_factory.mktemp("text_clean") / "q"
    quantize_single_card(str(tiny_text_model), str(save), load_recipe(recipe), dataset=str(text_calib),
                         progress=False, expert_group_size=2)
    return tiny_text_model, text_calib, recipe, read_checkpoint(save)


@pytest.mark.parametrize("family, phase", [(f, phase) for f, points in KILL_POINTS.items() for phase in points])
def test_single_card_run_killed_anywhere_resumes_to_the_same_checkpoint(request, tmp_path, family, phase):
    model, calib, recipe, clean = request.getfixturevalue("vl_run" if family == "qwen3_vl_moe" else "text_run")
    save = tmp_path / "q"
    killed(args(model, calib, recipe, save), KILL_POINTS[family][phase], tmp_path / "child.log")
    nothing_finished_looking(save)
    assert main(args(model, calib, recipe, save, "--resume")) == 0
    assert_resumed_like_clean(save, clean)


def test_resume_keeps_finished_layers_and_reads_only_the_rest(model, calib, recipe, clean, tmp_path, caplog):
    """Killed after 10 units (images, vision, embed, layer 0's 5 units, layer 1's attention and 1 group): layer 0's
    output was saved, so layers 1-2 and the head run again and nothing else; the bytes read are exactly those units'
    source tensors (counted from the safetensors header, independently of the reader); the run says what it kept."""
    save = tmp_path / "q"
    killed(args(model, calib, recipe, save), "unit:10", tmp_path / "child.log")
    with caplog.at_level(logging.INFO, logger="dist_quant"):
        summary = quantize_single_card(str(model), str(save), load_recipe(recipe), dataset=str(calib),
                                       progress=False, expert_group_size=2, resume=True)
    assert_resumed_like_clean(save, clean[0])
    plan = units_of(model)
    assert summary.ran_units == plan[plan.index("L001"):]
    said = f"--resume: {plan.index('L001')} of {len(plan)} units kept from the interrupted run, " \
           f"{len(plan) - plan.index('L001')} to run (from layer 1)"
    assert said in caplog.text and said in (save / "quant_run.log").read_text()
    with safe_open(model / "model.safetensors", "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    itemsize = 2  # bfloat16
    nbytes = {k: itemsize * int(__import__("math").prod(shape)) for k, shape in sizes.items()}
    layers = sum(n for k, n in nbytes.items() if k.startswith(("model.language_model.layers.1.",
                                                              "model.language_model.layers.2.")))
    head = nbytes["model.language_model.norm.weight"] + nbytes["lm_head.weight"]
    rotation_norm_reads = 2 * 4 * nbytes["model.language_model.layers.1.post_attention_layernorm.weight"]
    assert summary.bytes_read == layers + head + rotation_norm_reads
    assert summary.bytes_read < 0.8 * clean[1].bytes_read


def test_resume_with_nothing_finished_starts_afresh(model, calib, recipe, clean, tmp_path, caplog):
    save = tmp_path / "q"
    killed(args(model, calib, recipe, save), "startup", tmp_path / "child.log")
    assert (save / STAGING).exists()
    with caplog.at_level("INFO", logger="dist_quant"):
        assert main(args(model, calib, recipe, save, "--resume")) == 0
    assert "starting from the beginning" in caplog.text
    assert_resumed_like_clean(save, clean[0])
    assert main(args(model, calib, recipe, tmp_path / "never_started", "--resume")) == 0  # no save_path at all
    assert_resumed_like_clean(tmp_path / "never_started", clean[0])


def test_resume_of_a_published_checkpoint_says_it_is_complete(model, calib, recipe, clean, tmp_path, capsys):
    save = tmp_path / "q"
    assert main(args(model, calib, recipe, save)) == 0
    before = {p.name: p.stat().st_mtime_ns for p in save.iterdir()}
    capsys.readouterr()
    assert main(args(model, calib, recipe, save, "--resume")) == 0
    assert "already holds the finished checkpoint" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in save.iterdir()} == before  # nothing touched, no staging left
    other = Path(__file__).parent / "data" / "plain_w8a8.yaml"
    assert main(args(model, calib, other, save, "--resume")) == 2
    assert "finished checkpoint of another run" in capsys.readouterr().err


def test_resume_with_another_recipe_calibration_set_or_changed_weights_is_refused(model, calib, recipe, tmp_path,
                                                                                   capsys):
    save = tmp_path / "q"
    killed(args(model, calib, recipe, save), "unit:5", tmp_path / "child.log")
    other = Path(__file__).parent / "data" / "plain_w8a8.yaml"
    assert main(args(model, calib, other, save, "--resume")) == 2
    assert "recipe differ" in capsys.readouterr().err
    other_calib = make_calibration_set(tmp_path / "other", num_images=2, seed=9)
    assert main(args(model, other_calib, recipe, save, "--resume")) == 2
    assert "calibration differ" in capsys.readouterr().err
    assert main(args(model, calib, recipe, save, "--resume", "--compute_threads", "2")) == 2
    assert "compute_threads differ" in capsys.readouterr().err
    assert main(args(model, calib, recipe, save, "--resume", "--overwrite")) == 2  # started without it
    assert "overwrite differ" in capsys.readouterr().err
    # one tensor's bytes changed in place, same size (a header-only or size-only fingerprint misses this)
    changed = tmp_path / "changed_model"
    changed.mkdir()
    for path in model.iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    save2 = tmp_path / "q2"
    killed(args(changed, calib, recipe, save2), "unit:5", tmp_path / "child2.log")
    weights = changed / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: inside the last sampled block
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its mtime put back
    assert main(args(changed, calib, recipe, save2, "--resume")) == 2
    assert "model or weights" in capsys.readouterr().err
    assert (save / JOURNAL).exists() and (save2 / JOURNAL).exists()  # the interrupted runs are still there


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["unit file", "stream file"])
def test_damaged_staged_files_are_not_kept(model, calib, recipe, clean, tmp_path, damaged):
    """A kept file is checked by its CRC-32, not just its size: a damaged unit file or layer stream is recomputed."""
    save = tmp_path / "q"
    killed(args(model, calib, recipe, save), "unit:10", tmp_path / "child.log")
    run = save / STAGING / "run"
    if damaged == "unit file":  # a byte of that unit's tensors, in its part file
        part, begin, end = json.loads((run / "layout.json").read_text())["units"]["L000-experts-0002-0004"][0][3:]
        data = bytearray((save / STAGING / part).read_bytes())
        data[(begin + end) // 2] ^= 0x10
        (save / STAGING / part).write_bytes(bytes(data))
    else:
        flip_a_byte(run / "stream" / "after_layer_0000.safetensors")
    summary = quantize_single_card(str(model), str(save), load_recipe(recipe), dataset=str(calib), progress=False,
                                   expert_group_size=2, resume=True)
    assert_resumed_like_clean(save, clean[0])
    assert summary.ran_units == units_of(model)  # layer 0 could not be trusted, so nothing after it either


def test_a_deleted_or_damaged_part_file_is_recreated_and_its_units_run_again(model, calib, recipe, clean, tmp_path):
    """Part files are created with their headers before any unit runs: one deleted and one with a damaged header
    are made again, their units fail their CRC-32 and run again, and the checkpoint is the clean one."""
    save = tmp_path / "q"
    killed(args(model, calib, recipe, save), "unit:14", tmp_path / "child.log")
    parts = sorted((save / STAGING).glob("quant_model_weights-*"))
    parts[0].unlink()
    with open(parts[-1], "r+b") as f:
        f.write(b"\xff" * 8)  # the header length
    assert main(args(model, calib, recipe, save, "--resume")) == 0
    assert_resumed_like_clean(save, clean[0])


def test_journal_records_cannot_name_files_outside_staging(model, calib, recipe, clean, tmp_path):
    """Unit records name no file (their bytes are at their layout places); a record that names one anyway, or any
    other field, is not a record: that unit runs again. A stream record pointing outside is ignored, the outside
    file neither published nor deleted."""
    save = tmp_path / "q"
    killed(args(model, calib, recipe, save), "unit:12", tmp_path / "child.log")
    journal = save / JOURNAL
    lines = journal.read_text().splitlines()
    victim = json.loads(lines[3])  # the embed unit
    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(b"x")
    lines[3] = json.dumps({**victim, "file": "../../../elsewhere/x.safetensors"})
    lines.append("{not json")
    lines.append(json.dumps({"stream": "../../../elsewhere/x.safetensors", "bytes": 1, "crc32": 0}))
    journal.write_text("\n".join(lines) + "\n")
    assert main(args(model, calib, recipe, save, "--resume")) == 0
    assert_resumed_like_clean(save, clean[0])
    assert outside.exists()


RAY_POINTS = {  # where Ray differs from a single card; start-up and publish are the shared driver's (tested above)
    "mid-layer": f"unit:{rng.randint(8, 12)}",  # the driver dies while actors are inside layer 1
    "layer 2": f"unit:{rng.randint(13, 16)}",  # ... or in layer 2, after the actors wrote most of the part bytes
}


@pytest.mark.ray
@pytest.mark.parametrize("phase", list(RAY_POINTS))
def test_ray_run_killed_anywhere_resumes_to_the_same_checkpoint(model, calib, recipe, clean, cluster, tmp_path,
                                                                phase):
    """The driver is killed (its actors die with it); a new driver resumes on the same cluster with 3 workers."""
    save = tmp_path / "q"
    killed(args(model, calib, recipe, save, "--workers", "2", "--ray_address", cluster.address), RAY_POINTS[phase],
           tmp_path / "child.log")
    nothing_finished_looking(save)
    resumed = subprocess.run([sys.executable, "-m", "dist_quant.cli", *args(model, calib, recipe, save, "--workers",
                                                                             "3", "--ray_address", cluster.address,
                                                                             "--resume")],
                             env=CLEAN_ENV, capture_output=True, text=True, timeout=600)  # a new driver process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_like_clean(save, clean[0])


def test_an_older_layer_file_stays_until_the_newer_one_can_be_resumed_from(tmp_path):
    """On Ray, layer 1's output can be journaled (with layer 2's unit) before layer 1's last expert group is: until
    that group is journaled too, a resume must still start after layer 0, so layer 0's file must stay."""
    from dist_quant.checkpoint.unit_file import UnitRecord
    from dist_quant.runtime.plan import Kind, Unit
    from dist_quant.runtime.resume import STREAM_DIR, Journal, StreamRecord

    plan = [Unit(Kind.VISION), Unit(Kind.EMBED)] + [u for layer in range(3) for u in
                                                  (Unit(Kind.LAYER, layer), Unit(Kind.EXPERTS, layer, 0, 2))]
    journal = Journal(tmp_path, {"run": 1}, resume=False)
    (tmp_path / STREAM_DIR).mkdir()

    def finish(unit):
        journal.record(UnitRecord(unit.id, (), (), 0, 0), unit.layer)
        journal.prune_streams(plan)

    def save(layer):
        name = f"after_layer_{layer:04d}.safetensors"
        (tmp_path / STREAM_DIR / name).write_bytes(b"x")
        journal.record_stream(StreamRecord(name, 1, 0))

    for unit in plan[:5]:  # vision, embed, layer 0 and its experts, layer 1
        finish(unit)
    save(0)  # rides on layer 1's report
    save(1)  # rides on layer 2's report, which arrives before layer 1's experts
    finish(plan[6])
    assert sorted(p.name for p in (tmp_path / STREAM_DIR).iterdir()) == ["after_layer_0000.safetensors",
                                                                         "after_layer_0001.safetensors"]
    finish(plan[5])  # layer 1's experts: now a resume can start after layer 1
    assert [p.name for p in (tmp_path / STREAM_DIR).iterdir()] == ["after_layer_0001.safetensors"]


def test_a_unit_whose_journal_line_hit_a_full_disk_is_not_counted_as_kept(tmp_path):
    """Disk full while journaling a finished unit: the record is not on disk, so --resume will not keep that unit,
    and the count the interrupted run prints ("N finished unit(s) are kept") must not claim it either."""
    from dist_quant.checkpoint.unit_file import UnitRecord
    from dist_quant.runtime.resume import Journal

    journal = Journal(tmp_path, {"run": 1}, resume=False)
    journal.record(UnitRecord("L000", (), (), 0, 0), 0)
    journal.path.rename(tmp_path / "journal.kept")
    journal.path.symlink_to("/dev/full")  # every write: ENOSPC, as the kernel says it
    with pytest.raises(OSError) as info:
        journal.record(UnitRecord("L001", (), (), 0, 0), 1)
    assert info.value.errno == 28 and list(journal.finished) == ["L000"]
