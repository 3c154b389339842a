"""Tiny Qwen3-VL-MoE and Qwen3-MoE checkpoints and calibration sets, built offline in seconds.

Tests and demos cannot download the real models, so they build a model directory that looks like a Hub download:
random (seeded) weights in the 4.57 "hub" expert layout, a small byte-level BPE tokenizer with the Qwen special
tokens and chat template, and a preprocessor config for the slow Qwen2-VL image processor.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

from dist_quant.models.qwen3_vl_moe_experts import layout_written_by

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

# Qwen3-VL-30B-A3B's rotary base, and transformers 4.57's default; 5.x's default is 500000, so it is set explicitly
# (in 4.57's spelling, which 5.x reads too) for both versions to build the same model.
ROPE_THETA = 5_000_000.0

EXPERT_LAYOUTS = ("hub", "transposed")
INIT_STD = 0.05  # of every weight matrix (see fill_weights), and the configs' initializer_range
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


def fill_weights(model: torch.nn.Module, seed: int, hub_shapes: dict[str, tuple]) -> None:
    """Every parameter drawn from its own generator, seeded by ``seed`` and the parameter's name, instead of by
    transformers' init: 4.57 and 5.x build and initialise the modules in other orders, and must write the same
    model. Matrices are normal(0, INIT_STD), the expert tensors drawn in the hub layout (``hub_shapes``, by name
    suffix) whichever layout the modules hold; norm weights are near 1 and biases near 0, but neither exactly (1 and
    0 would hide bugs that drop or misplace them)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = next((hub for suffix, hub in hub_shapes.items() if name.endswith(suffix)), tuple(param.shape))
            values = draw_weight(name, shape, seed)
            param.copy_(values if tuple(shape) == tuple(param.shape) else values.transpose(1, 2))


def draw_weight(name: str, shape: tuple, seed: int) -> torch.Tensor:
    """One parameter's values (see :func:`fill_weights`), from a generator seeded by ``seed`` and its name."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    values = torch.empty(shape).normal_(generator=generator)
    if len(shape) == 1:
        return 1.0 + 0.1 * values if name.endswith("weight") else 0.02 * values
    return INIT_STD * values


def fill_text_weights(model: torch.nn.Module, seed: int) -> None:
    """:func:`fill_weights` for a ``Qwen3MoeForCausalLM``, every expert drawn by the name save_pretrained writes it
    under (``...mlp.experts.E.gate_proj.weight``): 4.57 holds per-expert modules of those names, 5.x a layer's experts
    fused (gate_up [E, 2I, H], gate rows first; down [E, H, I]), and both must write the same model."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                param.copy_(draw_weight(name, tuple(param.shape), seed))
                continue
            prefix, fused = name.rsplit(".", 1)
            projs = ("gate_proj", "up_proj") if fused == "gate_up_proj" else ("down_proj",)
            shape = (param.shape[1] // len(projs), param.shape[2])
            param.copy_(torch.stack([torch.cat([draw_weight(f"{prefix}.{e}.{proj}.weight", shape, seed)
                                                for proj in projs]) for e in range(param.shape[0])]))


OUTLIER_CHANNELS = 3  # real LLMs have a handful of "massive activation" channels in the residual stream


def plant_outliers(model: torch.nn.Module, scale: float, seed: int, norm_offset: float = 0.0) -> list[int]:
    """Make a few hidden channels ``scale`` times larger, as real LLMs have them: in the token embeddings (the stream
    carries them from the start) and in every input/post-attention norm's gain (they survive normalisation).
    Per-tensor int8 of the q/k/v and expert inputs then wastes almost all its levels on those channels, which is
    exactly what QuaRot and smoothing exist to fix. ``norm_offset`` is 1 for norms whose gain is ``1 + weight``
    (Qwen3.5's), so that the gain, not the stored weight, is scaled. Returns the outlier channels."""
    text = model.get_decoder()
    generator = torch.Generator().manual_seed(seed + 7)
    channels = torch.randperm(text.config.hidden_size, generator=generator)[:OUTLIER_CHANNELS].tolist()
    with torch.no_grad():
        text.embed_tokens.weight[:, channels] *= scale
        for layer in text.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[channels] = (norm.weight[channels] + norm_offset) * scale - norm_offset
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


def save_weights(model: torch.nn.Module, out_dir: Path, shard_size: str | None) -> None:
    """save_pretrained (sharded when ``shard_size`` is given), without transformers 5.x's "Writing model shards"
    progress bar: it goes to stderr, where tests read the command line's messages."""
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, safe_serialization=True,
                              **({"max_shard_size": shard_size} if shard_size else {}))
    finally:
        if shown:
            hf_logging.enable_progress_bar()


