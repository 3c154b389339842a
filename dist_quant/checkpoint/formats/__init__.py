"""Output formats, one module each. A format owns its file names, how a scheme's roles become file keys, dtypes and
description entries, the config rewrite, its side files, and how a checkpoint of it is read back (for eval); the
checkpoint writer keeps what is common: staging, the part layout the units write into, the index and the atomic
publish.

Adding a format: its module (with the names and functions ascendv1.py has) and a line in ``SAVERS``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

from dist_quant.errors import RecipeError

SAVERS = {"ascendv1_saver": "dist_quant.checkpoint.formats.ascendv1",  # a recipe's ``save: - type:`` -> module
          "compressed_tensors": "dist_quant.checkpoint.formats.compressed_tensors"}
SAVE_FORMATS = {"ascendv1": "ascendv1_saver", "compressed-tensors": "compressed_tensors"}  # --save_format -> saver


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


def published_format(path) -> Optional[ModuleType]:
    """The format of the finished checkpoint in ``path``, None when there is none."""
    for module in SAVERS.values():
        fmt = importlib.import_module(module)
        if fmt.is_published(path):
            return fmt
    return None


def for_saver(saver: str) -> ModuleType:
    """The format module a recipe's saver type names."""
    if saver not in SAVERS:
        raise RecipeError(f"unknown saver {saver!r}; known: {list(SAVERS)}")
    return importlib.import_module(SAVERS[saver])
