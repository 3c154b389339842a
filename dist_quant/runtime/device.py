"""Devices by the names msModelSlim uses: ``cpu``, ``cuda``, ``npu`` (torch_npu is imported only when asked for).
Light at import (the command line reads its defaults): torch is imported by the functions that use it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from dist_quant.errors import DistQuantError

DEVICES = ("cpu", "cuda", "npu")
DEFAULT_COMPUTE_THREADS = 1


def set_compute_threads(threads: int) -> None:
    """Every process of a run computes with the same number of intra-op threads (``--compute_threads``).

    Multi-threaded float reductions and GEMMs split their work by the thread count and round differently for each
    split, so two processes with different counts (a 2-core single-card run, 1-CPU Ray actors) would write
    checkpoints that differ by an LSB here and there. One count everywhere makes the checkpoint bit-identical
    whatever ran it; the count is part of the resume fingerprint. One thread is the default: the worker's second
    core goes to its prefetch thread, and on an NPU the heavy math runs on the card anyway.
    """
    import torch

    torch.set_num_threads(threads)


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device``, with an actionable error when its runtime is missing."""
    import torch

    if name not in DEVICES:
        raise DistQuantError(f"--device {name!r} is not supported; choose one of {list(DEVICES)}")
    if name == "npu":
        try:
            importlib.import_module("torch_npu")
        except ImportError:
            raise DistQuantError(
                "--device npu needs torch_npu: install it with `pip install 'dist-quant[npu]'` (a torch_npu matching "
                "your torch and CANN version) and source CANN's set_env.sh, or use --device cpu"
            ) from None
        if not torch.npu.is_available():  # type: ignore[attr-defined]
            raise DistQuantError("--device npu: torch_npu is installed but sees no NPU (check npu-smi info)")
    if name == "cuda" and not torch.cuda.is_available():
        raise DistQuantError("--device cuda: this torch build sees no CUDA device; use --device cpu or npu")
    return torch.device(name)
