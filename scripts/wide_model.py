"""A random Qwen3-VL-MoE (or Qwen3.5-MoE) with the exact widths of a real one (tests/data/<name>.config.json), N
decoder layers, written shard by shard as the Hub stores it: never more than one tensor in memory.

    python scripts/wide_model.py /tmp/wide235 --width 235b --layers 2
    .venv5/bin/python scripts/wide_model.py /tmp/wide397 --width 397b --layers 2   # transformers 5

Qwen3.5-397B-A17B's layers alternate linear and full attention here (layer_types ["linear_attention",
"full_attention", ...]) so that two layers measure one of each; its experts are stored fused, as the release appears
to store them (docs/qwen3_5-moe-facts.md 1.3), and the MTP head is left out (mtp_num_hidden_layers 0: the head unit
copies its 13 GB without computing on it).

The tensors are listed from the transformers model built on the meta device (so names, shapes and the fused 3-D
expert layout are the ones save_pretrained gives), filled with seeded random bf16 (linears ~N(0, 0.02), norm weights
~1, biases ~0) and packed into ``--shard-gb`` shards with a model.safetensors.index.json. The tokenizer is the tiny
synthetic one (its ids are below the real vocabulary size; the config names its special token ids) and the image
processor is the real Qwen3-VL one (patch 16, merge 2, resized between 65536 and 16777216 pixels).
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import Qwen2VLImageProcessor, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dist_quant.synthetic import special_token_ids, train_tokenizer  # noqa: E402

CONFIGS = {"235b": ROOT / "tests/data/Qwen3-VL-235B-A22B.config.json",
           "30b": ROOT / "tests/data/Qwen3-VL-30B-A3B.config.json",
           "397b": ROOT / "tests/data/Qwen3.5-397B-A17B.config.json"}
# The real Qwen3-VL preprocessor_config.json: size {"shortest_edge": 65536, "longest_edge": 16777216}, patch 16.
REAL_PROCESSOR = dict(patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=65536, max_pixels=16777216,
                      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
GB = 1e9


def wide_config(width: str, layers: int):
    raw = json.loads(CONFIGS[width].read_text())
    raw["text_config"]["num_hidden_layers"] = layers
    raw.update(special_token_ids(train_tokenizer()))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        raw.pop(key, None)
        raw["text_config"].pop(key, None)
    if raw["model_type"] == "qwen3_5_moe":
        raw["text_config"]["layer_types"] = [("linear_attention", "full_attention")[i % 2] for i in range(layers)]
        raw["text_config"]["mtp_num_hidden_layers"] = 0
        return transformers.Qwen3_5MoeConfig(**{k: v for k, v in raw.items()
                                                if k not in ("model_type", "transformers_version")})
    return Qwen3VLMoeConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")})


def meta_tensors(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor save_pretrained would write, in its order (experts fused as the model holds
    them)."""
    model_class = (Qwen3VLMoeForConditionalGeneration if isinstance(config, Qwen3VLMoeConfig)
                   else transformers.Qwen3_5MoeForConditionalGeneration)
    with torch.device("meta"):
        model = model_class(config)
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False) or getattr(config.text_config, "tie_word_embeddings", False)
    return [(name, tuple(t.shape)) for name, t in state.items() if not (tied and name == "lm_head.weight")]


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if len(shape) == 1:
        tensor = torch.empty(shape).normal_(generator=generator)
        tensor = 1.0 + 0.1 * tensor if name.endswith("weight") else 0.02 * tensor
        return tensor.to(torch.bfloat16)
    tensor = torch.empty(shape, dtype=torch.bfloat16)
    rows = tensor.view(-1, shape[-1])
    step = max(1, (64 * 2**20) // (4 * shape[-1]))  # fill in float32 chunks of ~64 MiB
    for first in range(0, rows.shape[0], step):
        chunk = torch.empty(min(step, rows.shape[0] - first), shape[-1]).normal_(0.0, 0.02, generator=generator)
        rows[first:first + chunk.shape[0]] = chunk
    return tensor


def make_wide_model(out: Path, width: str, layers: int, *, shard_gb: float = 2.0, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    config = wide_config(width, layers)
    entries = meta_tensors(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in entries:
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_gb * GB:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            tensors[name] = random_tensor(name, shape, seed)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
        print(f"  {file}: {len(shard)} tensors", file=sys.stderr)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.dtype = "bfloat16" if hasattr(config, "dtype") else None
    config.save_pretrained(out)
    train_tokenizer().save_pretrained(out)
    Qwen2VLImageProcessor(**REAL_PROCESSOR).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", choices=sorted(CONFIGS), default="235b", help="397b: Qwen3.5, transformers 5")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_wide_model(args.out, args.width, args.layers, shard_gb=args.shard_gb, seed=args.seed)


if __name__ == "__main__":
    main()
