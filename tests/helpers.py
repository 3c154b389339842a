"""Shared test helpers: an in-memory tensor sink and an independent HF reference forward."""

from __future__ import annotations

import contextlib
import inspect
import json
import shutil
import signal
import subprocess
from pathlib import Path

import torch
from safetensors import safe_open
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


def hf_kwargs(sample, model) -> dict:
    """Keyword arguments of the HF forward for one of our samples (5.x also wants the image-token mask)."""
    kwargs = {"input_ids": sample.input_ids, "attention_mask": sample.attention_mask}
    if sample.pixel_values is not None:
        kwargs.update(pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw)
        if "mm_token_type_ids" in inspect.signature(Qwen3VLMoeForConditionalGeneration.forward).parameters:
            # transformers 5.x
            kwargs["mm_token_type_ids"] = (sample.input_ids == model.config.image_token_id).to(torch.int32)
    return kwargs


def read_checkpoint(save: Path) -> tuple[dict, dict, dict]:
    """(tensors of every part, description, index) of a published checkpoint."""
    index = json.loads((save / "quant_model_weights.safetensors.index.json").read_text())
    tensors = {}
    for part in sorted(set(index["weight_map"].values())):
        with safe_open(save / part, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors, json.loads((save / "quant_model_description.json").read_text()), index


def assert_same_checkpoint(save: Path, reference: tuple[dict, dict, dict]) -> None:
    """Tensor by tensor (torch.equal), description for description, index for index."""
    tensors, description, index = read_checkpoint(save)
    assert description == reference[1] and index == reference[2]
    assert tensors.keys() == reference[0].keys()
    different = [k for k in tensors if not torch.equal(tensors[k], reference[0][k])]
    assert not different, different[:5]


@contextlib.contextmanager
def deadline(seconds: int):
    """A hang fails the test instead of the suite: SIGALRM interrupts even an open() blocked on a FIFO."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, options: str):
    """A real small or read-only file system at ``folder`` (tmpfs, mounted with ``options``), or None where this
    machine cannot mount one (mount needs root with CAP_SYS_ADMIN)."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                                       capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
