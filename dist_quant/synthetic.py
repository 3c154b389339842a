"""Tiny Qwen3-VL-MoE checkpoints and calibration sets, built offline in seconds.

Tests and demos cannot download the real models, so they build a model directory that looks like a Hub download:
random (seeded) weights in the 4.57 "hub" expert layout, a small byte-level BPE tokenizer with the Qwen special
tokens and chat template, and a preprocessor config for the slow Qwen2-VL image processor.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen-style: one user turn holds an image block per image item, then its text.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string -%}"
    "{{- message.content -}}"
    "{%- else -%}"
    "{%- for item in message.content -%}"
    "{%- if item.type == 'image' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item.type == 'text' -%}"
    "{{- item.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog near the river bank.
A picture shows a red circle, a blue square and a green triangle on a white background.
Describe the image in one sentence. What colour is the largest shape in this picture?
The cat sat on the mat while the sun was shining through the window of the small house.
Count the objects in the image and tell me where each one is placed.
There is a gradient from dark to light across the whole picture, with some text in the corner.
Machine learning models learn patterns from data; quantization makes them smaller and faster.
Large language models read text and images and answer questions about what they see.
The weather today is cloudy with a chance of rain in the afternoon and a cool breeze.
Please read the words written in the picture and explain what they mean.
An orange ellipse overlaps a purple rectangle, and a yellow line crosses both of them.
Numbers such as one, two, three, four, five, six, seven, eight, nine and ten appear often.
"""

TOKENIZER_VOCAB_SIZE = 640

# Slow Qwen2-VL image processor settings: patch 4 and merge 2 make the resize factor 8, so an image becomes at most
# an 8x8 patch grid (16 image tokens) and at least 2x2 (1 token).
PATCH_SIZE = 4
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
MIN_PIXELS = 8 * 8
MAX_PIXELS = 32 * 32

EXPERT_LAYOUTS = ("hub", "transposed")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

CALIB_TEXTS = (
    "Describe this image.",
    "What shapes do you see in the picture?",
    "What colour is the largest shape?",
    "Read the text in the image.",
    "Where is the circle placed?",
    "Count the objects in this picture.",
)


def train_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory, so no vocabulary has to be downloaded."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        chat_template=CHAT_TEMPLATE,
    )


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width); 4.57.1 needs the sections to sum to it."""
    if head_dim % 2 or head_dim < 8:
        raise ValueError(f"head_dim must be even and at least 8, got {head_dim}")
    half = head_dim // 2
    return [half - 2 * (half // 4), half // 4, half // 4]


def check_unambiguous_expert_shapes(hidden_size: int, moe_intermediate_size: int) -> None:
    """Readers tell the hub layout from the transposed one by shape, so the shapes must differ."""
    if 2 * moe_intermediate_size == hidden_size or moe_intermediate_size == hidden_size:
        raise ValueError(
            f"moe_intermediate_size={moe_intermediate_size} with hidden_size={hidden_size} makes the expert layout "
            "ambiguous (2*I == hidden or I == hidden); choose another moe_intermediate_size"
        )


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The model config must name the tokenizer's own ids, or image embeddings land on the wrong positions."""
    token_id = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": token_id("<|image_pad|>"),
        "video_token_id": token_id("<|video_pad|>"),
        "vision_start_token_id": token_id("<|vision_start|>"),
        "vision_end_token_id": token_id("<|vision_end|>"),
    }


