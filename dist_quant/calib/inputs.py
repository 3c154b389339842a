"""Model inputs for calibration: token ids, image patches and grids, as Qwen3VLProcessor would make them.

The stock Qwen3VLProcessor (and AutoProcessor) also builds a video processor that needs torchvision, which CPU and
NPU hosts often lack. Calibration only needs images, so this module assembles the same inputs from the model
directory's own tokenizer, chat template and the slow Qwen2VLImageProcessor. A model that reads text only gets its
samples' raw text, tokenized as msModelSlim does for LLMs (see :func:`raw_text_inputs`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2VLImageProcessor

from dist_quant.calib import DEFAULT_MAX_SAMPLE_TOKENS
from dist_quant.calib.dataset import TEXT_SET_HINT, CalibSample
from dist_quant.checkpoint.reader import JSON_FILE_ERRORS, load_json_file, model_file
from dist_quant.checkpoint.safetensors_stream import open_regular, read_text
from dist_quant.errors import CalibrationError, CheckpointError, DistQuantError, reason

IMAGE_TOKEN = "<|image_pad|>"
# Files transformers may open when it loads the tokenizer: each must be a regular file inside the model folder.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json", "processor_config.json", "config.json")

log = logging.getLogger("dist_quant")


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
    jinja = model_file(model_dir, "chat_template.jinja", "the model folder")
    if os.path.exists(jinja):
        try:
            return read_text(jinja)
        except (OSError, UnicodeDecodeError) as error:
            raise CheckpointError(f"cannot read {jinja}: {reason(error)}; restore it from the original model") \
                from None
    legacy = model_file(model_dir, "chat_template.json", "the model folder")
    if os.path.exists(legacy):
        try:
            template = load_json_file(legacy)
        except JSON_FILE_ERRORS as error:
            raise CheckpointError(f"cannot read {legacy}: {reason(error)}; restore it from the original model") \
                from None
        if not isinstance(template, dict) or not isinstance(template.get("chat_template"), str):
            raise CheckpointError(f"{legacy} has no \"chat_template\" string; restore it from the original model")
        return template["chat_template"]
    raise CheckpointError(
        f"{model_dir} has no chat template: add one to tokenizer_config.json, chat_template.jinja or chat_template.json"
    )


def check_tokenizer_files(model_dir: Path) -> None:
    """Before transformers opens them: the tokenizer's files are regular files inside the model folder (a FIFO would
    hang the load, a symlink out of the folder would read some other file)."""
    for name in TOKENIZER_FILES:
        path = model_file(model_dir, name, "the model folder")
        if os.path.lexists(path):
            try:
                open_regular(path).close()
            except OSError as error:
                raise CheckpointError(f"cannot read {path}: {reason(error)}; restore it from the original model") \
                    from None


def load_tokenizer(model_dir: Path, trust_remote_code: bool, *, chat_template: bool = True) -> PreTrainedTokenizerBase:
    """The model's own tokenizer, with a chat template guaranteed unless `chat_template` is False (raw text needs
    none, and a base model may ship none); a corrupt tokenizer file is one error naming the model folder
    (transformers and the tokenizers library raise anything, down to a bare Exception)."""
    check_tokenizer_files(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except DistQuantError:
        raise
    except Exception as error:  # noqa: BLE001 - third-party parsers of user files: report, never a traceback
        raise CheckpointError(f"cannot load the tokenizer of {model_dir} ({type(error).__name__}: {reason(error)}); "
                              "restore its tokenizer files (tokenizer.json, tokenizer_config.json, "
                              "chat_template.jinja) from the original model") from None
    if chat_template and tokenizer.chat_template is None:
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
    config_path = model_file(model_dir, "preprocessor_config.json", "the model folder")
    if not os.path.lexists(config_path):
        raise CheckpointError(f"{config_path} is missing: the model directory must ship its image processor config")
    try:
        settings = load_json_file(config_path)
    except JSON_FILE_ERRORS as error:
        raise CheckpointError(f"cannot read {config_path}: {reason(error)}; restore it from the original model") \
            from None
    if not isinstance(settings, dict) or not isinstance(settings.get("size") or {}, dict):
        raise CheckpointError(f"{config_path} does not hold an image processor config (a JSON object); restore it "
                              "from the original model")
    min_pixels, max_pixels = pixel_limits(settings)
    settings.pop("size", None)
    try:
        processor = Qwen2VLImageProcessor(**{**settings, "min_pixels": min_pixels, "max_pixels": max_pixels})
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as error:
        raise CheckpointError(f"{config_path}: the image processor cannot be built from it ({type(error).__name__}: "
                              f"{reason(error)}); restore it from the original model") from None
    problems = image_processor_problems(processor)
    if problems:
        raise CheckpointError(f"{config_path}: {'; '.join(problems[:3])}; restore it from the original model")
    return processor


def image_processor_problems(processor: Qwen2VLImageProcessor) -> list[str]:
    """What the processor would trip over on the first image (its constructor accepts anything)."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
            and abs(value) != float("inf")
    size = getattr(processor, "size", None) or {}  # the limits: in `size` in every version (5.x has no attributes)
    values = {name: getattr(processor, name, None) for name in ("patch_size", "temporal_patch_size", "merge_size")}
    values.update(min_pixels=size.get("shortest_edge"), max_pixels=size.get("longest_edge"))
    problems = [f"{name} is {value!r}, not a positive integer" for name, value in values.items()
                if not isinstance(value, int) or isinstance(value, bool) or value < 1]
    if not problems and values["min_pixels"] > values["max_pixels"]:
        problems.append(f"min_pixels ({values['min_pixels']}) is above max_pixels ({values['max_pixels']})")
    for name in ("image_mean", "image_std"):
        value = getattr(processor, name, None)
        if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(number(v) for v in value) \
                or (name == "image_std" and 0 in value):
            problems.append(f"{name} is not 3 numbers{' (none 0)' if name == 'image_std' else ''}")
    if not number(getattr(processor, "rescale_factor", None)):
        problems.append("rescale_factor is not a number")
    return problems


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


