"""msModelSlim's ``modelslim_v1`` recipes (its format for text-only models such as Qwen3-MoE): the ``group`` processor,
the refusals of what dist-quant does not implement (``flex_smooth_quant``, legacy ``modelslim_v0``), and msModelSlim's
own Qwen3-MoE recipes (tests/data/msmodelslim/), whose selection of each linear is written out here by hand from their
globs: the scheme msModelSlim's first matching ``linear_quant`` gives it."""

import re
from pathlib import Path

import pytest
import yaml

from dist_quant.errors import RecipeError
from dist_quant.presets import BUNDLED_CONFIGS
from dist_quant.recipe import IterSmooth, QuaRot, check_linear_quants_apply, load_recipe, parse_recipe
from dist_quant.schemes import FLOAT, W4A8_DYNAMIC, W8A8, W8A8_DYNAMIC

MSMODELSLIM = Path(__file__).parent / "data" / "msmodelslim"
V1_RECIPES = ("qwen3-235B-w4a8-v1.yaml", "qwen3-30b-w4a8-v1.yaml", "qwen3-coder-480b-w4a8.yaml")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT = ("gate_proj", "up_proj", "down_proj")


def qwen3_moe_linears(layers: int, experts: int) -> list[str]:
    """The linear module names of a Qwen3-MoE (transformers' Qwen3MoeForCausalLM), in model order."""
    names = []
    for n in range(layers):
        names += [f"model.layers.{n}.self_attn.{p}" for p in ATTENTION] + [f"model.layers.{n}.mlp.gate"]
        names += [f"model.layers.{n}.mlp.experts.{e}.{p}" for e in range(experts) for p in EXPERT]
    return names + ["lm_head"]


def write(tmp_path: Path, doc) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def without_flex(name: str) -> dict:
    """An msModelSlim recipe with its flex_smooth_quant processor removed, as the refusal advises."""
    doc = yaml.safe_load((MSMODELSLIM / name).read_text())
    doc["spec"]["process"] = [p for p in doc["spec"]["process"] if p["type"] != "flex_smooth_quant"]
    return doc


# --- msModelSlim's own Qwen3-MoE recipes -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", V1_RECIPES)
def test_msmodelslim_v1_recipes_are_refused_for_flex_smooth_quant_by_name(name):
    with pytest.raises(RecipeError) as info:
        load_recipe(MSMODELSLIM / name)
    place = 1 if name.startswith("qwen3-coder") else 0  # the coder recipe has a quarot first
    assert str(info.value) == (
        f"recipe {MSMODELSLIM / name}: spec.process[{place}].type: flex_smooth_quant (msModelSlim's alpha/beta "
        "search) is not implemented; use iter_smooth (SmoothQuant scales from one fixed alpha, e.g. alpha: 0.9, on "
        "the subgraphs of its enable_subgraph_type) in its place, or remove it")


def test_the_legacy_v0_recipe_is_refused():
    with pytest.raises(RecipeError, match=r"qwen3-30b-a3b-w8a8.yaml: apiversion: 'modelslim_v0' is msModelSlim's "
                                          r"legacy recipe format \(anti_cfg, calib_cfg\), which dist-quant does not "
                                          r"read; write it as a modelslim_v1 recipe"):
        load_recipe(MSMODELSLIM / "qwen3-30b-a3b-w8a8.yaml")