def randomize_vectors(model: torch.nn.Module) -> None:
    """Norm weights of exactly 1 and biases of exactly 0 would hide bugs that drop or misplace them."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() != 1:
                continue
            if name.endswith(".weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.02 * torch.randn_like(param))


OUTLIER_CHANNELS = 3  # real LLMs have a handful of "massive activation" channels in the residual stream


def plant_outliers(model: torch.nn.Module, scale: float, seed: int) -> list[int]:
    """Make a few hidden channels ``scale`` times larger, as real LLMs have them: in the token embeddings (the stream
    carries them from the start) and in every input/post-attention norm weight (they survive normalisation).
    Per-tensor int8 of the q/k/v and expert inputs then wastes almost all its levels on those channels, which is
    exactly what QuaRot and smoothing exist to fix. Returns the outlier channels."""
    text = model.model.language_model
    generator = torch.Generator().manual_seed(seed + 7)
    channels = torch.randperm(text.config.hidden_size, generator=generator)[:OUTLIER_CHANNELS].tolist()
    with torch.no_grad():
        text.embed_tokens.weight[:, channels] *= scale
        for layer in text.layers:
            layer.input_layernorm.weight[channels] *= scale
            layer.post_attention_layernorm.weight[channels] *= scale
    return channels


def expert_shapes(num_experts: int, hidden_size: int, moe_intermediate_size: int, layout: str) -> dict[str, tuple]:
    """Shapes of the stacked expert tensors, keyed by the end of their name, in the given layout."""
    hub = {
        "mlp.experts.gate_up_proj": (num_experts, hidden_size, 2 * moe_intermediate_size),
        "mlp.experts.down_proj": (num_experts, moe_intermediate_size, hidden_size),
    }
    if layout == "hub":
        return hub
    return {suffix: (e, b, a) for suffix, (e, a, b) in hub.items()}


def rewrite_expert_layout(out_dir: Path, shapes: dict[str, tuple]) -> None:
    """Transpose expert tensors that save_pretrained wrote in the other layout (5.x writes the transposed one)."""
    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        changed = False
        for name, tensor in tensors.items():
            target = next((shape for suffix, shape in shapes.items() if name.endswith(suffix)), None)
            if target is not None and tuple(tensor.shape) != target:
                tensors[name] = tensor.transpose(1, 2).contiguous()
                changed = True
        if changed:
            save_file(tensors, str(path), metadata={"format": "pt"})


def save_image_processor(out_dir: Path) -> None:
    """A preprocessor_config.json for the slow Qwen2VLImageProcessor that keeps image grids small."""
    Qwen2VLImageProcessor(
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(out_dir)


def make_tiny_model(
    out_dir: str | Path,
    *,
    num_layers: int = 4,
    num_experts: int = 8,
    top_k: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    moe_intermediate_size: int = 48,
    vision_depth: int = 4,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    deepstack: tuple[int, ...] = (0, 1, 2),
    mlp_only_layers: tuple[int, ...] = (),
    intermediate_size: int = 96,
    dtype: str = "float32",
    seed: int = 0,
    layout: str = "hub",
    shard_size: str | None = None,
    outliers: float = 0.0,
) -> Path:
    """Write a random Qwen3-VL-MoE model directory (weights, config, tokenizer, processor) and return its path.

    The same arguments always give the same weights. `layout="transposed"` stores the experts as transformers 5.x
    does, to test readers on both; `shard_size` (e.g. "200KB") writes a sharded checkpoint with an index;
    `outliers` (e.g. 30) plants activation outlier channels that large (see :func:`plant_outliers`).
    """
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"layout must be one of {EXPERT_LAYOUTS}, got {layout!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    check_unambiguous_expert_shapes(hidden_size, moe_intermediate_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer()
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=moe_intermediate_size,
        mlp_only_layers=list(mlp_only_layers),
        max_position_embeddings=4096,
        rope_scaling={"rope_type": "default", "mrope_section": mrope_section(head_dim), "mrope_interleaved": True},
        initializer_range=0.05,
    )
    vision_config = dict(
        depth=vision_depth,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=vision_heads,
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        out_hidden_size=hidden_size,
        num_position_embeddings=64,
        deepstack_visual_indexes=[i for i in deepstack if i < vision_depth],
        initializer_range=0.05,
    )
    config = Qwen3VLMoeConfig(text_config=text_config, vision_config=vision_config, **special_token_ids(tokenizer))
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(config)
    randomize_vectors(model)
    if outliers:
        plant_outliers(model, outliers, seed)
    model.to(DTYPES[dtype]).save_pretrained(
        out_dir, safe_serialization=True, **({"max_shard_size": shard_size} if shard_size else {})
    )
    rewrite_expert_layout(out_dir, expert_shapes(num_experts, hidden_size, moe_intermediate_size, layout))
    tokenizer.save_pretrained(out_dir)
    save_image_processor(out_dir)
    return out_dir


def draw_image(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A gradient background with a few random shapes and a word: varied, but cheap to draw."""
    width, height = size
    start, end = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for x in range(width):
        t = x / max(width - 1, 1)
        draw.line([(x, 0), (x, height)], fill=tuple(round(a + (b - a) * t) for a, b in zip(start, end)))
    for _ in range(rng.randint(1, 3)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = [x0, y0, x0 + rng.randint(4, width), y0 + rng.randint(4, height)]
        colour = tuple(rng.randrange(256) for _ in range(3))
        rng.choice([draw.ellipse, draw.rectangle])(box, fill=colour)
    draw.text((1, 1), rng.choice(["cat", "fox", "sun", "42"]), fill=(255, 255, 255))
    return image


def make_calibration_set(
    out_dir: str | Path, num_images: int = 4, seed: int = 0, size: tuple[int, int] = (40, 32)
) -> Path:
    """Write `num_images` synthetic PNG/JPEG images of varied sizes around `size` (width, height) and an index.jsonl.

    Returns the index path. Sizes vary so that resizing and different image grids get exercised.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    entries = []
    for i in range(num_images):
        image_size = (max(8, size[0] + rng.randint(-8, 16)), max(8, size[1] + rng.randint(-8, 16)))
        name = f"img{i}.png" if i % 2 == 0 else f"img{i}.jpg"
        draw_image(rng, image_size).save(out_dir / name)
        entries.append({"image": name, "text": CALIB_TEXTS[i % len(CALIB_TEXTS)]})
    index = out_dir / "index.jsonl"
    index.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return index