def tokenize(tokenizer: PreTrainedTokenizerBase, prompt: str,
             special_tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (1, S). A rendered template already holds every special token; raw text
    gets the ones the tokenizer adds itself when `special_tokens` is True."""
    encoded = tokenizer(prompt, add_special_tokens=special_tokens, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB. PIL converts 16-bit grayscale ("I;16*", what a 16-bit PNG opens as) to RGB by
    clipping each value at 255, which turns nearly every pixel white: scale 0..65535 to 0..255 (rounded) first."""
    if image.mode.startswith("I;16"):
        wide = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((wide * 255 + 65535 // 2) // 65535).astype(np.uint8))
    return image.convert("RGB")


def open_image(sample: CalibSample) -> Image.Image:
    """The sample's image as RGB; decoding errors name the sample."""
    try:
        with open_regular(sample.image) as file, Image.open(file) as image:
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        text = sample.text if len(sample.text) <= 60 else sample.text[:60] + "..."  # names the sample, clipped
        raise CalibrationError(f"calibration image {sample.image} (text {text!r}) cannot be read: {reason(e)}") \
            from None


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str, special_tokens: bool = False) -> int:
    return len(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])


def fit_text(where: str, text: str, tokenizer: PreTrainedTokenizerBase, render: Callable[[str], str],
             image_tokens: int, max_tokens: int, special_tokens: bool = False) -> str:
    """The sample's text, cut at its end so that the whole sample (``render(text)`` with its image pad token, if any,
    expanded to ``image_tokens``, and the tokenizer's own special tokens if ``special_tokens``) holds at most
    ``max_tokens`` tokens; counted on the unexpanded prompt, before any tensor of the sample's length exists. Never
    cuts image tokens: a sample whose image and template alone exceed the cap is refused."""
    def count(prompt: str) -> int:
        return count_tokens(tokenizer, prompt, special_tokens) - pads + image_tokens
    pads = render("").count(IMAGE_TOKEN)
    total = count(render(text))
    if total <= max_tokens:
        return text
    fixed = count(render(""))
    if fixed > max_tokens:
        if not image_tokens:
            raise CalibrationError(f"{where} needs {fixed} tokens without any text (its template and special "
                                   f"tokens), more than the {max_tokens} tokens a calibration sample may hold; raise "
                                   "the cap (--max_sample_tokens)")
        raise CalibrationError(
            f"{where} needs {fixed} tokens without any text ({image_tokens} for its image), more than the "
            f"{max_tokens} tokens a calibration sample may hold; downscale the image (or lower max_pixels in the "
            "model's preprocessor_config.json), or raise the cap (--max_sample_tokens)")
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = max_tokens - fixed
    while True:  # a cut can merge differently with the template around it: recount, shorten until it fits
        cut = tokenizer.decode(text_ids[:keep], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        tokens = count(render(cut))
        if tokens <= max_tokens or keep == 0:
            break
        keep = max(0, keep - (tokens - max_tokens))
    log.warning("%s: its text is cut from %d to %d tokens to stay within the %d tokens a calibration sample may "
                "hold (--max_sample_tokens)", where, total, tokens, max_tokens)
    return cut


def sample_inputs(
    sample: CalibSample, tokenizer: PreTrainedTokenizerBase, image_processor: Qwen2VLImageProcessor,
    max_tokens: int = DEFAULT_MAX_SAMPLE_TOKENS,
) -> ModelInputs:
    """Inputs for one image + text sample, its text cut to fit ``max_tokens`` (see :func:`fit_text`). The pixels
    are channels-last RGB, said so: left to guess, the processor takes an image 1 or 3 pixels high for a
    channels-first one (its height for the channels), which fails on 1 and silently scrambles 3."""
    try:
        pixels = image_processor(images=[open_image(sample)], return_tensors="pt", input_data_format="channels_last")
    except (TypeError, ValueError, ArithmeticError, OSError) as error:  # e.g. an aspect ratio over 200
        raise CalibrationError(f"calibration image {sample.image} cannot be prepared for the model "
                               f"({type(error).__name__}: {reason(error)})") from None
    image_tokens = int(pixels["image_grid_thw"][0].prod()) // image_processor.merge_size**2
    def render(text: str) -> str:
        return render_prompt(tokenizer, [{"type": "image"}, {"type": "text", "text": text}])
    prompt = render(sample.text)
    if prompt.count(IMAGE_TOKEN) != 1:
        raise CalibrationError(
            f"the prompt for calibration image {sample.image} holds {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} tokens, "
            f"not 1: the chat template must render one per image and the text must not contain {IMAGE_TOKEN}"
        )
    text = fit_text(f"calibration sample {sample.image}", sample.text, tokenizer, render, image_tokens, max_tokens)
    if text is not sample.text:
        prompt = render(text)
    prompt = expand_image_tokens(prompt, pixels["image_grid_thw"], image_processor.merge_size)
    input_ids, attention_mask = tokenize(tokenizer, prompt)
    return ModelInputs(input_ids, attention_mask, pixels["pixel_values"], pixels["image_grid_thw"])


def check_max_tokens(max_tokens: object) -> int:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise CalibrationError(f"the cap on tokens per calibration sample must be a whole number of at least 1, got "
                               f"{max_tokens!r}")
    return max_tokens


def sample_name(sample: CalibSample, number: int) -> str:
    """A text-only sample for messages: its place in the set (from 1) and, when known, its index entry."""
    return f"text-only calibration sample {number}" + (f" ({sample.where})" if sample.where else "")


def chat_text_inputs(where: str, text: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> ModelInputs:
    """Inputs for a text-only sample of an image+text model: a user turn holding the text alone, rendered with the
    same chat template as its image samples (and cut to ``max_tokens`` the same way)."""
    def render(t: str) -> str:
        return render_prompt(tokenizer, [{"type": "text", "text": t}])
    if render(text).count(IMAGE_TOKEN):
        raise CalibrationError(f"the prompt for {where} holds {IMAGE_TOKEN} tokens without an image: the text must "
                               f"not contain {IMAGE_TOKEN}")
    text = fit_text(where, text, tokenizer, render, 0, max_tokens)
    return ModelInputs(*tokenize(tokenizer, render(text)))


def raw_text_inputs(where: str, text: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> ModelInputs:
    """Inputs for a sample of a model that reads text only: its raw text, no chat template, with the special tokens
    the tokenizer adds itself (none for Qwen's), cut to ``max_tokens``.

    This is what msModelSlim does for LLMs: it reads each line's "inputs_pretokenized" (lab_calib/*.jsonl) as a
    plain string and tokenizes it with ``tokenizer(text, return_tensors="pt")`` (msmodelslim 26.1.0,
    model/common/transformers.py, ``_get_tokenized_data``, used by its qwen3_moe adapter), so the calibration
    activations are those of plain text, not of a chat turn.
    """
    text = fit_text(where, text, tokenizer, lambda t: t, 0, max_tokens, special_tokens=True)
    input_ids, attention_mask = tokenize(tokenizer, text, special_tokens=True)
    if input_ids.shape[1] == 0:
        raise CalibrationError(f"{where} has no tokens (its text is cut to nothing within {max_tokens} tokens); "
                               "raise the cap (--max_sample_tokens) or give it a text")
    return ModelInputs(input_ids, attention_mask)


def build_model_inputs(
    model_dir: str | Path, samples: list[CalibSample], *, images: bool = True, trust_remote_code: bool = False,
    max_tokens: int = DEFAULT_MAX_SAMPLE_TOKENS,
) -> list[ModelInputs]:
    """One ModelInputs per sample, made with the model directory's own tokenizer, template and image processor.

    ``images`` says what the model reads. True (image+text models): an image sample is a user turn with the image,
    then its text; a text-only sample is a user turn with the text alone; the image processor is loaded only when a
    sample has an image. False (text-only models): every sample must be text-only (one with an image is refused)
    and is tokenized as raw text (see :func:`raw_text_inputs`); no image processor or chat template is read.
    ``max_tokens`` caps the tokens of each sample: longer texts are cut (with a warning on the "dist_quant" logger),
    a sample whose image alone is longer is refused.
    """
    max_tokens = check_max_tokens(max_tokens)
    model_dir = Path(model_dir)
    if not images:
        for number, sample in enumerate(samples, start=1):
            if sample.image is not None:
                raise CalibrationError(f"the model in {model_dir} reads text only: calibration sample {number} has "
                                       f"an image ({sample.image}); {TEXT_SET_HINT}")
    tokenizer = load_tokenizer(model_dir, trust_remote_code, chat_template=images)
    image_processor = load_image_processor(model_dir) if any(s.image is not None for s in samples) else None
    inputs = []
    for number, sample in enumerate(samples, start=1):
        if sample.image is not None:
            inputs.append(sample_inputs(sample, tokenizer, image_processor, max_tokens))
        elif images:
            inputs.append(chat_text_inputs(sample_name(sample, number), sample.text, tokenizer, max_tokens))
        else:
            inputs.append(raw_text_inputs(sample_name(sample, number), sample.text, tokenizer, max_tokens))
    return inputs