def test_the_235b_recipe_selects_as_msmodelslim():
    """group: W8A8_DYNAMIC on ``*self_attn*``, W4A8_DYNAMIC (ssz) on ``*mlp.experts*``; nothing else selected."""
    recipe = parse_recipe(without_flex("qwen3-235B-w4a8-v1.yaml"), MSMODELSLIM / "qwen3-235B-w4a8-v1.yaml")
    assert [(p.quant_type, p.where, p.weight.method) for p in recipe.linear_quants] == [
        (W8A8_DYNAMIC, "spec.process[0].configs[0]", "minmax"), (W4A8_DYNAMIC, "spec.process[0].configs[1]", "ssz")]
    assert recipe.quarot is None and recipe.smooth is None and recipe.dataset is None and recipe.default_text is None
    expected = {
        "model.layers.0.self_attn.q_proj": W8A8_DYNAMIC, "model.layers.93.self_attn.o_proj": W8A8_DYNAMIC,
        "model.layers.50.self_attn.k_proj": W8A8_DYNAMIC, "model.layers.50.self_attn.v_proj": W8A8_DYNAMIC,
        "model.layers.0.mlp.experts.0.gate_proj": W4A8_DYNAMIC,
        "model.layers.93.mlp.experts.127.down_proj": W4A8_DYNAMIC,
        "model.layers.7.mlp.experts.64.up_proj": W4A8_DYNAMIC,
        "model.layers.0.mlp.gate": FLOAT, "model.layers.93.mlp.gate": FLOAT, "lm_head": FLOAT,
    }
    assert {name: recipe.quant_type(name) for name in expected} == expected
    check_linear_quants_apply(recipe, qwen3_moe_linears(2, 4))


def expected_30b(name: str) -> str:
    """qwen3-30b-w4a8-v1.yaml's group, read by hand: [0] ``*self_attn*`` W8A8_DYNAMIC; [1] ``*mlp*`` but not
    ``*gate*`` or ``*mlp.experts.*`` W8A8_DYNAMIC (a dense MLP's up/down: none in Qwen3-30B-A3B; the router and every
    gate_proj are out); [2] the experts of layers 41-47 W8A8_DYNAMIC; [3] every other expert W4A8_DYNAMIC."""
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
    if ".self_attn." in name:
        return W8A8_DYNAMIC
    if ".mlp.experts." in name:
        return W8A8_DYNAMIC if 41 <= layer <= 47 else W4A8_DYNAMIC
    if ".mlp." in name and "gate" not in name:
        return W8A8_DYNAMIC
    return FLOAT


def test_the_30b_recipe_selects_as_msmodelslim():
    """Its int8 weights use ``method: ssz``, which no dist-quant scheme has: read with minmax for the selection."""
    doc = without_flex("qwen3-30b-w4a8-v1.yaml")
    with pytest.raises(RecipeError, match=r"spec.process\[0\].configs\[0\].qconfig.weight: per_channel int8 "
                                          r"symmetric ssz is not supported"):
        parse_recipe(doc, MSMODELSLIM / "qwen3-30b-w4a8-v1.yaml")
    for entry in doc["spec"]["process"][0]["configs"]:
        if entry["qconfig"]["weight"]["dtype"] == "int8":
            entry["qconfig"]["weight"]["method"] = "minmax"
    recipe = parse_recipe(doc, MSMODELSLIM / "qwen3-30b-w4a8-v1.yaml")
    assert [p.quant_type for p in recipe.linear_quants] == [W8A8_DYNAMIC, W8A8_DYNAMIC, W8A8_DYNAMIC, W4A8_DYNAMIC]
    assert dict(recipe.linear_quants[3].weight.ext) == {"group_size": 64}
    names = qwen3_moe_linears(48, 3) + ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
                                        "model.layers.0.mlp.gate_proj"]
    assert {n: recipe.quant_type(n) for n in names} == {n: expected_30b(n) for n in names}
    spot = {"model.layers.40.mlp.experts.0.up_proj": W4A8_DYNAMIC,
            "model.layers.41.mlp.experts.0.up_proj": W8A8_DYNAMIC,
            "model.layers.47.mlp.experts.2.gate_proj": W8A8_DYNAMIC,
            "model.layers.4.mlp.experts.1.down_proj": W4A8_DYNAMIC,
            "model.layers.0.mlp.up_proj": W8A8_DYNAMIC, "model.layers.0.mlp.gate_proj": FLOAT,
            "model.layers.47.mlp.gate": FLOAT}
    assert {n: recipe.quant_type(n) for n in spot} == spot
    with pytest.raises(RecipeError, match=r"spec.process\[0\].configs\[1\]: linear_quant W8A8_DYNAMIC with include "
                                          r"\['\*mlp\*'\] .* selects no linear of this model"):
        check_linear_quants_apply(recipe, qwen3_moe_linears(48, 2))  # no dense MLP: msModelSlim only warns


