"""The recipe: the bundled file parses to the seed's split, and invalid recipes fail with the field named."""

import pytest
import yaml

from dist_quant.errors import RecipeError
from dist_quant.recipe import DEFAULT_RECIPE, IterSmooth, QuaRot, load_recipe
from dist_quant.schemes import FLOAT, W8A8, W8A8_DYNAMIC

T = "model.language_model.layers.3"


def test_bundled_recipe_splits_like_the_seed():
    recipe = load_recipe()
    assert recipe.part_file_size_gb == 4 and recipe.dataset == "calibImages"
    assert recipe.quarot == QuaRot(32, 1234)
    assert recipe.smooth == IterSmooth(0.9, 1e-5, ("norm-linear", "ov", "up-down"), ("*",), ())
    expected = {
        f"{T}.self_attn.q_proj": W8A8, f"{T}.self_attn.o_proj": W8A8,
        "model.visual.blocks.0.attn.qkv": W8A8, "model.visual.blocks.26.attn.proj": W8A8,
        "model.visual.blocks.3.mlp.linear_fc1": W8A8, "model.visual.blocks.3.mlp.linear_fc2": FLOAT,
        "model.visual.merger.linear_fc1": FLOAT, "model.visual.deepstack_merger_list.2.linear_fc1": FLOAT,
        f"{T}.mlp.gate": FLOAT, f"{T}.mlp.gate_proj": W8A8,
        f"{T}.mlp.experts.127.gate_proj": W8A8_DYNAMIC, f"{T}.mlp.experts.0.down_proj": W8A8_DYNAMIC,
    }
    assert {name: recipe.quant_type(name) for name in expected} == expected


def write(tmp_path, doc):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return path


def bundled():
    return yaml.safe_load(DEFAULT_RECIPE.read_text())


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["spec"]["process"].append({"type": "magic"}), "unknown processor 'magic'"),
    (lambda d: d["spec"]["process"][2].update(exclude=["*experts[*"]), "bad glob"),
    (lambda d: d["spec"]["process"][2].update(colour="red"), "unknown field(s) ['colour']"),
    (lambda d: d["spec"]["process"][2]["qconfig"]["act"].update(scope="per_group"), "act"),
    (lambda d: d["spec"]["process"][2]["qconfig"]["weight"].update(symmetric=False), "weight"),
    (lambda d: d["spec"]["process"][1].update(alpha=1.5), "alpha: 1.5 must be a number in (0.0, 1.0]"),
    (lambda d: d["spec"]["process"][1].update(alpha=0), "alpha"),
    (lambda d: d["spec"]["process"][1].update(scale_min="small"), "scale_min"),
    (lambda d: d["spec"]["process"][1].update(enable_subgraph_type=["qk"]), "enable_subgraph_type"),
    (lambda d: d["spec"]["process"][1].update(symmetric=False), "symmetric"),
    (lambda d: d["spec"]["process"][0].update(block_size=24), "block_size"),
    (lambda d: d["spec"]["process"].reverse(), "out of place"),
    (lambda d: d["spec"].update(process=d["spec"]["process"][:2]), "at least one linear_quant"),
    (lambda d: d["spec"]["save"][0].update(type="other_saver"), "ascendv1_saver"),
    (lambda d: d["spec"]["save"][0].update(part_file_size=-1), "part_file_size"),
    (lambda d: d.update(apiversion="v0"), "apiversion"),
    (lambda d: d["spec"].update(process=[]), "spec.process"),
])
def test_invalid_recipes_name_the_field(tmp_path, mutate, message):
    doc = bundled()
    mutate(doc)
    with pytest.raises(RecipeError, match=None) as info:
        load_recipe(write(tmp_path, doc))
    assert message in str(info.value) and str(tmp_path / "recipe.yaml") in str(info.value)


def test_unreadable_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "spec: [unclosed"))


def test_yaml_anchors_and_first_match_wins(tmp_path):
    text = """
apiversion: multimodal_vlm_modelslim_v1
w: &w
  act: {scope: per_token, dtype: int8, symmetric: True, method: minmax}
  weight: {scope: per_channel, dtype: int8, symmetric: True, method: minmax}
spec:
  process:
    - {type: linear_quant, qconfig: *w, include: ["*experts*"]}
    - {type: linear_quant, qconfig: *w, include: ["*"], exclude: ["*o_proj"]}
"""
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.quant_type(f"{T}.mlp.experts.1.up_proj") == W8A8_DYNAMIC
    assert recipe.quant_type(f"{T}.self_attn.o_proj") == FLOAT
    assert recipe.part_file_size_gb == 4 and recipe.dataset is None


def test_glob_selection_is_fnmatchs():
    """The recipe matches each glob list as one compiled alternation: the same verdicts as fnmatch.fnmatchcase,
    glob by glob, on names with the characters globs treat specially."""
    import fnmatch
    import itertools

    from dist_quant.recipe import _selected

    globs = ["*", "*experts*", "*linear_fc2", "*merger*", "model.[a-z]*", "*mlp.gate", "a?b", "[!x]*y", "*.0.*", "[*]"]
    names = ["model.visual.merger.linear_fc2", "model.language_model.layers.0.mlp.gate", "ab", "acb", "xy", "zy",
             "model.x", "Model.x", "a\nb", "*", "layers.10.q"]
    for name, include, exclude in itertools.product(names, itertools.combinations(globs, 2), [(), ("*merger*",)]):
        expected = any(fnmatch.fnmatchcase(name, g) for g in include) and \
            not any(fnmatch.fnmatchcase(name, g) for g in exclude)
        assert _selected(name, include, exclude) == expected, (name, include, exclude)
    assert not _selected("anything", (), ())
