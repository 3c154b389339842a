"""What the output formats share: Hugging Face style part names and dropping config.json's quantization keys."""

from __future__ import annotations


def hub_part_names(prefix: str, count: int) -> list[str]:
    """Hugging Face style weight files: ``PREFIX-0000k-of-0000n.safetensors``, or one ``PREFIX.safetensors`` for a
    checkpoint without a part size limit (count 0)."""
    if count == 0:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def drop_config_keys(config: dict, keys: tuple[str, ...]) -> dict:
    """config.json without ``keys``, at the top level and in text_config (vLLM looks in both)."""
    for key in keys:
        config.pop(key, None)
        if isinstance(config.get("text_config"), dict):
            config["text_config"].pop(key, None)
    return config