def test_the_coder_480b_recipe_selects_as_msmodelslim():
    """Static W8A8 attention; W4A8_DYNAMIC experts except in layers 0-4 and 57-61, which stay float
    (``model.layers.1.*`` is layer 1 only, not 10-19)."""
    recipe = parse_recipe(without_flex("qwen3-coder-480b-w4a8.yaml"), MSMODELSLIM / "qwen3-coder-480b-w4a8.yaml")
    assert recipe.quarot == QuaRot(32, 1234) and recipe.smooth is None and recipe.dataset == "autocodebench.jsonl"
    float_layers = {0, 1, 2, 3, 4, 57, 58, 59, 60, 61}
    for layer in range(62):
        assert recipe.quant_type(f"model.layers.{layer}.self_attn.o_proj") == W8A8
        assert recipe.quant_type(f"model.layers.{layer}.mlp.gate") == FLOAT
        for expert in (0, 159):
            want = FLOAT if layer in float_layers else W4A8_DYNAMIC
            assert recipe.quant_type(f"model.layers.{layer}.mlp.experts.{expert}.down_proj") == want, layer


# --- the group processor ----------------------------------------------------------------------------------------------

W8 = {"act": {"scope": "per_token", "dtype": "int8", "symmetric": True, "method": "minmax"},
      "weight": {"scope": "per_channel", "dtype": "int8", "symmetric": True, "method": "minmax"}}
STATIC = {"act": {"scope": "per_tensor", "dtype": "int8", "symmetric": False, "method": "minmax"},
          "weight": {"scope": "per_channel", "dtype": "int8", "symmetric": True, "method": "minmax"}}


def v1(*process) -> dict:
    return {"apiversion": "modelslim_v1", "spec": {"process": list(process)}}


def test_a_group_is_its_entries_in_order_and_the_first_match_wins(tmp_path):
    """msModelSlim's group runs its linear_quants in order on each layer, and a quantized linear is no longer an
    nn.Linear the next one selects: the first entry wins, inside a group as across processors."""
    doc = v1({"type": "linear_quant", "qconfig": STATIC, "include": ["*o_proj"]},
             {"type": "group", "configs": [
                 {"type": "linear_quant", "qconfig": W8, "include": ["*self_attn*"]},
                 {"type": "linear_quant", "qconfig": STATIC, "include": ["*"], "exclude": ["*mlp.gate"]}]},
             {"type": "linear_quant", "qconfig": W8, "include": ["*mlp.gate"]})
    recipe = load_recipe(write(tmp_path, doc))
    assert [p.where for p in recipe.linear_quants] == ["spec.process[0]", "spec.process[1].configs[0]",
                                                        "spec.process[1].configs[1]", "spec.process[2]"]
    assert {n: recipe.quant_type(f"model.layers.0.{n}") for n in
            ("self_attn.o_proj", "self_attn.q_proj", "mlp.experts.3.up_proj", "mlp.gate")} == {
        "self_attn.o_proj": W8A8, "self_attn.q_proj": W8A8_DYNAMIC, "mlp.experts.3.up_proj": W8A8,
        "mlp.gate": W8A8_DYNAMIC}


def test_a_shadowed_group_entry_is_named_by_its_place(tmp_path):
    doc = v1({"type": "group", "configs": [
        {"type": "linear_quant", "qconfig": W8, "include": ["*experts*"]},
        {"type": "linear_quant", "qconfig": W8, "include": ["*experts.0.*"]}]})
    recipe = load_recipe(write(tmp_path, doc))
    with pytest.raises(RecipeError, match=r"spec.process\[0\].configs\[1\]: linear_quant W8A8_DYNAMIC with include "
                                          r"\['\*experts.0.\*'\] and exclude \[\] only selects linears that "
                                          r"spec.process\[0\].configs\[0\] takes first"):
        check_linear_quants_apply(recipe, qwen3_moe_linears(1, 2))


