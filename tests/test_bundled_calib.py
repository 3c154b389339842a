"""The bundled calibration sets: `calibImages` (real public-domain/CC0 photos, small, attributed) and `calibText`
(our own English and Chinese paragraphs, CC0), both usable as is."""

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from tokenizers import Tokenizer

import dist_quant
from dist_quant.calib import DEFAULT_MAX_SAMPLE_TOKENS, DEFAULT_TEXT_DATASET
from dist_quant.calib.dataset import IMAGE_SUFFIXES, load_samples
from dist_quant.calib.inputs import IMAGE_TOKEN, build_model_inputs, load_tokenizer
from dist_quant.synthetic import MERGE_SIZE, make_tiny_model, train_tokenizer

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


# --- calibText: the bundled text set for models that read text only ----------------------------------------------

TEXT_SET = BUNDLED.parent / DEFAULT_TEXT_DATASET


def is_chinese(text: str) -> bool:
    return re.search(r"[\u4e00-\u9fff]", text) is not None


@pytest.fixture(scope="module")
def text_samples():
    return load_samples(TEXT_SET, images=False)


def test_text_set_loads_with_32_to_64_varied_english_and_chinese_samples(text_samples):
    assert 32 <= len(text_samples) <= 64
    assert all(s.image is None and s.text.strip() for s in text_samples)
    assert len({s.text for s in text_samples}) == len(text_samples), "a text is listed twice"
    chinese = sum(is_chinese(s.text) for s in text_samples)
    assert chinese >= len(text_samples) // 3 and len(text_samples) - chinese >= len(text_samples) // 3
    first = text_samples[:8]  # --max_samples 8 still sees both languages and some code
    assert any(is_chinese(s.text) for s in first) and not all(is_chinese(s.text) for s in first)
    assert any(re.search(r"^\s*(def |SELECT |fn |#include|function )", s.text, flags=re.M) for s in first)
    assert load_samples(TEXT_SET) == text_samples  # an image+text model may calibrate on it too


def test_text_set_states_its_origin_and_licence():
    readme = (TEXT_SET / "README.md").read_text(encoding="utf-8")
    assert re.search(r"^- Licence: CC0 1\.0", readme, flags=re.M)
    assert re.search(r"^- Origin: all \d+ paragraphs were written for the dist-quant project", readme, flags=re.M)
    assert f"all {len(load_samples(TEXT_SET, images=False))} paragraphs" in readme


def test_bundled_sets_are_package_data():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(dist_quant.__file__).resolve().parent.parent / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["dist_quant"]
    root = BUNDLED.parent.parent
    for path in [*TEXT_SET.iterdir(), *BUNDLED.iterdir()]:
        relative = path.relative_to(root)
        assert any(relative.match(pattern) for pattern in patterns), f"{relative} would not be installed"


def test_every_text_fits_the_cap_as_raw_text(text_samples, tmp_path, caplog):
    """Raw text (no template), as a text-only model gets it: token ids as the tokenizers library encodes them, and
    no sample long enough to be cut (the tiny tokenizer spends ~3 tokens on a Chinese character, more than a real
    Qwen tokenizer)."""
    train_tokenizer().save_pretrained(tmp_path)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    with caplog.at_level(logging.WARNING, logger="dist_quant"):
        inputs = build_model_inputs(tmp_path, text_samples, images=False)
    assert not [r for r in caplog.records if "is cut from" in r.getMessage()]
    for sample, item in zip(text_samples, inputs, strict=True):
        assert item.input_ids[0].tolist() == tokenizer.encode(sample.text).ids
        assert item.input_ids.shape[1] <= DEFAULT_MAX_SAMPLE_TOKENS // 2
