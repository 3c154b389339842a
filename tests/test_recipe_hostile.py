"""Recipes written by mistake or by an attacker: processors that select nothing, duplicate YAML keys, alias bombs,
values of the wrong type. Each is refused with one line naming the file and the field; nothing else escapes."""

import itertools
import json
import math
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from dist_quant.errors import RecipeError
from dist_quant.models import qwen3_vl_moe
from dist_quant.presets import BUNDLED_CONFIGS, PRESETS
from dist_quant.recipe import DEFAULT_RECIPE, check_linear_quants_apply, load_recipe
from dist_quant.runtime.assignments import check_recipe_for_model
from dist_quant.runtime.local import quantize_single_card

DATA = Path(__file__).parent / "data"
T = "model.language_model.layers.3"


def write(tmp_path: Path, doc) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def bundled() -> dict:
    return yaml.safe_load(DEFAULT_RECIPE.read_text())


@pytest.fixture(scope="module")
def tiny_config(tiny_model):
    return qwen3_vl_moe.load_config(json.loads((tiny_model / "config.json").read_text()))


# --- 1. every linear_quant must get a linear of the model -------------------------------------------------------------

# the recipes for other families than the tiny model's (Qwen3-MoE: tests/test_recipe_v1.py checks them on its names)
OTHER_FAMILIES = {p.recipe for p in PRESETS if p.family != qwen3_vl_moe.MODEL_TYPE}


@pytest.mark.parametrize("recipe", [*sorted(set(BUNDLED_CONFIGS.glob("*.yaml")) - OTHER_FAMILIES),
                                    *sorted(DATA.glob("*.yaml"))], ids=lambda p: p.name)
def test_bundled_recipes_pass_the_model_check(tiny_model, tiny_config, recipe):
    """On the tiny model; MXFP8 on its config with experts of 128 (its 48 is one and a half 32-blocks, which the
    MoE method cannot take: tests/test_mxfp8_checkpoint.py)."""
    if "mxfp8" in recipe.name:
        raw = json.loads((tiny_model / "config.json").read_text())
        raw["text_config"]["moe_intermediate_size"] = 128
        tiny_config = qwen3_vl_moe.load_config(raw)
    check_recipe_for_model(load_recipe(recipe), tiny_config)


def test_a_typo_glob_is_refused_naming_its_processor(tiny_config, tmp_path):
    doc = bundled()
    doc["spec"]["process"][3]["include"] = ["*exprts*"]  # the experts' processor, misspelt
    recipe = load_recipe(write(tmp_path, doc))
    with pytest.raises(RecipeError) as info:
        check_recipe_for_model(recipe, tiny_config)
    assert str(info.value) == (
        f"recipe {tmp_path / 'recipe.yaml'}: spec.process[3]: linear_quant W8A8_DYNAMIC with include ['*exprts*'] "
        "and exclude [] selects no linear of this model (globs match whole module names such as "
        "'model.visual.blocks.0.attn.qkv'): fix its globs or remove it")


def test_a_glob_matching_only_one_layers_experts_is_used(tiny_config, tmp_path):
    """The experts of the last MoE layer only: found by walking every layer's experts, not just the first's."""
    last_moe = max(i for i in range(tiny_config.text_config.num_hidden_layers)
                   if qwen3_vl_moe.is_moe_layer(tiny_config.text_config, i))
    doc = bundled()
    experts = doc["spec"]["process"][3]
    doc["spec"]["process"].insert(3, {**experts, "include": [f"*layers.{last_moe}.mlp.experts.7.down_proj"]})
    check_recipe_for_model(load_recipe(write(tmp_path, doc)), tiny_config)
    doc["spec"]["process"][3]["include"] = ["*layers.2.mlp.experts*"]  # layer 2 is the tiny model's dense layer
    with pytest.raises(RecipeError, match=r"spec.process\[3\]: .* selects no linear of this model"):
        check_recipe_for_model(load_recipe(write(tmp_path, doc)), tiny_config)


def test_an_iter_smooth_that_selects_no_decoder_linear_is_refused(tiny_config, tmp_path):
    """A typo in iter_smooth's include silently turned the smoothing off: refused like a linear_quant's."""
    doc = bundled()
    smooth = next(p for p in doc["spec"]["process"] if p["type"] == "iter_smooth")
    smooth["include"] = ["*self_atn*"]
    with pytest.raises(RecipeError, match=r"iter_smooth with include \['\*self_atn\*'\] and exclude \[\] selects no "
                                          r"linear of this model's decoder layers"):
        check_recipe_for_model(load_recipe(write(tmp_path, doc)), tiny_config)
    smooth["include"] = ["*self_attn*"]
    check_recipe_for_model(load_recipe(write(tmp_path, doc)), tiny_config)


