"""Model inputs checked against the transformers model itself: image token counts, forward, template, resize limits."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen3VLMoeForConditionalGeneration

try:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
except ImportError:  # transformers 5.x without torchvision: the PIL processor's module has it
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from dist_quant.calib.dataset import CalibSample, load_samples
from dist_quant.calib.inputs import build_model_inputs
from dist_quant.errors import CalibrationError, CheckpointError
from dist_quant.synthetic import make_calibration_set, make_tiny_model
from helpers import hf_kwargs

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[CalibSample]:
    folder = tmp_path_factory.mktemp("calib")
    make_calibration_set(folder, num_images=3)
    Image.new("RGB", (90, 20), (10, 200, 10)).save(folder / "wide.png")  # wider than max_pixels allows
    with (folder / "index.jsonl").open("a") as index:
        index.write(json.dumps({"image": "wide.png", "text": "A wide one."}) + "\n")
    return load_samples(folder)


@pytest.fixture(scope="module")
def model(model_dir):
    return Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def inputs(model_dir, samples):
    return build_model_inputs(model_dir, samples)


def copy_tokenizer(model_dir: Path, to: Path, preprocessor: dict | None = None) -> Path:
    """A directory with the tokenizer only (no chat template file), plus an optional preprocessor config."""
    to.mkdir()
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists():  # transformers 5.x writes no special_tokens_map.json
            shutil.copy(model_dir / name, to / name)
    if preprocessor is not None:
        (to / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return to


def chat_template_json(model_dir: Path) -> str:
    """The model's template in the legacy chat_template.json form."""
    return json.dumps({"chat_template": (model_dir / "chat_template.jinja").read_text()})


def test_one_entry_per_sample_with_batch_size_one(inputs, samples):
    assert len(inputs) == len(samples)
    for item in inputs:
        assert item.input_ids.dtype == torch.long and item.input_ids.shape[0] == 1
        assert item.attention_mask.shape == item.input_ids.shape and item.attention_mask.all()
        assert item.image_grid_thw.shape == (1, 3)
        assert item.pixel_values.shape == (int(item.image_grid_thw.prod()), 3 * 2 * 4 * 4)


def test_image_tokens_match_the_vision_tower_and_the_model_runs(inputs, model):
    for item in inputs:
        with torch.no_grad():
            features = model.model.get_image_features(item.pixel_values, item.image_grid_thw)
            image_embeds = features[0] if isinstance(features, tuple) else features.pooler_output  # 4.57 / 5.x
            logits = model(**hf_kwargs(item, model)).logits
        image_tokens = int((item.input_ids == model.config.image_token_id).sum())
        assert image_tokens == sum(len(e) for e in image_embeds) > 1
        assert logits.shape == (*item.input_ids.shape, model.config.text_config.vocab_size)
        assert torch.isfinite(logits).all()