@pytest.mark.parametrize("group, message", [
    ({"type": "group"}, r"spec.process\[0\].configs: must be a non-empty list of linear_quant processors"),
    ({"type": "group", "configs": []}, r"spec.process\[0\].configs: must be a non-empty list"),
    ({"type": "group", "configs": {"type": "linear_quant"}}, r"spec.process\[0\].configs: must be a non-empty list"),
    ({"type": "group", "configs": [], "name": "x"}, r"spec.process\[0\]: unknown field\(s\) \['name'\]"),
    ({"type": "group", "configs": ["linear_quant"]},
     r"spec.process\[0\].configs\[0\].type: None cannot be in a group here; a group holds linear_quant processors"),
    ({"type": "group", "configs": [{"type": "fa3_quant"}]}, r"configs\[0\].type: 'fa3_quant' cannot be in a group"),
    ({"type": "group", "configs": [{"type": "group", "configs": []}]}, r"'group' cannot be in a group"),
    ({"type": "group", "configs": [{"type": "flex_smooth_quant"}]},
     r"spec.process\[0\].configs\[0\].type: flex_smooth_quant \(msModelSlim's alpha/beta search\) is not implemented"),
    ({"type": "group", "configs": [{"type": "linear_quant", "qconfig": W8, "include": ["*"], "colour": 1}]},
     r"spec.process\[0\].configs\[0\]: unknown field\(s\) \['colour'\]"),
    ({"type": "group", "configs": [{"type": "linear_quant", "qconfig": W8},
                                   {"type": "linear_quant", "qconfig": {**W8, "act": {**W8["act"], "scope": "x"}}}]},
     r"spec.process\[0\].configs\[1\].qconfig.act: x int8 symmetric minmax is not supported"),
    ({"type": "group", "configs": [{"type": "linear_quant", "qconfig": W8, "include": ["*experts[*"]}]},
     r"spec.process\[0\].configs\[0\].include: bad glob '\*experts\[\*': unbalanced brackets"),
    ({"type": "group", "configs": [{"type": "linear_quant", "qconfig": W8, "include": []}]},
     r"spec.process\[0\].configs\[0\].include: is empty"),
])
def test_a_bad_group_is_refused_naming_the_field(tmp_path, group, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, v1(group)))


def test_a_group_comes_after_quarot_and_iter_smooth(tmp_path):
    group = {"type": "group", "configs": [{"type": "linear_quant", "qconfig": W8}]}
    with pytest.raises(RecipeError, match=r"spec.process\[1\]: 'iter_smooth' is out of place"):
        load_recipe(write(tmp_path, v1(group, {"type": "iter_smooth"})))
    recipe = load_recipe(write(tmp_path, v1({"type": "quarot"}, {"type": "iter_smooth"}, group, group)))
    assert recipe.quarot == QuaRot() and recipe.smooth == IterSmooth() and len(recipe.linear_quants) == 2


# --- refusals --------------------------------------------------------------------------------------------------------

def test_flex_smooth_quant_is_refused_wherever_it_is(tmp_path):
    doc = v1({"type": "quarot"}, {"type": "flex_smooth_quant", "alpha": 0.5, "beta": 0.5},
             {"type": "linear_quant", "qconfig": W8})
    with pytest.raises(RecipeError, match=r"spec.process\[1\].type: flex_smooth_quant \(msModelSlim's alpha/beta "
                                          r"search\) is not implemented; use iter_smooth .* or remove it"):
        load_recipe(write(tmp_path, doc))
    doc["apiversion"] = "multimodal_vlm_modelslim_v1"
    with pytest.raises(RecipeError, match="flex_smooth_quant"):
        load_recipe(write(tmp_path, doc))