def test_a_processor_shadowed_by_an_earlier_one_is_refused(tiny_config, tmp_path):
    doc = bundled()
    doc["spec"]["process"].append({**doc["spec"]["process"][3], "include": ["*experts.0.*"]})  # after "*experts*"
    with pytest.raises(RecipeError, match=r"recipe .*: spec.process\[4\]: linear_quant W8A8_DYNAMIC with include "
                                          r"\['\*experts.0.\*'\] and exclude \[\] only selects linears that "
                                          r"spec.process\[3\] takes first"):
        check_recipe_for_model(load_recipe(write(tmp_path, doc)), tiny_config)


@pytest.mark.parametrize("processor", [1, 2, 3])
def test_an_empty_include_is_refused_when_read(tmp_path, processor):
    doc = bundled()
    doc["spec"]["process"][processor]["include"] = []
    with pytest.raises(RecipeError, match=rf"spec.process\[{processor}\].include: is empty, so the processor selects "
                                          "nothing"):
        load_recipe(write(tmp_path, doc))


def test_the_check_stops_once_every_processor_has_a_linear():
    """An endless stream of names: the check returns as soon as both processors have one (so a model with 16384
    experts per layer is only walked in full when a processor is about to be refused)."""
    names = (f"{T}.mlp.experts.{e}.up_proj" for e in itertools.count())
    check_linear_quants_apply(load_recipe(), [f"{T}.self_attn.q_proj"], names)


def test_quant_refuses_a_typo_glob_before_any_unit(tiny_model, calib_index, tmp_path):
    doc = bundled()
    doc["spec"]["process"][2]["include"] = ["*sef_attn*"]
    save = tmp_path / "out"
    with pytest.raises(RecipeError, match=r"spec.process\[2\]: linear_quant W8A8 with include \['\*sef_attn\*'\]"):
        quantize_single_card(str(tiny_model), str(save), load_recipe(write(tmp_path, doc)),
                             dataset=str(calib_index), progress=False)
    assert not save.exists()


# --- 2. YAML: duplicate keys, aliases ---------------------------------------------------------------------------------

DUPLICATE_INCLUDE = """\
apiversion: multimodal_vlm_modelslim_v1
spec:
  process:
    - type: linear_quant
      qconfig:
        act: {scope: per_token, dtype: int8, symmetric: True, method: minmax}
        weight: {scope: per_channel, dtype: int8, symmetric: True, method: minmax}
      include: ["*self_attn*"]
      include: ["*experts*"]
"""


def test_duplicate_keys_are_refused_naming_key_and_line(tmp_path):
    path = write(tmp_path, DUPLICATE_INCLUDE)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == (f"recipe {path} is not valid YAML: duplicate key 'include' (first at line 8): remove "
                               "one of them at line 9 column 7")


@pytest.mark.parametrize("text", [
    "spec: {}\nspec: {}\n",
    "apiversion: a\nspec:\n  dataset: x\n  dataset: y\n",
    "spec:\n  process:\n    - {type: quarot, seed: 1, seed: 2}\n",
])
def test_duplicate_keys_anywhere(tmp_path, text):
    with pytest.raises(RecipeError, match="duplicate key"):
        load_recipe(write(tmp_path, text))


def test_merge_keys_may_be_overridden(tmp_path):
    """``<<: *anchor`` beside an explicit key is YAML's override, not a duplicate."""
    text = DUPLICATE_INCLUDE.replace('      include: ["*experts*"]\n', "") + """\
  save:
    - <<: &saver {type: ascendv1_saver, part_file_size: 4}
      part_file_size: 2
"""
    assert load_recipe(write(tmp_path, text)).part_file_size_gb == 2


def alias_bomb(levels: int = 9, fanout: int = 10) -> str:
    """The "billion laughs": each level an anchored list of ``fanout`` aliases of the level below."""
    lines = ['l0: &l0 "lol"'] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fanout)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\nspec:\n  default_text: *l{levels}\n"


def test_an_alias_bomb_fails_fast_and_small(tmp_path):
    path = write(tmp_path, alias_bomb())  # 10**9 "lol"s once written out
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(RecipeError, match="is not valid YAML: its aliases expand to more than 100000 further "
                                              "nodes and characters"):
            load_recipe(path)
        elapsed, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5 and peak < 5 * 2**20, (elapsed, peak)