# A transformers that writes each expert layout (qwen3_vl_moe_experts.layout_written_by: 4.x the hub one)
LAYOUT_WRITERS = {"hub": "4.57.1", "transposed": "5.0.0"}


def name_layout_writer(out_dir: Path, layout: str) -> None:
    """Make config.json's transformers_version name a transformers that writes the experts' ``layout``: readers
    trust it where the shapes cannot tell the layouts apart (2I == hidden), so a hub-layout model saved by 5.x says
    4.57.1, a transposed one saved by 4.57 says 5.0.0; a version that fits is left as save_pretrained wrote it."""
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    if layout_written_by(config.get("transformers_version")) != layout:
        config["transformers_version"] = LAYOUT_WRITERS[layout]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # save_pretrained's format


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
        rope_theta=ROPE_THETA,
        rope_scaling={"rope_type": "default", "mrope_section": mrope_section(head_dim), "mrope_interleaved": True},
        initializer_range=INIT_STD,
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
        initializer_range=INIT_STD,
    )
    config = Qwen3VLMoeConfig(text_config=text_config, vision_config=vision_config, **special_token_ids(tokenizer))
    model = Qwen3VLMoeForConditionalGeneration(config)
    fill_weights(model, seed, expert_shapes(num_experts, hidden_size, moe_intermediate_size, "hub"))
    if outliers:
        plant_outliers(model, outliers, seed)
    save_weights(model.to(DTYPES[dtype]), out_dir, shard_size)
    rewrite_expert_layout(out_dir, expert_shapes(num_experts, hidden_size, moe_intermediate_size, layout))
    name_layout_writer(out_dir, layout)
    tokenizer.save_pretrained(out_dir)
    save_image_processor(out_dir)
    return out_dir