def test_prompt_is_user_image_then_text_then_generation_prompt(inputs, samples, model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for item, sample in zip(inputs, samples):
        pads = "<|image_pad|>" * (int(item.image_grid_thw.prod()) // 4)
        expected = (
            f"<|im_start|>user\n<|vision_start|>{pads}<|vision_end|>{sample.text}<|im_end|>\n<|im_start|>assistant\n"
        )
        assert tokenizer.decode(item.input_ids[0]) == expected


def test_resize_respects_min_and_max_pixels(inputs, samples):
    for item, sample in zip(inputs, samples):
        with Image.open(sample.image) as image:
            width, height = image.size
        expected = smart_resize(height, width, factor=8, min_pixels=64, max_pixels=1024)
        assert item.image_grid_thw[0].tolist() == [1, expected[0] // 4, expected[1] // 4]
    wide = inputs[-1].image_grid_thw[0]
    assert int(wide.prod()) * 4 * 4 <= 1024 < 90 * 20  # the wide image was shrunk to fit max_pixels


def test_real_style_preprocessor_config_with_size_only(model_dir, samples, inputs, tmp_path):
    """Real Qwen3-VL dirs give limits as `size` and name the fast processor; the slow one must honour them."""
    preprocessor = json.loads((model_dir / "preprocessor_config.json").read_text())
    preprocessor = {k: v for k, v in preprocessor.items() if k not in ("min_pixels", "max_pixels")}
    preprocessor["image_processor_type"] = "Qwen2VLImageProcessorFast"
    preprocessor["processor_class"] = "Qwen3VLProcessor"
    real_style = copy_tokenizer(model_dir, tmp_path / "real", preprocessor)
    (real_style / "chat_template.json").write_text(chat_template_json(model_dir))
    for ours, theirs in zip(inputs, build_model_inputs(real_style, samples)):
        assert torch.equal(ours.input_ids, theirs.input_ids)
        assert torch.equal(ours.pixel_values, theirs.pixel_values)


def test_real_qwen3_vl_patch_size(model_dir, samples, tmp_path):
    preprocessor = {"size": {"longest_edge": 128 * 128, "shortest_edge": 64 * 64}, "patch_size": 16,
                    "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    real_style = copy_tokenizer(model_dir, tmp_path / "real", preprocessor)
    shutil.copy(model_dir / "chat_template.jinja", real_style)
    item = build_model_inputs(real_style, samples[:1])[0]
    with Image.open(samples[0].image) as image:
        width, height = image.size
    resized = smart_resize(height, width, factor=32, min_pixels=64 * 64, max_pixels=128 * 128)
    assert item.image_grid_thw[0].tolist() == [1, resized[0] // 16, resized[1] // 16]
    assert item.pixel_values.shape[1] == 3 * 2 * 16 * 16


def test_chat_template_json_is_used_when_tokenizer_has_none(model_dir, samples, inputs, tmp_path):
    preprocessor = json.loads((model_dir / "preprocessor_config.json").read_text())
    bare = copy_tokenizer(model_dir, tmp_path / "bare", preprocessor)
    assert AutoTokenizer.from_pretrained(bare).chat_template is None
    with pytest.raises(CheckpointError, match="no chat template"):
        build_model_inputs(bare, samples)
    (bare / "chat_template.json").write_text(chat_template_json(model_dir))
    assert torch.equal(build_model_inputs(bare, samples[:1])[0].input_ids, inputs[0].input_ids)


def test_missing_preprocessor_config(model_dir, samples, tmp_path):
    bare = copy_tokenizer(model_dir, tmp_path / "bare")
    shutil.copy(model_dir / "chat_template.jinja", bare)
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        build_model_inputs(bare, samples)


def test_unreadable_image_names_the_sample(model_dir, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(CalibrationError, match=r"broken\.png \(text 'Say hi'\)"):
        build_model_inputs(model_dir, [CalibSample(image=broken, text="Say hi")])


def test_text_containing_the_image_token_is_refused(model_dir, samples):
    sample = CalibSample(image=samples[0].image, text="look <|image_pad|> here")
    with pytest.raises(CalibrationError, match="must not contain"):
        build_model_inputs(model_dir, [sample])


def test_text_only_inputs(model_dir, model, samples, inputs):
    """A text-only sample beside image samples is a user turn holding the text alone, and the model runs on it."""
    image_item, item = build_model_inputs(model_dir, [samples[0], CalibSample(image=None, text="Hello there")])
    assert torch.equal(image_item.input_ids, inputs[0].input_ids)
    assert item.pixel_values is None and item.image_grid_thw is None
    assert set(item.as_kwargs()) == {"input_ids", "attention_mask"}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.decode(item.input_ids[0]) == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    with torch.no_grad():
        assert model(**item.as_kwargs()).logits.shape[1] == item.input_ids.shape[1]


def channel_values(inputs) -> torch.Tensor:
    """pixel_values [patches, 3 * T * P * P] (channel outermost in each patch) as [3, everything else]."""
    return inputs.pixel_values.reshape(inputs.pixel_values.shape[0], 3, -1).transpose(0, 1).reshape(3, -1)


@pytest.mark.parametrize("size", [(1, 1), (5, 1), (5, 3), (3, 3)])  # (width, height): heights 1 and 3 were misread
def test_tiny_images_are_read_as_rgb(model_dir, tmp_path, size):
    """A uniform image stays uniform through the resize: every pixel of every channel is (c / 255 - mean) / std.
    Before the fix the processor guessed the channel order from the shape: 1 pixel high failed with transformers'
    "mean must have 1 elements", 3 pixels high was taken as channels-first and scrambled."""
    from dist_quant.calib.inputs import load_image_processor
    colour = (200, 30, 90)
    image = tmp_path / "tiny.png"
    Image.new("RGB", size, colour).save(image)
    processor = load_image_processor(model_dir)
    inputs = build_model_inputs(model_dir, [CalibSample(image, "What is this?")])[0]
    values = channel_values(inputs)
    for channel, c in enumerate(colour):
        expected = (c * processor.rescale_factor - processor.image_mean[channel]) / processor.image_std[channel]
        assert torch.allclose(values[channel], torch.full_like(values[channel], expected), atol=1e-5), channel


def test_sixteen_bit_png_is_scaled_to_eight_bits(model_dir, tmp_path):
    """A 16-bit grayscale PNG opens as mode "I;16"; PIL's own conversion to RGB clips at 255 (all but black turns
    white). Each value v is expected as round(v * 255 / 65535) = round(v / 257) in all three channels."""
    import numpy as np

    from dist_quant.calib.inputs import open_image
    values = np.array([[0, 1000, 32896, 40000, 65535, 128]], dtype=np.uint16)
    image = tmp_path / "deep.png"
    Image.fromarray(values).save(image)
    with Image.open(image) as opened:
        assert opened.mode == "I;16"
    rgb = open_image(CalibSample(image, "t"))
    expected = [round(int(v) / 257) for v in values[0]]
    assert rgb.mode == "RGB" and expected == [0, 4, 128, 156, 255, 0]
    assert [list(rgb.getpixel((x, 0))) for x in range(values.shape[1])] == [[e] * 3 for e in expected]