@pytest.mark.parametrize("apiversion, message", [
    ("modelslim_v0", "'modelslim_v0' is msModelSlim's legacy recipe format"),
    ("multimodal_sd_modelslim_v1", "'multimodal_sd_modelslim_v1' is not supported; allowed: "
                                   "['multimodal_vlm_modelslim_v1', 'modelslim_v1']"),
    (1, "apiversion: 1 is not supported"),
])
def test_other_apiversions_are_refused(tmp_path, apiversion, message):
    doc = {**v1({"type": "linear_quant", "qconfig": W8}), "apiversion": apiversion}
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, doc))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_modelslim_v1_has_a_dataset_but_no_default_text(tmp_path):
    """msModelSlim's modelslim_v1 spec (ModelslimV1ServiceConfig) has process, save and dataset; default_text belongs
    to the multimodal format."""
    doc = v1({"type": "linear_quant", "qconfig": W8})
    doc["spec"]["dataset"] = "mix_calib.jsonl"
    assert load_recipe(write(tmp_path, doc)).dataset == "mix_calib.jsonl"
    doc["spec"]["default_text"] = "Describe this image in detail."
    with pytest.raises(RecipeError, match=r"spec: unknown field\(s\) \['default_text'\]; allowed: \['dataset', "
                                          r"'process', 'save'\]"):
        load_recipe(write(tmp_path, doc))


@pytest.mark.parametrize("glob, advice", [
    ("*layers.{0,1}.*", "msModelSlim expands braces"),
    ("*layers.1}*", "msModelSlim expands braces"),
    (r"*mlp\.gate", "msModelSlim reads a backslash as an escape"),
    ("*layers.[^0]*", "write [!...]"),
])
def test_globs_msmodelslim_reads_differently_are_refused(tmp_path, glob, advice):
    """msModelSlim matches with wcmatch and its BRACE flag, where ``{0,1}`` is two globs, ``\\.`` a dot and ``[^0]``
    a negated set; Python's fnmatch reads them literally, so the same recipe would select other linears."""
    doc = v1({"type": "linear_quant", "qconfig": W8, "include": [glob]})
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, doc))
    assert f"spec.process[0].include: bad glob {glob!r}: " in str(info.value) and advice in str(info.value)
    assert load_recipe(write(tmp_path, v1({"type": "linear_quant", "qconfig": W8, "include": ["*layers.[!0]*"]})))


# --- the bundled Qwen3-MoE recipes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, experts", [("qwen3_moe_w8a8.yaml", W8A8_DYNAMIC),
                                           ("qwen3_moe_w4a8.yaml", W4A8_DYNAMIC)])
def test_bundled_qwen3_moe_recipes(name, experts):
    recipe = load_recipe(BUNDLED_CONFIGS / name)
    assert recipe.quarot == QuaRot(32, 1234)
    assert recipe.smooth == IterSmooth(0.9, 1e-5, ("norm-linear", "ov", "up-down"), ("*",), ())
    assert recipe.dataset is None and recipe.default_text is None and recipe.part_file_size_gb == 4
    expected = {f"model.layers.5.self_attn.{p}": W8A8 for p in ATTENTION}
    expected.update({f"model.layers.5.mlp.experts.127.{p}": experts for p in EXPERT})
    expected.update({"model.layers.5.mlp.gate": FLOAT, "model.layers.1.mlp.gate_proj": W8A8,
                     "model.layers.1.mlp.down_proj": W8A8})  # a dense layer, which the released models do not have
    assert {n: recipe.quant_type(n) for n in expected} == expected
    check_linear_quants_apply(recipe, qwen3_moe_linears(2, 2))
    text = (BUNDLED_CONFIGS / name).read_text()
    assert not re.search(r"linear_fc|merger|visual", text.split("spec:")[1])  # no vision patterns
