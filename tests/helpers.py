"""Shared test helpers: an in-memory tensor sink and an independent HF reference forward."""

from __future__ import annotations

import torch
from transformers import Qwen3VLMoeForConditionalGeneration


class MemorySink:
    """Collects what a worker writes, for tests that need no files."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.types: dict[str, str] = {}

    def add(self, key, tensor, quant_type):
        assert key not in self.tensors, f"{key} written twice"
        self.tensors[key] = tensor
        self.types[key] = quant_type


def load_hf_model(model_dir) -> Qwen3VLMoeForConditionalGeneration:
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def hf_kwargs(sample) -> dict:
    kwargs = {"input_ids": sample.input_ids, "attention_mask": sample.attention_mask}
    if sample.pixel_values is not None:
        kwargs.update(pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw)
    return kwargs