def test_a_small_alias_expansion_still_loads(tmp_path):
    """Anchors as msModelSlim's recipes use them (qconfigs shared by reference) are well within the bound."""
    text = alias_bomb(levels=2, fanout=10).replace("default_text: *l2", "dataset: calibImages") + """\
  process:
    - type: linear_quant
      qconfig: &q
        act: {scope: per_token, dtype: int8, symmetric: True, method: minmax}
        weight: {scope: per_channel, dtype: int8, symmetric: True, method: minmax}
      include: ["*experts*"]
    - {type: linear_quant, qconfig: *q, include: ["*self_attn*"]}
"""
    assert len(load_recipe(write(tmp_path, text)).linear_quants) == 2


def test_a_recursive_alias_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="an alias refers to a node that contains it"):
        load_recipe(write(tmp_path, "a: &a [1, *a]\nspec: {}\n"))


@pytest.mark.parametrize("text, message", [
    ("spec: {dataset: 2024-13-45}", "cannot read '2024-13-45': month must be in 1..12 at line 1 column 17"),
    ("spec: {dataset: " + "1" * 5000 + "}", "cannot read '1111111111"),
    ("spec:\n  ? [a, b]\n  : 1\n", "found unhashable key"),
])
def test_values_yaml_cannot_build_are_yaml_errors(tmp_path, text, message):
    with pytest.raises(RecipeError, match="is not valid YAML") as info:
        load_recipe(write(tmp_path, text))
    assert message in str(info.value) and "\n" not in str(info.value)


# --- 3. every field has a type check ----------------------------------------------------------------------------------

WRONG = {"list": ["x"], "dict": {"a": 1}, "int": 7, "float": 0.5, "none": None, "nested": [["ov"]], "bool": True,
         "huge": 10**400, "negative": -1, "nan": math.nan, "inf": math.inf, "nan_str": "nan", "inf_str": "inf",
         "empty": ""}


def _at(*keys):
    """A setter for the field at ``keys`` under the document (an int key indexes a list)."""
    def set_value(doc, value):
        node = doc
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return set_value


P = ("spec", "process")
# field as the error names it, where it is, and which of WRONG are valid values for it
FIELDS = [
    ("apiversion", _at("apiversion"), ()),
    ("spec", _at("spec"), ()),
    ("spec.process", _at(*P), ()),
    ("spec.process[0]", _at(*P, 0), ()),
    ("spec.process[0].type", _at(*P, 0, "type"), ()),
    ("spec.process[0].block_size", _at(*P, 0, "block_size"), ()),
    ("spec.process[0].seed", _at(*P, 0, "seed"), ("int",)),
    ("spec.process[1].alpha", _at(*P, 1, "alpha"), ("float",)),
    ("spec.process[1].scale_min", _at(*P, 1, "scale_min"), ("float",)),
    ("spec.process[1].symmetric", _at(*P, 1, "symmetric"), ("bool",)),
    ("spec.process[1].enable_subgraph_type", _at(*P, 1, "enable_subgraph_type"), ()),
    ("spec.process[1].include", _at(*P, 1, "include"), ("list",)),
    ("spec.process[1].exclude", _at(*P, 1, "exclude"), ("list", "none")),
    ("spec.process[2].qconfig", _at(*P, 2, "qconfig"), ()),
    ("spec.process[2].qconfig.act", _at(*P, 2, "qconfig", "act"), ()),
    ("spec.process[2].qconfig.act.scope", _at(*P, 2, "qconfig", "act", "scope"), ()),
    ("spec.process[2].qconfig.act.dtype", _at(*P, 2, "qconfig", "act", "dtype"), ()),
    ("spec.process[2].qconfig.act.symmetric", _at(*P, 2, "qconfig", "act", "symmetric"), ()),
    ("spec.process[2].qconfig.act.method", _at(*P, 2, "qconfig", "act", "method"), ()),
    ("spec.process[2].qconfig.weight.ext", _at(*P, 2, "qconfig", "weight", "ext"), ()),
    ("spec.process[2].qconfig.weight", _at(*P, 2, "qconfig", "weight"), ()),
    ("spec.process[2].include", _at(*P, 2, "include"), ("list",)),
    ("spec.process[2].exclude", _at(*P, 2, "exclude"), ("list", "none")),
    ("spec.save", _at("spec", "save"), ("none",)),
    ("spec.save[0]", _at("spec", "save", 0), ()),
    ("spec.save[0].type", _at("spec", "save", 0, "type"), ()),
    ("spec.save[0].part_file_size", _at("spec", "save", 0, "part_file_size"), ("int", "float")),
    ("spec.dataset", _at("spec", "dataset"), ("none", "nan_str", "inf_str")),
    ("spec.default_text", _at("spec", "default_text"), ("none", "nan_str", "inf_str",
                                                         "empty")),
]


