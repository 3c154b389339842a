"""The bundled calibration set `calibImages`: real public-domain/CC0 photos, small, attributed, and usable as is."""

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

import dist_quant
from dist_quant.calib.dataset import IMAGE_SUFFIXES, load_samples
from dist_quant.calib.inputs import IMAGE_TOKEN, build_model_inputs, load_tokenizer
from dist_quant.synthetic import MERGE_SIZE, make_tiny_model

BUNDLED = Path(dist_quant.__file__).resolve().parent / "calib_data" / "calibImages"
MAX_SIDE = 448
MAX_FOLDER_BYTES = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def samples():
    return load_samples(BUNDLED)


def image_files() -> list[Path]:
    return sorted(p for p in BUNDLED.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def test_loads_with_8_to_16_samples_all_with_text(samples):
    assert 8 <= len(samples) <= 16
    for sample in samples:
        assert sample.image.parent == BUNDLED
        assert sample.text.strip(), f"{sample.image.name} has an empty prompt"
    assert len({s.image for s in samples}) == len(samples), "an image is listed twice"
    assert len({s.text for s in samples}) == len(samples), "prompts should differ from image to image"


def test_every_image_file_is_in_the_index(samples):
    assert {p.name for p in image_files()} == {s.image.name for s in samples}


def test_images_are_rgb_convertible_and_at_most_448_px(samples):
    for sample in samples:
        with Image.open(sample.image) as image:
            rgb = image.convert("RGB")
        assert rgb.mode == "RGB" and max(rgb.size) <= MAX_SIDE, f"{sample.image.name} is {rgb.size}"
        assert min(rgb.size) >= 64, f"{sample.image.name} is too small to be a useful photo: {rgb.size}"


def test_folder_is_small():
    total = sum(p.stat().st_size for p in BUNDLED.rglob("*") if p.is_file())
    assert total < MAX_FOLDER_BYTES, f"{BUNDLED} holds {total} bytes"


def test_every_image_has_an_attribution_entry_with_a_licence(samples):
    text = (BUNDLED / "ATTRIBUTION.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## (\S+)\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S))
    for sample in samples:
        section = sections.get(sample.image.name)
        assert section is not None, f"ATTRIBUTION.md has no '## {sample.image.name}' entry"
        licence = re.search(r"^- Licence: (.*)$", section, flags=re.M)
        assert licence and re.match(r"(public domain|CC0)\b", licence.group(1)), sample.image.name
        assert "- Source:" in section or "- Author:" in section, sample.image.name
        assert "- Changes:" in section, sample.image.name
    assert set(sections) == {s.image.name for s in samples}, "ATTRIBUTION.md lists images that are not bundled"


def test_default_recipe_resolves_to_the_bundled_set(tmp_path, monkeypatch):
    from dist_quant.recipe import load_recipe
    from dist_quant.runtime.driver import resolve_dataset

    monkeypatch.chdir(tmp_path)  # no calibImages in the working directory to shadow the bundled one
    recipe = load_recipe()
    assert recipe.dataset == "calibImages"
    assert resolve_dataset(None, recipe).resolve() == BUNDLED


# The resize settings of a real Qwen3-VL preprocessor_config.json (16 px patches, 2x2 merge, limits as `size`).
QWEN3_VL_PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255, "resample": 3,
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.mark.parametrize("preprocessor", ["tiny", "qwen3_vl"])
def test_every_image_goes_through_the_processor(model_dir, samples, preprocessor, tmp_path):
    if preprocessor == "qwen3_vl":  # same tokenizer and template, full-size image patches
        model_dir = Path(shutil.copytree(model_dir, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors")))
        (model_dir / "preprocessor_config.json").write_text(json.dumps(QWEN3_VL_PREPROCESSOR))
    image_token_id = load_tokenizer(model_dir, False).convert_tokens_to_ids(IMAGE_TOKEN)
    inputs = build_model_inputs(model_dir, samples)
    assert len(inputs) == len(samples)
    for sample, item in zip(samples, inputs):
        rows = item.pixel_values.shape[0]
        assert rows == int(item.image_grid_thw.prod()) and rows > 0, sample.image.name
        assert all(int(side) % MERGE_SIZE == 0 for side in item.image_grid_thw[0, 1:]), sample.image.name
        tokens = int((item.input_ids == image_token_id).sum())
        assert tokens == rows // MERGE_SIZE**2, f"{sample.image.name}: {tokens} image tokens for {rows} patches"
        if preprocessor == "qwen3_vl":  # at most a 448 px side: no more than 28x28 patches of 16 px, 196 tokens
            assert 4 <= tokens <= (MAX_SIDE // 16) ** 2 // MERGE_SIZE**2, f"{sample.image.name}: {tokens} tokens"
