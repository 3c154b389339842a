"""`quant --dry_run`: which scheme each linear gets, listed before any work, compared with the linears transformers
builds and the recipe's globs applied by hand; `--max_samples` caps the calibration set."""

import fnmatch
import json
import logging
import re
from collections import Counter

import torch
from transformers import Qwen3MoeForCausalLM

from dist_quant.cli import main
from dist_quant.models.family import load_checked
from dist_quant.recipe import load_recipe
from dist_quant.runtime.assignments import linear_assignments, spans
from helpers import PLAIN_RECIPE, load_hf_model

# tests/data/plain_w8a8.yaml's two linear_quants, as its text says
STATIC_EXCLUDE = ("*experts*", "*linear_fc2", "*merger*", "*deepstack_merger_list*", "*mlp.gate")


def by_hand(name: str) -> str:
    if fnmatch.fnmatchcase(name, "*experts*"):
        return "W8A8_DYNAMIC"
    return "FLOAT" if any(fnmatch.fnmatchcase(name, g) for g in STATIC_EXCLUDE) else "W8A8"


def expected_groups(tiny_model) -> dict[tuple[str, str], int]:
    """(scheme, starred name) -> how many linears, from the modules transformers builds and the globs by hand."""
    text_only = json.loads((tiny_model / "config.json").read_text())["model_type"] == "qwen3_moe"
    model = Qwen3MoeForCausalLM.from_pretrained(tiny_model, dtype=torch.float32) if text_only else load_hf_model(
        tiny_model)
    text = model.config.get_text_config()
    expected: dict[tuple[str, str], int] = {}
    for name, module in model.named_modules():
        names = []
        # the router: an nn.Linear in transformers 4.57, a router module with the same weight in 5.x
        if (isinstance(module, torch.nn.Linear) or name.endswith(".mlp.gate")) and name != "lm_head":
            names = [name]
        elif name.endswith("mlp.experts") and not isinstance(module, torch.nn.ModuleList):
            # fused 3-D experts (Qwen3-VL-MoE; Qwen3-MoE in 5.x): one linear per expert and projection (4.57's
            # Qwen3-MoE holds a list of expert modules, whose nn.Linear are counted above)
            names = [f"{name}.{e}.{proj}" for e in range(text.num_experts)
                     for proj in ("gate_proj", "up_proj", "down_proj")]
        for linear in names:
            key = (by_hand(linear), re.sub(r"\.(\d+)\.", ".*.", linear))
            expected[key] = expected.get(key, 0) + 1
    return expected


def test_the_listing_covers_every_linear_transformers_builds_with_the_recipes_scheme(family_model):
    model = family_model.model
    rows = linear_assignments(load_recipe(PLAIN_RECIPE), load_checked(model)[2])
    assert {(scheme, shape): count for scheme, shape, count, _ in rows} == expected_groups(model)
    experts = next(r for r in rows if r[1].endswith("experts.*.up_proj"))
    # the layers whose experts they are: all but the tiny model's dense-MLP layer (2 of 4; 1 of 3 in the text one)
    assert experts[3] == {"qwen3_vl_moe": "0-1,3", "qwen3_moe": "0,2"}[family_model.model_type]


def test_spans():
    assert spans([0, 1, 2, 3, 5, 7, 8, 9]) == "0-3,5,7-9" and spans([4]) == "4" and spans([]) == ""


def test_dry_run_lists_and_writes_nothing(tiny_model, tmp_path, capsys):
    assert main(["quant", "--model_path", str(tiny_model), "--save_path", str(tmp_path / "q"), "--device", "cpu",
                 "--config_path", str(PLAIN_RECIPE), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"W8A8_DYNAMIC +model\.language_model\.layers\.\*\.mlp\.experts\.\*\.down_proj +24 +0-1,3", out)
    totals = Counter()
    for (scheme, _), count in expected_groups(tiny_model).items():
        totals[scheme] += count
    assert f"linears by scheme: {', '.join(f'{s}: {n}' for s, n in sorted(totals.items()))}" in out
    assert not (tmp_path / "q").exists()


def test_max_samples_calibrates_on_the_first_samples(family_model, tmp_path, caplog):
    tiny_model, calib_index = family_model.model, family_model.dataset  # 3 images; 2 texts
    caplog.set_level(logging.INFO, logger="dist_quant")
    assert main(["quant", "--model_path", str(tiny_model), "--save_path", str(tmp_path / "q"), "--device", "cpu",
                 "--config_path", str(PLAIN_RECIPE), "--dataset", str(calib_index), "--quiet",
                 "--max_samples", "1"]) == 0
    samples = len(calib_index.read_text().splitlines())
    assert f"calibrating on the first 1 of the {samples} samples" in caplog.text
    coverage = (tmp_path / "q" / "calibration_coverage.json").read_text()
    one = tmp_path / "one"
    one.mkdir()
    first = calib_index.read_text().splitlines()[0]
    (one / calib_index.name).write_text(first + "\n")
    image = re.search(r'"image": "([^"]+)"', first)
    if image and not image.group(1).startswith("/"):
        (one / image.group(1)).write_bytes((calib_index.parent / image.group(1)).read_bytes())
    assert main(["quant", "--model_path", str(tiny_model), "--save_path", str(tmp_path / "q1"), "--device", "cpu",
                 "--config_path", str(PLAIN_RECIPE), "--dataset", str(one / calib_index.name), "--quiet"]) == 0
    assert (tmp_path / "q1" / "calibration_coverage.json").read_text() == coverage  # the same one sample
