"""Model inputs for calibration: token ids, image patches and grids, as Qwen3VLProcessor would make them.

The stock Qwen3VLProcessor (and AutoProcessor) also builds a video processor that needs torchvision, which CPU and
NPU hosts often lack. Calibration only needs images, so this module assembles the same inputs from the model
directory's own tokenizer, chat template and the slow Qwen2VLImageProcessor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2VLImageProcessor

from dist_quant.calib.dataset import CalibSample
from dist_quant.errors import CalibrationError, CheckpointError

IMAGE_TOKEN = "<|image_pad|>"


@dataclass
class ModelInputs:
    """One prompt, batch size 1, no padding; the image fields are None for text-only prompts."""

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    pixel_values: torch.FloatTensor | None = None
    image_grid_thw: torch.LongTensor | None = None

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        """The fields that are set, as keyword arguments of the transformers model's forward."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def chat_template_from_files(model_dir: Path) -> str:
    """Real Qwen3-VL directories may keep the template beside the tokenizer rather than in tokenizer_config.json."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    legacy = model_dir / "chat_template.json"
    if legacy.is_file():
        return json.loads(legacy.read_text(encoding="utf-8"))["chat_template"]
    raise CheckpointError(
        f"{model_dir} has no chat template: add one to tokenizer_config.json, chat_template.jinja or chat_template.json"
    )


def load_tokenizer(model_dir: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """The model's own tokenizer, with a chat template guaranteed."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = chat_template_from_files(model_dir)
    return tokenizer


def pixel_limits(preprocessor_config: dict) -> tuple[int | None, int | None]:
    """(min_pixels, max_pixels) from either spelling: tiny models write min/max_pixels, real Qwen3-VL dirs `size`."""
    size = preprocessor_config.get("size") or {}
    return (
        preprocessor_config.get("min_pixels", size.get("shortest_edge")),
        preprocessor_config.get("max_pixels", size.get("longest_edge")),
    )


def load_image_processor(model_dir: Path) -> Qwen2VLImageProcessor:
    """The slow image processor (no torchvision), built with the directory's resize limits as min/max_pixels.

    transformers 4.57.1's constructor ignores `size=` (it always resets it to the default), and real Qwen3-VL
    directories give their limits only as `size`; min_pixels/max_pixels are honoured by every version.
    """
    config_path = model_dir / "preprocessor_config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} is missing: the model directory must ship its image processor config")
    settings = json.loads(config_path.read_text(encoding="utf-8"))
    min_pixels, max_pixels = pixel_limits(settings)
    settings.pop("size", None)
    return Qwen2VLImageProcessor(**{**settings, "min_pixels": min_pixels, "max_pixels": max_pixels})


def render_prompt(tokenizer: PreTrainedTokenizerBase, content: list[dict]) -> str:
    """One user turn with the given content items, followed by the assistant generation prompt."""
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def expand_image_tokens(prompt: str, image_grid_thw: torch.Tensor, merge_size: int) -> str:
    """Repeat each image pad token once per merged patch, in image order, exactly as Qwen3VLProcessor does.

    The prompt must hold one pad token per image.
    """
    pieces = prompt.split(IMAGE_TOKEN)
    expanded = [pieces[0]]
    for grid, piece in zip(image_grid_thw, pieces[1:]):
        expanded.append(IMAGE_TOKEN * (int(grid.prod()) // merge_size**2) + piece)
    return "".join(expanded)


def tokenize(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (1, S); the template already holds every special token."""
    encoded = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def open_image(sample: CalibSample) -> Image.Image:
    """The sample's image as RGB; decoding errors name the sample."""
    try:
        with Image.open(sample.image) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CalibrationError(f"calibration image {sample.image} (text {sample.text!r}) cannot be read: {e}") from e


def sample_inputs(
    sample: CalibSample, tokenizer: PreTrainedTokenizerBase, image_processor: Qwen2VLImageProcessor
) -> ModelInputs:
    """Inputs for one image + text sample."""
    pixels = image_processor(images=[open_image(sample)], return_tensors="pt")
    prompt = render_prompt(tokenizer, [{"type": "image"}, {"type": "text", "text": sample.text}])
    if prompt.count(IMAGE_TOKEN) != 1:
        raise CalibrationError(
            f"the prompt for calibration image {sample.image} holds {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} tokens, "
            f"not 1: the chat template must render one per image and the text must not contain {IMAGE_TOKEN}"
        )
    prompt = expand_image_tokens(prompt, pixels["image_grid_thw"], image_processor.merge_size)
    input_ids, attention_mask = tokenize(tokenizer, prompt)
    return ModelInputs(input_ids, attention_mask, pixels["pixel_values"], pixels["image_grid_thw"])


def build_model_inputs(
    model_dir: str | Path, samples: list[CalibSample], *, trust_remote_code: bool = False
) -> list[ModelInputs]:
    """One ModelInputs per sample, made with the model directory's own tokenizer, template and image processor."""
    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    image_processor = load_image_processor(model_dir)
    return [sample_inputs(sample, tokenizer, image_processor) for sample in samples]


def model_inputs_for_text(model_dir: str | Path, text: str, *, trust_remote_code: bool = False) -> ModelInputs:
    """Inputs for a text-only user turn, rendered with the same chat template as the image samples."""
    tokenizer = load_tokenizer(Path(model_dir), trust_remote_code)
    input_ids, attention_mask = tokenize(tokenizer, render_prompt(tokenizer, [{"type": "text", "text": text}]))
    return ModelInputs(input_ids, attention_mask)