G = ("spec", "process", 0)  # the group of msModelSlim's Qwen3-235B recipe, once its flex_smooth_quant is removed
GROUP_FIELDS = [
    ("apiversion", _at("apiversion"), ()),
    ("spec.process[0]", _at(*G), ()),
    ("spec.process[0].configs", _at(*G, "configs"), ()),
    ("spec.process[0].configs[1]", _at(*G, "configs", 1), ()),
    ("spec.process[0].configs[1].type", _at(*G, "configs", 1, "type"), ()),
    ("spec.process[0].configs[1].qconfig", _at(*G, "configs", 1, "qconfig"), ()),
    ("spec.process[0].configs[1].qconfig.weight.method", _at(*G, "configs", 1, "qconfig", "weight", "method"), ()),
    ("spec.process[0].configs[1].include", _at(*G, "configs", 1, "include"), ("list",)),
    ("spec.process[0].configs[1].exclude", _at(*G, "configs", 1, "exclude"), ("list", "none")),
    ("spec.dataset", _at("spec", "dataset"), ("none", "nan_str", "inf_str")),
]


def msmodelslim_v1_group() -> dict:
    doc = yaml.safe_load((DATA / "msmodelslim" / "qwen3-235B-w4a8-v1.yaml").read_text())
    doc["spec"]["process"] = doc["spec"]["process"][1:]
    return doc


@pytest.mark.parametrize("value", WRONG, ids=str)
@pytest.mark.parametrize("document, field, set_value, valid",
                         [(bundled, *f) for f in FIELDS] + [(msmodelslim_v1_group, *f) for f in GROUP_FIELDS],
                         ids=[f[0] for f in FIELDS] + [f"modelslim_v1:{f[0]}" for f in GROUP_FIELDS])
def test_every_field_refuses_wrong_types_in_one_line(tmp_path, document, field, set_value, valid, value):
    doc = document()
    set_value(doc, WRONG[value])
    path = write(tmp_path, doc)
    if value in valid:
        load_recipe(path)
        return
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"recipe {path}") and "\n" not in message and len(message) < 600, message
    named = "top level" if field == "spec" else field  # a spec that is no mapping: "expected a mapping with 'spec'"
    assert named in message or field.rsplit(".", 1)[0] in message, message


def test_enable_subgraph_type_nested_list(tmp_path):
    """The crash of issue 27: a list inside the list was a TypeError (unhashable) from set()."""
    doc = bundled()
    doc["spec"]["process"][1]["enable_subgraph_type"] = [["ov"]]
    with pytest.raises(RecipeError, match=r"spec.process\[1\].enable_subgraph_type: \[\['ov'\]\]: must be a list "
                                          r"of \['norm-linear', 'linear-linear', 'ov', 'up-down'\]"):
        load_recipe(write(tmp_path, doc))


def test_keys_of_mixed_types_are_named(tmp_path):
    """A number beside a string key: sorting the unknown keys for the message was a TypeError."""
    with pytest.raises(RecipeError, match=r"spec: unknown field\(s\) \[1, 'colour'\]"):
        load_recipe(write(tmp_path, "spec: {1: a, colour: b}"))


@pytest.mark.parametrize("field, value, message", [
    ("default_text", "\ud800 describe", "spec.default_text: '\\ud800 describe' has a character that is not Unicode"),
    ("dataset", "calib\0images", "spec.dataset: 'calib\\x00images' must be a folder name or path (non-empty, no NUL)"),
    ("dataset", "", "spec.dataset: '' must be a folder name or path"),
])
def test_text_fields_the_tokenizer_or_a_path_would_choke_on(tmp_path, field, value, message):
    doc = bundled()
    doc["spec"][field] = value
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, doc))
    assert message in str(info.value)


# --- 4. numbers as YAML 1.2 reads them --------------------------------------------------------------------------------

def w4a8_text(damp: str) -> str:
    text = (BUNDLED_CONFIGS / "qwen3_vl_moe_w4a8.yaml").read_text()
    assert "      step: 10\n" in text
    return text.replace("      step: 10\n", f"      step: 10\n      damp: {damp}\n")


@pytest.mark.parametrize("written, value", [("1e-2", 0.01), ("5E-3", 0.005), (".5e-1", 0.05), ("1.e-2", 0.01),
                                            ("0.02", 0.02)])
def test_ext_numbers_without_a_dot_are_numbers(tmp_path, written, value):
    recipe = load_recipe(write(tmp_path, w4a8_text(written)))
    assert dict(recipe.linear_quants[1].weight.ext)["damp"] == value


def test_a_quoted_ext_number_stays_a_string(tmp_path):
    with pytest.raises(RecipeError, match=r"weight.ext: damp must be a positive number .*got '1e-2'"):
        load_recipe(write(tmp_path, w4a8_text('"1e-2"')))