def make_tiny_text_model(
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
    mlp_only_layers: tuple[int, ...] = (),
    intermediate_size: int = 96,
    dtype: str = "float32",
    seed: int = 0,
    shard_size: str | None = None,
    outliers: float = 0.0,
) -> Path:
    """Write a random Qwen3-MoE (text-only ``Qwen3MoeForCausalLM``) model directory (weights with per-expert keys,
    config, tokenizer with its chat template; no image processor) and return its path.

    The same arguments always give the same weights, with transformers 4.57 and 5.x alike (:func:`fill_text_weights`);
    ``shard_size`` and ``outliers`` as for :func:`make_tiny_model`. The router renormalises its top-k weights
    (``norm_topk_prob``), as the released Qwen3-MoE models do.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True,
        moe_intermediate_size=moe_intermediate_size, mlp_only_layers=list(mlp_only_layers),
        max_position_embeddings=4096, rope_theta=ROPE_THETA, initializer_range=INIT_STD,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3MoeForCausalLM(config)
    fill_text_weights(model, seed)
    if outliers:
        plant_outliers(model, outliers, seed)
    save_weights(model.to(DTYPES[dtype]), out_dir, shard_size)
    tokenizer.save_pretrained(out_dir)
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


def make_tiny_qwen3_5_model(
    out_dir: str | Path,
    *,
    num_layers: int = 4,
    num_experts: int = 8,
    top_k: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    moe_intermediate_size: int = 48,
    shared_expert_intermediate_size: int = 96,
    linear_heads: tuple[int, int] = (2, 4),
    linear_head_dim: int = 16,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    mtp_layers: int = 1,
    fused_experts: bool = False,
    dtype: str = "bfloat16",
    outliers: float = 0.0,
    seed: int = 0,
) -> Path:
    """Write a random Qwen3.5-MoE model directory (transformers 5's own ``Qwen3_5MoeForConditionalGeneration``,
    saved by ``save_pretrained``; config, tokenizer, processor) with an MTP head's tensors added in a file of their
    own (``mtp.safetensors``; transformers has no MTP module) and return its path. Layers follow transformers'
    default ``layer_types`` (every 4th full attention); ``linear_heads`` is (key heads, value heads) of the linear
    attention. ``fused_experts`` rewrites every routed expert tensor, the MTP head's too, in the fused layout the
    released checkpoints use (``mlp.experts.gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``). The same arguments
    always give the same weights (:func:`fill_text_weights`, :func:`draw_weight` for the MTP tensors). ``outliers``
    plants outlier channels as :func:`make_tiny_model` does, scaling the ``1 + weight`` gains of the norms."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeRMSNorm

    from dist_quant.models import qwen3_5_moe_sizes as sizes

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    rotary = head_dim // 4  # partial_rotary_factor 0.25
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        linear_conv_kernel_dim=4, linear_key_head_dim=linear_head_dim, linear_value_head_dim=linear_head_dim,
        linear_num_key_heads=linear_heads[0], linear_num_value_heads=linear_heads[1],
        moe_intermediate_size=moe_intermediate_size, shared_expert_intermediate_size=shared_expert_intermediate_size,
        num_experts=num_experts, num_experts_per_tok=top_k, max_position_embeddings=4096,
        rope_parameters=dict(rope_type="default", rope_theta=ROPE_THETA, partial_rotary_factor=0.25,
                             mrope_section=mrope_section(rotary),
                             mrope_interleaved=True),
        initializer_range=INIT_STD, mtp_num_hidden_layers=mtp_layers,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision_config = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                         num_heads=vision_heads, patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
                         spatial_merge_size=MERGE_SIZE, out_hidden_size=hidden_size, num_position_embeddings=64,
                         initializer_range=INIT_STD)
    config = Qwen3_5MoeConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=False,
                              **special_token_ids(tokenizer))
    model = Qwen3_5MoeForConditionalGeneration(config)
    fill_text_weights(model, seed)
    with torch.no_grad():  # gains 1 + weight: drawn around 1 like the other families' (draw_weight gives 1 + 0.1 N)
        for module in model.modules():
            if isinstance(module, Qwen3_5MoeRMSNorm):
                module.weight -= 1.0
    if outliers:
        plant_outliers(model, outliers, seed, norm_offset=1.0)
    save_weights(model.to(DTYPES[dtype]), out_dir, None)
    raw = json.loads((out_dir / "config.json").read_text())
    mtp = {key: draw_weight(key, shape, seed).to(DTYPES[dtype])
           for key, shape in sizes.mtp_tensors(sizes.load_sizes_config(raw)).items()}
    save_file(mtp, str(out_dir / "mtp.safetensors"), metadata={"format": "pt"})
    files = sorted(p.name for p in out_dir.glob("*.safetensors"))
    weight_map = {}
    for name in files:
        with safe_open(str(out_dir / name), framework="pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), name))
    if fused_experts:
        weight_map = _fuse_experts(out_dir, files, num_experts)
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tokenizer.save_pretrained(out_dir)
    save_image_processor(out_dir)
    return out_dir


def _fuse_experts(out_dir: Path, files: list[str], num_experts: int) -> dict[str, str]:
    """Rewrite the per-expert routed expert tensors of every file as the fused ones (gate rows then up rows per
    expert in ``gate_up_proj``); returns the new weight map."""
    import re

    pattern = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    weight_map = {}
    for name in files:
        with safe_open(str(out_dir / name), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        blocks: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
        for key in [k for k in tensors if pattern.match(k)]:
            prefix, expert, proj = pattern.match(key).groups()
            blocks.setdefault(prefix, {})[(int(expert), proj)] = tensors.pop(key)
        for prefix, parts in blocks.items():
            tensors[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]])
                                                             for e in range(num_experts)])
            tensors[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(num_experts)])
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    return weight_map
